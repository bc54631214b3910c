//! BLAKE3 content hashes as both sides name them: 32 bytes, written as 64 hex characters (blob
//! file names, error messages, the worker's blob cache).

/// A content hash (BLAKE3, 32 bytes).
pub type Hash = [u8; 32];

/// Lower-case hex of a hash (a table lookup per byte, not the formatting machinery: the blob
/// store names a file by it for every blob it touches).
pub fn hex(hash: &Hash) -> String {
    blake3::Hash::from_bytes(*hash).to_hex().to_string()
}

/// Parses 64 hex characters.
pub fn parse_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let mut h = [0u8; 32];
        h[0] = 0xab;
        h[31] = 0x01;
        let text = hex(&h);
        assert_eq!(text.len(), 64);
        assert!(text.starts_with("ab00") && text.ends_with("01"));
        assert_eq!(parse_hex(&text), Some(h));
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex(&"g".repeat(64)), None);
    }
}

//! Pieces of the layered configuration both binaries share (each binary's `settings` module
//! holds its own fields): the field-by-field layering macro, where to listen and how to log,
//! and the setter that applies a layer's value onto the defaults.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Implements `over(self, lower)` for a struct of `Option` fields: each field from `self` when
/// set, else from `lower` (flags and environment over the file, the file over the defaults).
#[macro_export]
macro_rules! layer_over {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl $ty {
            /// `self` over `lower`: each field from `self` when set, else from `lower`.
            pub fn over(self, lower: Self) -> Self {
                Self { $($field: self.$field.or(lower.$field)),* }
            }
        }
    };
}

/// Where the process listens and how it logs, resolved from the layers.
#[derive(Clone, Debug)]
pub struct Listen {
    /// The address to bind.
    pub addr: SocketAddr,
    /// The log filter.
    pub log_level: String,
    /// The log format (text or json).
    pub log_format: String,
}

impl Listen {
    /// The layered values with their defaults: 0.0.0.0, `default_port`, `info`, `text`.
    pub fn resolve(
        bind_addr: Option<IpAddr>,
        port: Option<u16>,
        default_port: u16,
        log_level: Option<String>,
        log_format: Option<String>,
    ) -> Self {
        Self {
            addr: SocketAddr::new(
                bind_addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                port.unwrap_or(default_port),
            ),
            log_level: log_level.unwrap_or_else(|| "info".to_owned()),
            log_format: log_format.unwrap_or_else(|| "text".to_owned()),
        }
    }
}

/// Sets `field` from a layer's `value`, converted, when the layer has one.
pub fn set<T, V>(field: &mut T, value: Option<V>, convert: impl FnOnce(V) -> T) {
    if let Some(v) = value {
        *field = convert(v);
    }
}

//! `dev up --tls`: a throwaway CA and the certificates of one local cluster, under
//! `<data dir>/tls/` (mode 0700; keys 0600). Made fresh at every start; the CA's key is never
//! written to disk, so nothing can issue more certificates for the cluster afterwards.
//!
//! The coordinator's certificate names `localhost` and `127.0.0.1` (what clients dial); each
//! worker's names its id, which is what the coordinator checks on its control stream and
//! verifies when it dials the worker. Every certificate serves as both server and client
//! certificate (mTLS both ways).

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::layout::create_dir;
use crate::error::Error;

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (mode 0600).
    pub key: PathBuf,
}

/// The files of a local cluster's TLS.
#[derive(Clone, Debug)]
pub struct DevTls {
    /// The CA certificate (what `--ca-cert` / HEIST_TLS_CA name).
    pub ca: PathBuf,
    /// The coordinator's certificate.
    pub coordinator: CertFiles,
    /// Each worker's, by id, in order.
    pub workers: Vec<(String, CertFiles)>,
}

impl DevTls {
    /// Generates a CA and certificates for the coordinator and `worker_ids` in `dir`.
    pub fn generate(dir: &Path, worker_ids: &[String]) -> Result<Self, Error> {
        create_dir(dir)?;
        let bad = |e: rcgen::Error| Error::Usage(format!("cannot generate certificates: {e}"));
        let ca_key = KeyPair::generate().map_err(bad)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "heist local cluster CA");
        let ca_cert = ca_params.self_signed(&ca_key).map_err(bad)?;
        let ca = dir.join("ca.pem");
        write(&ca, ca_cert.pem().as_bytes(), 0o644)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |name: &str, sans: Vec<String>| -> Result<CertFiles, Error> {
            let key = KeyPair::generate().map_err(bad)?;
            let mut params = CertificateParams::new(sans).map_err(bad)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &issuer).map_err(bad)?;
            let files = CertFiles {
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}.key")),
            };
            write(&files.cert, cert.pem().as_bytes(), 0o644)?;
            write(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
            Ok(files)
        };
        let coordinator = leaf(
            "coordinator",
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        )?;
        let workers = worker_ids
            .iter()
            .map(|id| Ok((id.clone(), leaf(id, vec![id.clone()])?)))
            .collect::<Result<_, Error>>()?;
        Ok(Self {
            ca,
            coordinator,
            workers,
        })
    }
}

/// Writes `bytes` to `path` with `mode`, replacing what was there.
fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(bytes))
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn keys_are_private_and_the_files_load_as_tls_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls_dir = dir.path().join("tls");
        let tls = DevTls::generate(&tls_dir, &["worker-1".to_owned()]).expect("generate");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&tls_dir), 0o700);
        assert_eq!(mode(&tls.coordinator.key), 0o600);
        assert_eq!(mode(&tls.workers[0].1.key), 0o600);
        let (_, worker) = &tls.workers[0];
        let files = heist_proto::tls::TlsFiles {
            cert: Some(worker.cert.clone()),
            key: Some(worker.key.clone()),
            ca: Some(tls.ca.clone()),
            ..heist_proto::tls::TlsFiles::default()
        };
        let loaded = files.load().expect("load").expect("tls");
        assert!(loaded.has_ca());
        let cert = [loaded.certificate().clone()];
        assert_eq!(
            heist_proto::tls::check_peer_name(Some(&cert), "worker-1"),
            Ok(())
        );
        assert!(heist_proto::tls::check_peer_name(Some(&cert), "worker-2").is_err());
    }
}

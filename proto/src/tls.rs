//! Transport security both binaries and heistctl share: the certificate, key and CA files
//! ([`TlsFiles`], HEIST_TLS_CERT / HEIST_TLS_KEY / HEIST_TLS_CA), checked and loaded once at
//! start ([`Tls`]); a TLS listener for tonic's `serve_with_incoming` ([`incoming`]) that offers
//! HTTP/2 and HTTP/1.1, so gRPC and the HTTP routes keep sharing one port; client settings for
//! tonic channels; and the identity check on a peer's certificate ([`check_peer_name`]).
//!
//! One crypto provider: rustls with *ring* (what reqwest already uses), installed as the
//! process default by [`install_provider`] so every rustls config in the process agrees.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::Stream;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{PrivateKeyDer, ServerName, pem::PemObject as _},
    server::{ParsedCertificate, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::{Instrument as _, debug, info_span, warn};

/// Default limit on a TLS handshake (HEIST_TLS_HANDSHAKE_TIMEOUT_S).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose handshake finished, waiting for the server to take them.
const ACCEPTED_BUFFER: usize = 64;
/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Installs rustls' *ring* provider as the process default (once; later calls do nothing).
pub fn install_provider() {
    // Err only means a provider is installed already, which is the point.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    install_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A TLS setting that cannot be used, naming the variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{var} {path}: cannot read it ({source}): set {var} to a readable PEM file")]
    Read {
        /// The variable naming the file.
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{var} {path}: {why}")]
    Parse {
        /// The variable naming the file.
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The settings do not go together (a key without a certificate, say).
    #[error("{0}")]
    Incomplete(String),
    /// rustls refused the configuration.
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

/// Where the certificate, key and CA live, and the handshake limit. All `None`: plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, this process's certificate first (HEIST_TLS_CERT).
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate (HEIST_TLS_KEY).
    pub key: Option<PathBuf>,
    /// PEM certificate(s) of the cluster CA (HEIST_TLS_CA): verifies workers' and the
    /// coordinator's certificates for mTLS.
    pub ca: Option<PathBuf>,
    /// Longest a TLS handshake may take before the connection is dropped
    /// (HEIST_TLS_HANDSHAKE_TIMEOUT_S).
    pub handshake_timeout: Duration,
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            ca: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl TlsFiles {
    /// Whether any file is set.
    pub fn is_set(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    /// Reads and checks the files: `None` when none is set (plaintext). The certificate and
    /// key must come together and match; the CA must parse; the handshake limit must be
    /// positive.
    pub fn load(&self) -> Result<Option<Tls>, TlsError> {
        if self.handshake_timeout.is_zero() {
            return Err(TlsError::Incomplete(
                "HEIST_TLS_HANDSHAKE_TIMEOUT_S must be at least 1 second".to_owned(),
            ));
        }
        let (cert_path, key_path) = match (&self.cert, &self.key) {
            (None, None) if self.ca.is_none() => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => {
                return Err(TlsError::Incomplete(
                    "HEIST_TLS_CA is set without HEIST_TLS_CERT and HEIST_TLS_KEY: mTLS needs this \
                     process's own certificate and key as well"
                        .to_owned(),
                ));
            }
            (Some(_), None) => {
                return Err(TlsError::Incomplete(
                    "HEIST_TLS_CERT is set without HEIST_TLS_KEY: set both (or neither, for \
                     plaintext)"
                        .to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::Incomplete(
                    "HEIST_TLS_KEY is set without HEIST_TLS_CERT: set both (or neither, for \
                     plaintext)"
                        .to_owned(),
                ));
            }
        };
        let cert_pem = read("HEIST_TLS_CERT", cert_path)?;
        let chain = certificates("HEIST_TLS_CERT", cert_path, &cert_pem)?;
        let key_pem = read("HEIST_TLS_KEY", key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Parse {
            var: "HEIST_TLS_KEY",
            path: key_path.clone(),
            why: format!("no PEM private key ({e}): give the key of HEIST_TLS_CERT in PEM"),
        })?;
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(|e| {
            TlsError::Parse {
                var: "HEIST_TLS_KEY",
                path: key_path.clone(),
                why: format!(
                    "does not go with the certificate in {} ({e}): give the key that certificate \
                     was issued for",
                    cert_path.display()
                ),
            }
        })?;
        let ca = match &self.ca {
            None => None,
            Some(path) => {
                let pem = read("HEIST_TLS_CA", path)?;
                let mut roots = RootCertStore::empty();
                for cert in certificates("HEIST_TLS_CA", path, &pem)? {
                    roots.add(cert).map_err(|e| TlsError::Parse {
                        var: "HEIST_TLS_CA",
                        path: path.clone(),
                        why: format!("not a usable CA certificate ({e})"),
                    })?;
                }
                Some((pem, Arc::new(roots)))
            }
        };
        Ok(Some(Tls {
            cert_pem,
            key_pem,
            chain,
            key: Arc::new(key),
            ca,
            handshake_timeout: self.handshake_timeout,
        }))
    }
}

fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        var,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    var: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Parse {
            var,
            path: path.to_owned(),
            why: format!("not PEM certificates ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Parse {
            var,
            path: path.to_owned(),
            why: "holds no `BEGIN CERTIFICATE` block: give a PEM certificate file".to_owned(),
        });
    }
    Ok(certs)
}

pub use rustls::pki_types::CertificateDer;

/// Whether a TLS server asks clients for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Clients may present one; a presented certificate must be signed by the CA (the
    /// coordinator's port, which serves public clients and workers).
    Optional,
    /// Every client must present a certificate signed by the CA (a worker's port, which only
    /// the coordinator calls).
    Required,
}

/// Loaded, checked TLS material.
#[derive(Clone)]
pub struct Tls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    ca: Option<(Vec<u8>, Arc<RootCertStore>)>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("chain", &self.chain.len())
            .field("ca", &self.ca.is_some())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Whether a cluster CA is configured (mTLS between coordinator and workers).
    pub fn has_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// This process's certificate (the first of its chain).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// Longest a handshake may take.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// The server side: this certificate, HTTP/2 and HTTP/1.1 over ALPN, and client
    /// certificates as `auth` says when a CA is configured (none asked for without one).
    pub fn server_config(&self, auth: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.ca {
            None => builder.with_no_client_auth(),
            Some((_, roots)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider);
                let verifier = match auth {
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                    ClientAuth::Required => verifier,
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Client settings for a tonic channel to a peer of this cluster: verify its certificate
    /// against the CA for `name` (a worker's id; `None`: the host of the URL dialled), and
    /// present this process's certificate. `None` without a CA (nothing to verify the peer
    /// with).
    pub fn cluster_client(&self, name: Option<&str>) -> Option<ClientTlsConfig> {
        let (ca_pem, _) = self.ca.as_ref()?;
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(self.handshake_timeout);
        Some(match name {
            Some(name) => config.domain_name(name),
            None => config,
        })
    }
}

/// Client settings for heistctl and other clients: verify the server against `ca_pem` (the
/// PEM file's bytes) when given, else against the built-in public roots.
pub fn client_config(ca_pem: Option<&[u8]>) -> ClientTlsConfig {
    install_provider();
    match ca_pem {
        Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
        None => ClientTlsConfig::new().with_enabled_roots(),
    }
}

/// Accepts TCP connections on `listener` and completes their TLS handshakes (each in its own
/// task, at most `handshake_timeout`), yielding the connections ready to serve. A failed
/// handshake (a plaintext client, an untrusted client certificate) is logged at debug and
/// dropped. The accepting task ends when the stream is dropped (the server stopped).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(ACCEPTED_BUFFER);
    tokio::spawn(
        accept_loop(listener, TlsAcceptor::from(config), handshake_timeout, tx)
            .instrument(info_span!("tls-accept")),
    );
    futures::StreamExt::map(ReceiverStream::new(rx), Ok)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    timeout: Duration,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(
            handshake(acceptor, tcp, peer, timeout, tx).instrument(info_span!("tls-handshake")),
        );
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
) {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let _ = tx.send(stream).await;
        }
        Ok(Err(err)) => debug!(%peer, %err, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}

/// Why a peer's certificate does not prove the identity it claims.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerCertError {
    /// The connection carried no verified client certificate.
    #[error("no client certificate: connect with this worker's certificate (HEIST_TLS_CERT)")]
    Missing,
    /// The certificate does not name the identity.
    #[error(
        "the client certificate is not issued for {0:?}: give this worker the certificate of its own id"
    )]
    OtherName(String),
}

/// Checks that the (already CA-verified) peer certificate `certs[0]` names `name` as a DNS
/// subject alternative name.
pub fn check_peer_name(
    certs: Option<&[CertificateDer<'_>]>,
    name: &str,
) -> Result<(), PeerCertError> {
    let cert = certs
        .and_then(|c| c.first())
        .ok_or(PeerCertError::Missing)?;
    let other = || PeerCertError::OtherName(name.to_owned());
    let parsed = ParsedCertificate::try_from(cert).map_err(|_| other())?;
    let server_name = ServerName::try_from(name).map_err(|_| other())?;
    rustls::client::verify_server_name(&parsed, &server_name).map_err(|_| other())
}

/// Whether `name` can be a certificate's DNS name (a worker id under mTLS must be one).
pub fn is_dns_name(name: &str) -> bool {
    matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)))
}

impl Tls {
    /// Client settings for a process asking itself (the `healthcheck` subcommands): trusts
    /// exactly this process's own certificate, whatever names it carries, and presents it
    /// when a CA is configured (a worker's port requires a client certificate).
    pub fn self_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(OwnCertificate {
                cert: self.certificate().clone(),
                provider,
            }));
        let mut config = if self.ca.is_some() {
            builder
                .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
                .map_err(|e| TlsError::Config(e.to_string()))?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Accepts only one certificate: the process's own (it is asking itself).
#[derive(Debug)]
struct OwnCertificate {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for OwnCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server is not this process (another certificate)".to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Logs a warning when a plaintext listener is reachable beyond this host: tokens, the join
/// token and all traffic cross the network in clear there.
pub fn warn_if_plaintext_exposed(addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        warn!(
            %addr,
            "serving plaintext on a non-loopback address: tokens and traffic cross the network \
             in clear; set HEIST_TLS_CERT and HEIST_TLS_KEY (docs/SECURITY.md, Transport)"
        );
    }
}

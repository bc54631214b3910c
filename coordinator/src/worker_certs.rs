//! Worker certificates under mTLS: with a cluster CA configured (HEIST_TLS_CA), the worker
//! RPCs (WorkerControl.Join, BlobService) are served only on connections whose client
//! certificate the CA signed (checked in the TLS handshake) and names, as a DNS subject
//! alternative name, the worker id the call is made for. Public clients on the same port need
//! no certificate. This is a layer on top of the worker's key proof, which still applies.

use heist_proto::{ids::WorkerId, tls::CertificateDer};

use crate::{app::App, error::Error};

/// Whether the worker RPCs require a client certificate (a cluster CA is configured).
pub fn required(app: &App) -> bool {
    app.tls.as_ref().is_some_and(|tls| tls.has_ca())
}

/// Checks the connection's verified client certificate against `id`; `Ok` without mTLS.
pub fn check(app: &App, id: &WorkerId, certs: Option<&[CertificateDer<'_>]>) -> Result<(), Error> {
    if !required(app) {
        return Ok(());
    }
    heist_proto::tls::check_peer_name(certs, id.as_str()).map_err(|e| {
        Error::WorkerIdentityInvalid {
            worker: id.to_string(),
            why: e.to_string(),
        }
    })
}

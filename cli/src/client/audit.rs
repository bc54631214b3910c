//! AuditService calls.

use heist_proto::v1::{self, audit_service_client::AuditServiceClient};

use super::Client;
use crate::error::Error;

impl Client {
    fn audit(&self) -> AuditServiceClient<tonic::transport::Channel> {
        AuditServiceClient::new(self.channel.clone())
    }

    /// One page of records after `after_seq`.
    pub async fn list_audit(
        &self,
        after_seq: u64,
        limit: u32,
        filter: v1::AuditFilter,
    ) -> Result<v1::ListAuditResponse, Error> {
        let request = self.authed(v1::ListAuditRequest {
            after_seq,
            limit,
            filter: Some(filter),
        })?;
        Ok(self.audit().list_audit(request).await?.into_inner())
    }

    /// Records as they are written (after `after_seq`, or from the first with `from_start`).
    pub async fn tail_audit(
        &self,
        after_seq: u64,
        from_start: bool,
        filter: v1::AuditFilter,
    ) -> Result<tonic::Streaming<v1::AuditEntry>, Error> {
        let request = self.authed(v1::TailAuditRequest {
            after_seq,
            from_start,
            filter: Some(filter),
        })?;
        Ok(self.audit().tail_audit(request).await?.into_inner())
    }

    /// The chain checked end to end.
    pub async fn verify_audit(&self) -> Result<v1::VerifyAuditResponse, Error> {
        let request = self.authed(v1::VerifyAuditRequest {})?;
        Ok(self.audit().verify_audit(request).await?.into_inner())
    }
}

//! heist.v1.AuditService: reading, following and checking the audit log ([`crate::audit`]).

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::Stream;
use heist_proto::v1::{
    AuditEntry, AuditFilter, ListAuditRequest, ListAuditResponse, TailAuditRequest,
    VerifyAuditRequest, VerifyAuditResponse, audit_service_server::AuditService,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{app::App, audit::AuditRecord};

/// Records a list returns when the request names no limit, and the most it may name.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Records a tail reads from the store per batch while it catches up.
const TAIL_BATCH: usize = 256;

/// AuditService handlers.
pub struct AuditApi {
    app: Arc<App>,
}

impl AuditApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

type EntryStream = Pin<Box<dyn Stream<Item = Result<AuditEntry, Status>> + Send>>;

/// Whether `record` passes `filter` (empty fields match everything; a kind ending in a dot is
/// a prefix).
fn matches(filter: &AuditFilter, record: &AuditRecord) -> bool {
    let kind = filter.kind.is_empty()
        || record.kind == filter.kind
        || (filter.kind.ends_with('.') && record.kind.starts_with(&filter.kind));
    kind && (filter.subject.is_empty() || record.subject == filter.subject)
}

fn entry(record: AuditRecord) -> AuditEntry {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(record.at_unix_ms);
    AuditEntry {
        seq: record.seq,
        at: Some(at.into()),
        kind: record.kind,
        subject: record.subject,
        detail: record.detail,
        hash: record.hash.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    #[instrument(skip_all)]
    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let req = request.into_inner();
        let limit = match usize::try_from(req.limit).unwrap_or(MAX_LIMIT) {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        let filter = req.filter.unwrap_or_default();
        // Everything queued before this call (e.g. the refusal the caller just got) is listed.
        self.app.audit.settle().await;
        let (records, more) = self
            .app
            .audit
            .list(req.after_seq, limit, |r| matches(&filter, r))
            .map_err(Status::from)?;
        let next_after_seq = if more {
            records.last().map_or(0, |r| r.seq)
        } else {
            0
        };
        Ok(Response::new(ListAuditResponse {
            entries: records.into_iter().map(entry).collect(),
            next_after_seq,
        }))
    }

    type TailAuditStream = EntryStream;

    #[instrument(skip_all)]
    async fn tail_audit(
        &self,
        request: Request<TailAuditRequest>,
    ) -> Result<Response<Self::TailAuditStream>, Status> {
        let req = request.into_inner();
        let filter = req.filter.unwrap_or_default();
        let app = Arc::clone(&self.app);
        app.audit.settle().await;
        let mut cursor = if req.from_start || req.after_seq > 0 {
            req.after_seq
        } else {
            app.audit.head()
        };
        let mut written = app.audit.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // Everything after the cursor, in batches, then wait for the next write.
                loop {
                    let batch = match app.audit.list(cursor, TAIL_BATCH, |_| true) {
                        Ok((batch, _)) => batch,
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    };
                    let Some(last) = batch.last().map(|r| r.seq) else {
                        break;
                    };
                    cursor = last;
                    for record in batch.into_iter().filter(|r| matches(&filter, r)) {
                        if tx.send(Ok(entry(record))).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    () = tx.closed() => return,
                    changed = written.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(skip_all)]
    async fn verify_audit(
        &self,
        _request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        self.app.audit.settle().await;
        let app = Arc::clone(&self.app);
        let verdict = tokio::task::spawn_blocking(move || app.audit.verify())
            .await
            .map_err(|e| Status::internal(format!("the check did not finish: {e}")))?;
        Ok(Response::new(match verdict {
            Ok(records) => VerifyAuditResponse {
                intact: true,
                records,
                broken_at_seq: 0,
                reason: String::new(),
            },
            Err(broken) => VerifyAuditResponse {
                intact: false,
                records: broken.seq.saturating_sub(1),
                broken_at_seq: broken.seq,
                reason: broken.why,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: &str, subject: &str) -> AuditRecord {
        AuditRecord {
            seq: 1,
            at_unix_ms: 0,
            kind: kind.into(),
            subject: subject.into(),
            detail: String::new(),
            prev_hash: Vec::new(),
            hash: vec![0xab, 0x01],
        }
    }

    #[test]
    fn filters_match_kinds_exactly_or_by_dotted_prefix_and_subjects_exactly() {
        let f = |kind: &str, subject: &str| AuditFilter {
            kind: kind.into(),
            subject: subject.into(),
        };
        let r = record("token.refused", "alice");
        assert!(matches(&f("", ""), &r));
        assert!(matches(&f("token.", ""), &r));
        assert!(matches(&f("token.refused", "alice"), &r));
        assert!(!matches(&f("token", ""), &r));
        assert!(!matches(&f("worker.", ""), &r));
        assert!(!matches(&f("", "bob"), &r));
        assert_eq!(entry(r).hash, "ab01");
    }
}

//! heist.v1.BlobService: the blob store as workers see it (internal).
//!
//! Every call must carry the workers' join token in `x-heist-join-token` (compared in constant
//! time) and the calling worker's identity proof for that RPC (`x-heist-worker-id`,
//! `x-heist-worker-proof`, see [`crate::worker_keys`]); the bearer-token layer lets this service through untouched because
//! it is on the allow-list [`heist_proto::scopes::PUBLIC`].
//!
//! File I/O runs on one blocking thread per call, fed through a small bounded channel, so a
//! stream of many small blobs costs no thread hop per chunk and a slow disk pushes back on the
//! sender. PutBlobs records the blobs it stored; they are made durable before any manifest
//! naming them commits (see [`Cas::sync_written`]), one sync for all of a capture's streams.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use heist_proto::{
    errors,
    v1::{
        BlobChunk, FindMissingBlobsRequest, FindMissingBlobsResponse, GetBlobsRequest,
        PutBlobsResponse, blob_service_server::BlobService,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, instrument, warn};

use crate::{
    app::App,
    auth,
    cas::{BlobWriter, CHUNK_BYTES, Cas, FLUSH_AHEAD_BYTES, Hash, Rejected, hash_from_bytes, hex},
    error::Error,
    worker_certs,
};

/// Chunks buffered between the network and the disk thread.
const PIPELINE_DEPTH: usize = 8;

/// BlobService handlers.
pub struct BlobApi {
    app: Arc<App>,
}

impl BlobApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    /// The join token and the calling worker's identity proof for `method`, and under mTLS
    /// its certificate ([`worker_certs`]).
    fn check<T>(&self, request: &Request<T>, method: &str) -> Result<(), Status> {
        let md = request.metadata();
        auth::check_join_token(&self.app.config.join_token, md).map_err(Status::from)?;
        let path = format!("/heist.v1.BlobService/{method}");
        let certs = request.peer_certs();
        self.app
            .worker_keys
            .check_blob_call(md, &path)
            .and_then(|id| worker_certs::check(&self.app, &id, certs.as_deref().map(Vec::as_slice)))
            .map_err(|err| {
                warn!(%path, error = %err, "blob call refused: worker identity not proven");
                Status::from(err)
            })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl BlobService for BlobApi {
    #[instrument(skip_all, fields(hashes = request.get_ref().hashes.len()))]
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        self.check(&request, "FindMissingBlobs")?;
        let hashes = parse_hashes(&request.into_inner().hashes, self.app.config.max_blob_batch)?;
        let table = self.app.checkpoints.clone();
        let missing = tokio::task::spawn_blocking(move || {
            table
                .missing(hashes)
                .into_iter()
                .map(|h| h.to_vec())
                .collect()
        })
        .await
        .map_err(Error::from)?;
        Ok(Response::new(FindMissingBlobsResponse { missing }))
    }

    #[instrument(skip_all)]
    async fn put_blobs(
        &self,
        request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<PutBlobsResponse>, Status> {
        self.check(&request, "PutBlobs")?;
        put_blobs(&self.app, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type GetBlobsStream = ChunkStream;

    #[instrument(skip_all, fields(hashes = request.get_ref().hashes.len()))]
    async fn get_blobs(
        &self,
        request: Request<GetBlobsRequest>,
    ) -> Result<Response<Self::GetBlobsStream>, Status> {
        self.check(&request, "GetBlobs")?;
        let hashes = parse_hashes(&request.into_inner().hashes, self.app.config.max_blob_batch)?;
        let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
        let cas = self.app.checkpoints.cas().clone();
        tokio::task::spawn_blocking(move || send_blobs(&cas, &hashes, &tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Hashes from the wire: at most `max` of them, each exactly 32 bytes.
fn parse_hashes(raw: &[Vec<u8>], max: usize) -> Result<Vec<Hash>, Error> {
    if raw.len() > max {
        return Err(Error::LimitExceeded {
            limit: "max_blob_batch",
            message: format!(
                "{} hashes in one request; at most {max} (HEIST_MAX_BLOB_BATCH): send smaller \
                 batches",
                raw.len()
            ),
        });
    }
    raw.iter()
        .map(|h| {
            hash_from_bytes(h).ok_or_else(|| {
                Error::Status(errors::invalid_argument(
                    "hashes",
                    format!("a hash has {} bytes; BLAKE3 hashes have 32", h.len()),
                ))
            })
        })
        .collect()
}

/// Receives a PutBlobs stream and hands the chunks to a disk thread.
async fn put_blobs(
    app: &App,
    mut inbound: Streaming<BlobChunk>,
) -> Result<PutBlobsResponse, Error> {
    // Blobs live next to the store: none are taken while its disk is below the reserve.
    app.store.writable()?;
    let (tx, rx) = mpsc::channel::<BlobChunk>(PIPELINE_DEPTH);
    let cas = app.checkpoints.cas().clone();
    let max_blob = app.config.max_blob_bytes;
    let reserve = app.store.reserve.clone();
    let disk = tokio::task::spawn_blocking(move || store_blobs(&cas, &reserve, max_blob, rx));
    let mut received = Ok(());
    loop {
        match inbound.message().await {
            Ok(Some(chunk)) => {
                if tx.send(chunk).await.is_err() {
                    break; // the disk thread stopped: its error says why
                }
            }
            Ok(None) => break,
            Err(status) => {
                received = Err(Error::Status(status));
                break;
            }
        }
    }
    drop(tx);
    let stored = disk.await??;
    received?;
    // The stream ended cleanly: a blob cut short is an error, not a silent partial upload.
    if let Some((hash, got, size)) = stored.unfinished {
        return Err(Error::BlobCorrupt {
            hash: hex(&hash),
            why: format!("the stream ended after {got} of {size} bytes"),
        });
    }
    debug!(
        blobs = stored.response.blobs,
        bytes = stored.response.bytes,
        "blobs stored"
    );
    Ok(stored.response)
}

struct Stored {
    response: PutBlobsResponse,
    /// A blob whose chunks stopped before its announced size: hash, bytes, size.
    unfinished: Option<(Hash, u64, u64)>,
}

/// The disk side of PutBlobs: writes each blob (when it fits above the store's free-space
/// reserve), verifies it, renames it into place, and records it for the next sync.
fn store_blobs(
    cas: &Arc<Cas>,
    reserve: &heist_proto::space::Reserve,
    max_blob: u64,
    mut rx: mpsc::Receiver<BlobChunk>,
) -> Result<Stored, Error> {
    let mut response = PutBlobsResponse::default();
    let mut current: Option<Box<BlobWriter>> = None;
    // Blobs stored and not yet handed to the store's sync, and their bytes: handed over every
    // FLUSH_AHEAD_BYTES so write-back starts while the stream goes on.
    let mut written: Vec<Hash> = Vec::new();
    let mut written_bytes = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        let hash = hash_from_bytes(&chunk.hash).ok_or_else(|| {
            Error::Status(errors::invalid_argument(
                "hash",
                format!(
                    "a chunk's hash has {} bytes; BLAKE3 hashes have 32",
                    chunk.hash.len()
                ),
            ))
        })?;
        let corrupt = |why: String| Error::BlobCorrupt {
            hash: hex(&hash),
            why,
        };
        if chunk.data.len() > CHUNK_BYTES {
            return Err(corrupt(format!(
                "a chunk carries {} bytes; at most {CHUNK_BYTES} per chunk",
                chunk.data.len()
            )));
        }
        if current.as_ref().is_some_and(|c| c.hash() != &hash) {
            let (got, size) = current.as_ref().map_or((0, 0), |c| (c.written(), c.size()));
            if got != size {
                return Err(corrupt(format!(
                    "chunks of the previous blob stopped after {got} of {size} bytes: send each \
                     blob's chunks contiguously"
                )));
            }
            current = None;
        }
        if current.is_none() {
            if chunk.offset != 0 {
                return Err(corrupt(format!(
                    "the first chunk starts at offset {}, not 0",
                    chunk.offset
                )));
            }
            if chunk.size > max_blob {
                return Err(Error::LimitExceeded {
                    limit: "max_blob_bytes",
                    message: format!(
                        "a {}-byte file is larger than the blob store takes ({max_blob} bytes, \
                         HEIST_MAX_BLOB_BYTES): remove or shrink it before checkpointing",
                        chunk.size
                    ),
                });
            }
            // A blob that would eat into the store's free-space reserve is refused.
            reserve.check_room(chunk.size).map_err(Error::StoreFull)?;
            response.blobs += 1;
            // No stat first: the uploader asked FindMissingBlobs, and a blob stored meanwhile is
            // kept as it is (the upload is linked in, never over it).
            current = Some(Box::new(cas.writer(hash, chunk.size)?));
        }
        response.bytes += chunk.data.len() as u64;
        let done = match current.as_mut() {
            Some(w) => {
                w.write(chunk.offset, &chunk.data)?
                    .map_err(|r| corrupt(rejection(r)))?;
                w.written() == w.size()
            }
            None => false,
        };
        if done && let Some(w) = current.take() {
            let size = w.size();
            w.finish()?.map_err(|r| corrupt(rejection(r)))?;
            written.push(hash);
            written_bytes += size;
            if written_bytes >= FLUSH_AHEAD_BYTES {
                cas.written(&std::mem::take(&mut written), written_bytes)?;
                written_bytes = 0;
            }
        }
    }
    let unfinished = current.map(|c| (*c.hash(), c.written(), c.size()));
    cas.written(&written, written_bytes)?;
    Ok(Stored {
        response,
        unfinished,
    })
}

fn rejection(r: Rejected) -> String {
    match r {
        Rejected::BadChunk(why) => why,
        Rejected::Mismatch => "its content does not match its hash and size".to_owned(),
    }
}

/// The disk side of GetBlobs: each blob in 1 MiB chunks, in the order asked (an empty blob is
/// one empty chunk). A missing blob ends the stream with NOT_FOUND BLOB_MISSING.
fn send_blobs(cas: &Cas, hashes: &[Hash], tx: &mpsc::Sender<Result<BlobChunk, Status>>) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    for hash in hashes {
        let Some(size) = cas.size(hash) else {
            let _ = tx.blocking_send(Err(Error::BlobNotFound(hex(hash)).into()));
            return;
        };
        let mut offset = 0u64;
        loop {
            let n = match cas.read_chunk(hash, offset, &mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    let _ = tx.blocking_send(Err(Error::BlobNotFound(hex(hash)).into()));
                    return;
                }
                Err(err) => {
                    let _ = tx.blocking_send(Err(err.into()));
                    return;
                }
            };
            if n == 0 && (offset > 0 || size > 0) {
                break; // the end (or a file shorter than it was: the receiver sees it short)
            }
            let chunk = BlobChunk {
                hash: hash.to_vec(),
                size,
                offset,
                data: bytes::Bytes::copy_from_slice(&buf[..n]),
            };
            if tx.blocking_send(Ok(chunk)).is_err() {
                return; // the caller went away
            }
            offset += n as u64;
            if offset >= size {
                break;
            }
        }
    }
}

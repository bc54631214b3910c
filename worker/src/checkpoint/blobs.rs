//! The worker's client of the coordinator's BlobService: one lazily connected channel to
//! COORDINATOR_ADDR, the join token on every call, hashes in batches of HEIST_BLOB_BATCH.
//!
//! Uploads are pipelined: a blocking reader thread reads the blobs (1 MiB chunks) into a small
//! bounded channel that is the PutBlobs request stream, so disk reads and the network overlap
//! and memory stays bounded.

use std::{sync::Arc, time::Duration};

use cap_std::fs::Dir;
use heist_proto::{
    errors::{self, reason},
    identity::{PURPOSE_BLOB, WorkerKey},
    ids::WorkerId,
    metadata,
    v1::{
        BlobChunk, FindMissingBlobsRequest, GetBlobsRequest, PutBlobsResponse,
        blob_service_client::BlobServiceClient,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming, metadata::AsciiMetadataValue, transport::Channel};

use super::manifest::Hash;
use crate::{Config, Error};

/// Largest chunk sent, in bytes (the store's limit).
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks buffered between the disk reader and the network.
const PIPELINE_DEPTH: usize = 8;

/// BlobService client.
#[derive(Clone)]
pub struct BlobClient {
    client: BlobServiceClient<Channel>,
    token: AsciiMetadataValue,
    batch: usize,
    /// The worker id and key that prove every call (none: calls are refused by the
    /// coordinator, which requires the proof).
    identity: Option<(WorkerId, Arc<WorkerKey>)>,
}

impl BlobClient {
    /// A client for `config.coordinator_addr` (nothing is dialled until the first call).
    pub fn new(config: &Config) -> Result<Self, Error> {
        let endpoint = config
            .coordinator_endpoint()?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20);
        let token = config
            .join_token
            .parse()
            .map_err(|_| Error::Config("HEIST_JOIN_TOKEN must be printable ASCII".to_owned()))?;
        let client = BlobServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(config.max_message_bytes.max(2 * CHUNK_BYTES))
            .max_encoding_message_size(config.max_message_bytes.max(2 * CHUNK_BYTES));
        Ok(Self {
            client,
            token,
            batch: config.blob_batch,
            identity: None,
        })
    }

    /// The same client proving `worker`'s identity with `key`.
    pub fn with_identity(mut self, worker: WorkerId, key: Arc<WorkerKey>) -> Self {
        self.identity = Some((worker, key));
        self
    }

    /// A request with the join token and, for `method`, the worker's identity proof.
    fn request<T>(&self, msg: T, method: &str) -> Request<T> {
        let mut request = Request::new(msg);
        let md = request.metadata_mut();
        md.insert(metadata::JOIN_TOKEN, self.token.clone());
        if let Some((worker, key)) = &self.identity {
            let path = format!("/heist.v1.BlobService/{method}");
            let proof = key.prove(PURPOSE_BLOB, worker.as_str(), path.as_bytes());
            if let (Ok(id), Ok(proof)) = (
                AsciiMetadataValue::try_from(worker.as_str()),
                AsciiMetadataValue::try_from(proof.to_header()),
            ) {
                md.insert(metadata::WORKER_ID, id);
                md.insert(metadata::WORKER_PROOF, proof);
            }
        }
        request
    }

    /// The subset of `hashes` the store lacks.
    pub async fn find_missing(&self, hashes: &[Hash]) -> Result<Vec<Hash>, Error> {
        let mut missing = Vec::new();
        for batch in hashes.chunks(self.batch) {
            let request = self.request(
                FindMissingBlobsRequest {
                    hashes: batch.iter().map(|h| h.to_vec()).collect(),
                },
                "FindMissingBlobs",
            );
            let resp = self
                .client
                .clone()
                .find_missing_blobs(request)
                .await
                .map_err(Error::BlobStore)?;
            for raw in resp.into_inner().missing {
                let hash: Hash = raw.as_slice().try_into().map_err(|_| {
                    Error::Internal("the blob store answered with a malformed hash".to_owned())
                })?;
                missing.push(hash);
            }
        }
        Ok(missing)
    }

    /// Uploads `blobs` (hash, size, path beneath `root`), reading them on a blocking thread.
    pub async fn put(
        &self,
        root: Dir,
        blobs: Vec<(Hash, u64, String)>,
    ) -> Result<PutBlobsResponse, Error> {
        if blobs.is_empty() {
            return Ok(PutBlobsResponse::default());
        }
        let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
        let reader = tokio::task::spawn_blocking(move || read_blobs(&root, &blobs, &tx));
        let sent = self
            .client
            .clone()
            .put_blobs(self.request(ReceiverStream::new(rx), "PutBlobs"))
            .await;
        let read = reader
            .await
            .map_err(|e| Error::Internal(format!("blob reader failed: {e}")))?;
        // A read error explains a refused stream better than the refusal does.
        read?;
        Ok(sent.map_err(Error::BlobStore)?.into_inner())
    }

    /// Streams the chunks of `hashes`, in order. A missing blob ends the stream with
    /// [`Error::BlobMissing`] (see [`blob_error`]).
    pub async fn get(&self, hashes: &[Hash]) -> Result<Streaming<BlobChunk>, Error> {
        let request = self.request(
            GetBlobsRequest {
                hashes: hashes.iter().map(|h| h.to_vec()).collect(),
            },
            "GetBlobs",
        );
        self.client
            .clone()
            .get_blobs(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(blob_error)
    }

    /// Hashes per GetBlobs call.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// A BlobService error as a worker error: BLOB_MISSING keeps its meaning.
pub fn blob_error(status: Status) -> Error {
    if errors::reason_of(&status).as_deref() == Some(reason::BLOB_MISSING) {
        return Error::BlobMissing(errors::metadata_of(&status, "hash").unwrap_or_default());
    }
    Error::BlobStore(status)
}

/// Sends each blob as chunks, each read into a buffer of its own that becomes the message's
/// bytes (no copy between the file and the request stream); a file that no longer matches its
/// size is an error (the store would refuse the blob anyway).
fn read_blobs(
    root: &Dir,
    blobs: &[(Hash, u64, String)],
    tx: &mpsc::Sender<BlobChunk>,
) -> Result<(), Error> {
    use std::io::Read as _;
    for (hash, size, path) in blobs {
        let io = |e: std::io::Error| Error::io(format!("cannot read {path:?}"), e);
        let mut file = root.open(path).map_err(io)?;
        let mut offset = 0u64;
        loop {
            let want = (*size - offset).min(CHUNK_BYTES as u64);
            // `want` is at most CHUNK_BYTES.
            let mut data = Vec::with_capacity(want as usize);
            (&mut file).take(want).read_to_end(&mut data).map_err(io)?;
            if (data.len() as u64) < want {
                return Err(Error::ChangedDuringCapture(path.clone()));
            }
            let chunk = BlobChunk {
                hash: hash.to_vec(),
                size: *size,
                offset,
                data: data.into(),
            };
            if tx.blocking_send(chunk).is_err() {
                return Ok(()); // the call failed; its status says why
            }
            offset += want;
            if offset >= *size {
                break;
            }
        }
        // Grown since it was hashed: the blob would not match its hash.
        if file.read(&mut [0u8; 1]).map_err(io)? != 0 {
            return Err(Error::ChangedDuringCapture(path.clone()));
        }
    }
    Ok(())
}

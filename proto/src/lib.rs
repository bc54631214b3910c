//! heist.v1 on the wire, and the small glue every side of it shares.
//!
//! - [`v1`]: generated prost messages and tonic clients/servers for `proto/heist/v1/*.proto`.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`identity`]: the per-worker key that proves registrations and blob calls.
//! - [`ids`]: newtype ids (`WorkerId`, `SessionId`, `RequestId`).
//! - [`metadata`]: metadata keys and deadline propagation.
//! - [`scopes`]: scope names and the scope each public RPC requires.
//! - [`errors`]: the ErrorInfo domain and reasons, and a builder for rich statuses.
//! - [`hash`]: content hashes and their hex form.
//! - [`json`]: `google.protobuf.Struct`/`Value` <-> `serde_json` conversion.
//! - [`credential`]: the per-call coordinator -> worker credential and the key it is made with.
//! - [`token`]: JWT claims and the pinned-algorithm verifier both coordinator and workers use.
//! - [`logging`]: the log subscriber and OTLP trace export; [`sampling`]: the default trace
//!   sampler; [`trace`]: W3C trace context and the per-RPC span layer; [`metrics`]: Prometheus registry helpers and RPC metrics.
//! - [`space`]: the free-space reserve that refuses a store's mutations while its disk is full.
//! - [`tls`]: certificate files, TLS listeners and client settings, peer certificate checks.

pub mod credential;
pub mod errors;
pub mod files;
pub mod hash;
pub mod health;
pub mod identity;
pub mod ids;
pub mod json;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod sampling;
pub mod scopes;
pub mod settings;
pub mod shutdown;
pub mod space;
pub mod tls;
pub mod token;
pub mod trace;

/// Generated code for package `heist.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("heist.v1");
}

/// Encoded `FileDescriptorSet` of every heist.v1 file and its imports (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("heist_descriptor");

/// The path (`/package.Service/Method`) of every heist RPC, sorted.
pub const RPC_METHODS: &[&str] = include!(concat!(env!("OUT_DIR"), "/heist_methods.rs"));

/// The built-in tool catalogue (the tools the worker crate ships) as JSON: an array of
/// `{name, description, input_schema, read_only}` ordered by name. The coordinator treats it as
/// authoritative: no worker may advertise another description or schema under these names. A
/// worker test keeps it equal to the worker's own catalogue (`HEIST_BLESS=1` rewrites it).
pub const BUILTIN_TOOLS_JSON: &str = include_str!("../builtin_tools.json");

/// Version of this build, reported by workers at registration and by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

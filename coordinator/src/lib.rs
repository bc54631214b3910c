//! heist coordinator: the cluster's front door.
//!
//! Clients authenticate ([`auth`], [`auth_layer`]), open sessions that [`placement`] puts on a
//! registered worker, and call tools that are routed to that worker ([`worker_client`]).
//! Workers join over the control stream ([`control`]) and live in the [`registry`]. Durable
//! state (workers, sessions, clients, request ids) is in sled ([`store`], [`sessions`],
//! [`idempotency`]).
//!
//! Map:
//! - [`serve`] (in [`server`]): the one entry point; `main` only parses flags and binds.
//! - [`config`]: [`Config`] and its validation; [`settings`]: the layered configuration of the
//!   binary (defaults → `--config` file → env → flags).
//! - [`drain`]: counting client calls so shutdown drains them before closing worker streams.
//! - [`limits`]: per-principal rate and concurrency limits on the public API.
//! - [`web`]: the HTTP routes (`/healthz`, `/readyz`) served on the gRPC port.
//! - [`error`]: [`Error`] and its single mapping to `tonic::Status`.
//! - [`app`]: the shared state and the background sweepers.
//! - [`metrics`]: the Prometheus metrics on `/metrics`; every call gets a span and RPC metrics
//!   from [`heist_proto::trace::RpcLayer`].
//! - [`api`]: thin handlers adapting protobuf to the layer beneath; no `api` module imports
//!   another.
//! - [`calls`]: the tool call pipeline (admit → [`calls::gate`] → [`runner`] → forward →
//!   [`calls::hooks`]), shared by gRPC, MCP and agent turns.
//! - [`lifecycle`]: place, open, close, checkpoint, restore, fork.
//! - [`runner`]: the one idempotent runner (begin → run → complete → replay).
//! - [`convert`]: checks at the edge (labels, paging).
//! - [`control`]: WorkerControl.Join, the worker control stream; [`worker_keys`]: the key each
//!   worker id is bound to and the proofs registrations and blob calls must carry;
//!   [`worker_certs`]: under mTLS, the client certificate those calls must come with.
//! - [`cas`], [`checkpoints`]: the blob store and the checkpoint table (records, lineage,
//!   retention, blob GC); [`lifecycle`], [`api::checkpoint`] and [`api::blob`] serve them.

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod auth_layer;
pub mod calls;
pub mod cas;
pub mod catalogue;
pub mod checkpoints;
pub mod config;
pub mod control;
pub mod convert;
pub mod decode_status;
pub mod drain;
pub mod error;
pub mod eventlog;
pub mod heist;
pub mod idempotency;
pub mod lifecycle;
pub mod limits;
pub mod mcp;
pub mod metrics;
pub mod placement;
pub mod registry;
pub mod runner;
pub mod server;
pub mod sessions;
pub mod settings;
pub mod signing_keys;
pub mod store;
pub mod throttle;
pub mod turns;
pub mod web;
pub mod worker_certs;
pub mod worker_client;
pub mod worker_keys;

pub use auth_layer::Principal;
pub use config::Config;
pub use error::Error;
pub use server::serve;

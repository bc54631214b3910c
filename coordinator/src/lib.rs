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
//! - [`config`]: [`Config`] and its validation.
//! - [`error`]: [`Error`] and its single mapping to `tonic::Status`.
//! - [`app`]: the shared state and the background sweepers.
//! - [`api`]: thin handlers for AuthService, ClusterService, SessionService, ToolService.
//! - [`control`]: WorkerControl.Join, the worker control stream.
//! - [`cas`], [`checkpoints`]: the blob store and the checkpoint table (records, lineage,
//!   retention, blob GC); [`api::checkpoint`] and [`api::blob`] serve them.

pub mod api;
pub mod app;
pub mod auth;
pub mod auth_layer;
pub mod calls;
pub mod cas;
pub mod checkpoints;
pub mod config;
pub mod control;
pub mod convert;
pub mod error;
pub mod idempotency;
pub mod lifecycle;
pub mod placement;
pub mod registry;
pub mod runner;
pub mod server;
pub mod sessions;
pub mod settings;
pub mod store;
pub mod web;
pub mod worker_client;

pub use auth_layer::Principal;
pub use config::Config;
pub use error::Error;
pub use server::serve;

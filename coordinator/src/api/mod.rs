//! The public gRPC services: thin adapters from protobuf to the layer beneath. Each handler
//! unpacks the request, calls [`crate::calls`], [`crate::lifecycle`], [`crate::turns`] or a table on
//! [`crate::app::App`], and maps the error to a status. No module here imports another.

pub mod agent;
pub mod audit;
pub mod auth;
pub mod blob;
pub mod checkpoint;
pub mod client;
pub mod cluster;
pub mod heist;
pub mod session;
pub mod tool;

//! Integration tests: real coordinators and workers on loopback, driven through the generated
//! clients. Each test builds its own cluster in temp dirs.

mod audit;
mod auth;
mod checkpoints;
mod clients;
mod diskquota;
mod docker;
mod durability;
mod ecosystem;
mod escape;
mod exhaustion;
mod faults;
mod harness;
mod heist;
mod hostile;
mod limits;
mod mcp;
mod observability;
mod registration;
mod sandbox;
mod sessions;
mod storage;
mod surface;
mod tls;
mod tools;
mod toolscopes;
mod turns;

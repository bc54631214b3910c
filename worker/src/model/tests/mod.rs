//! Provider and gateway tests against protocol servers in the test process.

pub(crate) mod server;
mod wire;

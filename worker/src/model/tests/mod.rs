//! Provider and gateway tests against protocol servers in the test process.

mod server;
mod wire;

//! The heist game: a crew of six agents plans a job against a generated target, one of them is
//! a mole, and the player has to catch it.
//!
//! - [`scenario`]: the target from a seed (blueprints, facts) and [`database`], its security
//!   database as a SQLite file.
//! - [`crew`]: the six roles, their instructions per round, and the sealed mole.
//! - [`game`]: playing the rounds through the cluster ([`game::Ports`]), the analysis, the
//!   outcome.
//! - [`analyzer`]: suspicion scores with evidence, from the transcript and the database.

pub mod analyzer;
pub mod crew;
pub mod database;
pub mod game;
pub mod ports;
pub mod scenario;
pub mod service;

#[cfg(test)]
mod tests;

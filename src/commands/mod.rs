//! Subcommands besides running the proxy. Each prints for a person and
//! returns an error with what to do when it cannot.

pub mod audit;
pub mod token;

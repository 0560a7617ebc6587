//! Subcommands besides running the proxy. Each prints for a person and
//! returns an error with what to do when it cannot.

pub mod audit;
pub mod check_config;
pub mod connect;
pub mod das;
pub mod doctor;
pub mod gateway_password;
pub mod policy;
pub mod token;
pub mod whoami;

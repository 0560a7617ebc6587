//! Shared helpers for the integration tests.

pub mod audit;
pub mod bed;
pub mod fault;
pub mod proxy;
pub mod raw;

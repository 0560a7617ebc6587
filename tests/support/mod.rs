//! Shared helpers for the integration tests.

pub mod bed;
pub mod proxy;
pub mod raw;

//! One integration-test crate (faster to link than one per file): real Mosquitto, real TLS.
mod cli;
mod core;
mod forward;
mod metrics;
mod support;

//! One integration-test crate (faster to link than one per file): real Mosquitto, real TLS.
//! The harness is the `testkit` crate; the `iotgw` tests live in `iotgw/tests/`.
mod cluster;
mod core;
mod forward;
mod haproxy;
mod hostile;
mod identity;
mod metrics;
mod outbox;
mod pg;
mod registry;
mod versions;

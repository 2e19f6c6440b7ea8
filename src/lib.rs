//! secure-iot-gateway: a Mosquitto plugin that authenticates every device message and forwards
//! it durably to an HTTP backend.
//!
//! # Layout
//! - [`json`]: strict JSON (no duplicate members, bounded depth) and RFC 8785 canonical form.
//! - [`envelope`]: the signed envelope of `spec/envelope.md`; the seven rejection reasons.
//! - [`replay`]: time-windowed, per-device-capped memory of accepted message ids.
//! - [`registry`]: the SQLite device registry (read-only in the plugin, hot-reloaded).
//! - [`store`]: the durable outbox, dead letters and persisted replay ids.
//! - [`forward`]: worker threads that POST to the backend with retries.
//! - [`gateway`]: the broker-thread logic tying these together, behind the [`gateway::Host`] trait.
//! - [`config`]: `plugin_opt_*` parsing and validation.
//! - `plugin` (private): the only unsafe code, the FFI shim Mosquitto calls.
//!
//! Workspace members beside this crate: `iotgw/` (the command line: PKI, registry, signing,
//! simulator, demo backend; kept out of the plugin `.so`) and `testkit/` (the one test kit:
//! envelope builder, HTTP sink, plugin options, the real-broker harness).
#![deny(unsafe_code)]

pub mod config;
pub mod envelope;
pub mod forward;
pub mod gateway;
pub mod http;
pub mod json;
pub mod pki;
// Not in the unit-test build: that build is a second copy of this crate, linked beside the
// normal one whenever a unit test uses `testkit` (which depends on the normal one), and only one
// copy may define the plugin's `#[no_mangle]` exports. The plugin has no unit tests; the
// integration tests load the real `.so`.
#[cfg(not(test))]
#[allow(unsafe_code)]
mod plugin;
pub mod registry;
pub mod replay;
pub mod store;

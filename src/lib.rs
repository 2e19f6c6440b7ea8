//! secure-iot-gateway: a Mosquitto plugin that authenticates every device message and forwards
//! it durably to an HTTP backend.
//!
//! # Layout (one owner per concern; dependencies point down this list, never up)
//! - `plugin` (private): the only unsafe code, the FFI shim Mosquitto calls. It turns broker
//!   events into calls on the [`gateway`] and implements [`host::Host`] with the broker API.
//! - [`gateway`]: the broker-thread router: data-topic publishes to the validator, accepted
//!   ones to delivery, the backend's answers back to devices as signed responses; the counters.
//! - [`validate`]: the spec's checks (envelope, identity, registry, timestamp, replay, HMAC) →
//!   `Accepted` or a rejection with its reason.
//! - [`delivery`]: everything after acceptance: the durable outbox ([`delivery::outbox`]), the
//!   lane of a device, spilling and refilling, the HTTP workers ([`delivery::workers`]),
//!   settlement of their answers and the delivery counts.
//! - [`acl`]: who a client is (certificate CN = username) and what it may read/subscribe.
//! - [`registry`]: the SQLite device registry (read-only in the plugin, hot-reloaded).
//! - [`replay`]: time-windowed, per-device-capped memory of accepted message ids.
//! - [`envelope`]: the signed envelope of `docs/envelope.md`; the rejection reasons; signing.
//! - [`json`]: strict JSON (no duplicate members, bounded depth) and RFC 8785 canonical form.
//! - [`http`]: the minimal keep-alive HTTP/1.1 client for `http://` backends.
//! - [`metrics`]: the Prometheus exporter thread (`/metrics`, `/healthz`, `/devices`), `$SYS`
//!   values and per-device counts; fed snapshots by the gateway, a leaf otherwise.
//! - [`config`]: `plugin_opt_*` parsing and validation.
//! - [`host`]: the [`host::Host`] trait, log levels and small helpers every part may use.
//! - [`pki`]: certificates for the CLI and the tests (not used by the plugin itself).
//!
//! The `iotgw` command lives in its own crate (`iotgw/`), so the plugin carries none of its
//! dependencies.
#![deny(unsafe_code)]

pub mod acl;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod gateway;
pub mod host;
pub mod http;
pub mod json;
pub mod metrics;
pub mod pki;
#[allow(unsafe_code)]
mod plugin;
pub mod registry;
pub mod replay;
pub mod validate;

//! secure-iot-gateway: a Mosquitto plugin that authenticates every device message and forwards
//! it durably to an HTTP backend.
//!
//! # Layout (one owner per concern; dependencies point down this list, never up)
//! - `plugin` (private): the FFI shim Mosquitto calls, unsafe code (as is `delivery::mapped`,
//!   and nothing else). It turns broker events into calls on the [`gateway`] and implements
//!   [`host::Host`] with the broker API.
//! - [`gateway`]: the broker-thread router: data-topic publishes to the validator, accepted
//!   ones to delivery, the backend's answers back to devices as signed responses; the counters.
//! - [`validate`]: the spec's checks (envelope, identity, registry, timestamp, replay, HMAC) →
//!   `Accepted` or a rejection with its reason.
//! - [`delivery`]: everything after acceptance: the durable outbox ([`delivery::outbox`]; its
//!   current segment is written through a file mapping, `delivery::mapped`, the one unsafe
//!   module besides `plugin`: a record costs no system call), the
//!   lane of a device, spilling and refilling, the HTTP workers ([`delivery::workers`]),
//!   settlement of their answers and the delivery counts.
//! - [`cluster`]: cluster mode: accepted ids and session starts shared with the other nodes
//!   through Redis, and the claim a worker makes before forwarding (a leaf: called by gateway
//!   and delivery).
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
//! - `plugin` (private, not in unit-test builds): the FFI shim Mosquitto calls (listed first
//!   above for the direction of flow).
//!
//! Workspace members beside this crate: `iotgw/` (the command line: PKI, registry, signing,
//! simulator, demo backend; kept out of the plugin `.so`) and `testkit/` (the one test kit:
//! envelope builder, HTTP sink, plugin options, the real-broker harness).
#![deny(unsafe_code)]

pub mod acl;
pub mod background;
pub mod cluster;
pub mod config;
pub mod crl;
pub mod delivery;
pub mod envelope;
pub mod fasthash;
pub mod gateway;
pub mod host;
pub mod http;
pub mod json;
pub mod loglimit;
pub mod metrics;
pub mod pki;
// Not in the unit-test build: that build is a second copy of this crate, linked beside the
// normal one whenever a unit test uses `testkit` (which depends on the normal one), and only one
// copy may define the plugin's `#[no_mangle]` exports. Its unit tests are its clock's
// (`wake`, below); the integration tests load the real `.so`.
#[cfg(not(test))]
#[allow(unsafe_code)]
mod plugin;
pub mod registry;
pub mod replay;
pub mod validate;
// The plugin's clock has no exports, so its own unit tests run in that build.
#[cfg(test)]
#[allow(unsafe_code, dead_code)]
#[path = "plugin/wake.rs"]
mod wake;

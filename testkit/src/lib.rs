//! The one test kit of secure-iot-gateway, shared by the core's unit tests, the integration
//! tests, the benches, the `iotgw` tests and the load generator:
//! - [`signed`]: a signed envelope, built on the core's own `envelope::sign_members`;
//! - [`Sink`]: a loopback HTTP(S) backend with scripted statuses that records what it received;
//! - [`PluginOpts`]: `plugin_opt_*` settings, as pairs for `Config::from_opts` or as
//!   `mosquitto.conf` lines;
//! - [`Postgres`]: a throw-away PostgreSQL server (the PostgreSQL registry's tests);
//! - [`Port`]: a loopback port held from the moment it is chosen until the test ends;
//! - [`Env`], [`Broker`], [`Mqtt`]: a real Mosquitto with the built plugin behind real mutual TLS;
//! - [`Node`], [`start_nodes`]: several such brokers of one cluster, each restartable in place;
//! - [`Haproxy`]: a real HAProxy in TCP mode (TLS passthrough) with health checks on `/healthz`;
//! - [`Redis`]: a real `redis-server` without persistence, stoppable for outages.
//!
//! The core's unit tests are compiled as a second copy of the core crate, so everything they use
//! from here takes and returns std types only (bytes, strings, pairs of strings).

mod broker;
mod haproxy;
mod node;
mod opts;
mod pg;
mod port;
mod redis;
mod sink;

pub use broker::{
    iotgw_path, mosquitto_bin, plugin_path, rejected_with, start_expect_failure, write_conf, Ack,
    Broker, ConnectError, ConnectOpts, Env, Mqtt,
};
pub use haproxy::{haproxy_bin, Haproxy, Upstream, BACKEND};
pub use node::{http_get, start_nodes, upstreams, Immutable, Node};
pub use opts::PluginOpts;
pub use pg::Postgres;
pub use port::Port;
pub use redis::{redis_bin, resp_command, Redis, Reply};
pub use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
pub use sink::{sink_url, Req, Sink};

use secure_iot_gateway::json::Json;

/// Kills a server this kit started (SIGKILL) and reaps it; nothing if it is not running.
fn kill_and_reap(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The devices every [`Env`] registers, with their secrets.
pub const SECRETS: [(&str, &str); 3] = [
    ("sensor_001", "supersecretkey123"),
    ("sensor_002", "anothersecretkey456"),
    ("sensor_003", "yetanothersecret789"),
];

/// The secret [`Env`] registered for `device`; a fixed one nobody registered otherwise.
pub fn secret_of(device: &str) -> &'static str {
    SECRETS.iter().find(|(d, _)| *d == device).map(|(_, s)| *s).unwrap_or("unregistered-secret")
}

/// A signed envelope: `payload` is JSON text, signed with `secret` for `device`.
///
/// Panics if `payload` is not JSON: a test that wants malformed input writes the bytes itself.
pub fn signed(secret: &str, device: &str, ts: i64, mid: &str, payload: &str) -> Vec<u8> {
    let value = serde_json::from_str(payload)
        .unwrap_or_else(|e| panic!("test payload is not JSON ({e}): {payload}"));
    let members = vec![
        ("device_id".to_string(), Json::String(device.into())),
        ("timestamp".to_string(), Json::Number(ts.into())),
        ("message_id".to_string(), Json::String(mid.into())),
        ("payload".to_string(), Json::from_value(value)),
    ];
    secure_iot_gateway::envelope::sign_members(secret.as_bytes(), &members).into_bytes()
}

/// A signed envelope for one of the [`SECRETS`] devices, with its registered secret.
pub fn signed_as(device: &str, ts: i64, mid: &str, payload: &str) -> Vec<u8> {
    signed(secret_of(device), device, ts, mid, payload)
}

/// Unix time in seconds, as the envelope's `timestamp` carries it.
pub fn now() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    d.as_secs() as i64
}

/// A fresh random message id.
pub fn uid() -> String {
    secure_iot_gateway::envelope::uuid_v4()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secure_iot_gateway::envelope::{self, Envelope};

    #[test]
    fn signed_envelopes_verify_with_their_secret_only() {
        let m = signed("s3cret", "sensor_001", 1_700_000_000, "m-1", r#"{"t":22.5,"h":60}"#);
        let e = Envelope::parse(&m, 65536).unwrap();
        assert!(envelope::verify(b"s3cret", &e.canonical(), &e.signature));
        assert!(!envelope::verify(b"other", &e.canonical(), &e.signature));
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(
            (&v["device_id"], &v["timestamp"], &v["message_id"], &v["payload"]["h"]),
            (
                &serde_json::json!("sensor_001"),
                &serde_json::json!(1_700_000_000),
                &serde_json::json!("m-1"),
                &serde_json::json!(60)
            )
        );
        assert_eq!(
            signed_as("sensor_002", 1, "x", "{}"),
            signed(SECRETS[1].1, "sensor_002", 1, "x", "{}")
        );
    }
}

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

/// Starts a server this kit runs: stdin closed, stdout and stderr appended to `log_path` (so a
/// restart keeps the earlier run's lines). `what` names it, and how to get it, if it cannot run.
fn spawn_logged(
    cmd: &mut std::process::Command,
    log_path: &std::path::Path,
    what: &str,
) -> std::process::Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).unwrap();
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

/// How a server this kit starts is watched while it starts: its process, whether it answers
/// yet (`Err`: what it said instead), and what to show when it does not.
struct Starting<S> {
    what: &'static str,
    within: std::time::Duration,
    every: std::time::Duration,
    child: fn(&mut S) -> &mut Option<std::process::Child>,
    ready: fn(&S) -> Result<(), String>,
    log: fn(&S) -> String,
}

impl<S> Starting<S> {
    /// Polls until the server is ready. Panics, with its log, if its process exits first (the
    /// child is then taken: nothing is left to kill) or if it is not ready in time.
    fn wait(&self, server: &mut S) {
        let deadline = std::time::Instant::now() + self.within;
        loop {
            let child = (self.child)(server);
            let exited = child.as_mut().and_then(|c| c.try_wait().unwrap());
            if let Some(status) = exited {
                *child = None;
                panic!(
                    "{} exited during start-up ({status}); log:\n{}",
                    self.what,
                    (self.log)(server)
                );
            }
            let last = match (self.ready)(server) {
                Ok(()) => return,
                Err(e) => e,
            };
            assert!(
                std::time::Instant::now() < deadline,
                "{} not ready within {:?} ({last}); log:\n{}",
                self.what,
                self.within,
                (self.log)(server)
            );
            std::thread::sleep(self.every);
        }
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
    use std::time::Duration;

    /// A stand-in server: a shell command, ready after `polls` probes.
    struct Fake {
        child: Option<std::process::Child>,
        polls: std::cell::Cell<u32>,
        ready_after: u32,
    }

    fn fake(script: &str, ready_after: u32) -> Fake {
        let child = std::process::Command::new("sh").args(["-c", script]).spawn().unwrap();
        Fake { child: Some(child), polls: 0.into(), ready_after }
    }

    fn starting(within: Duration) -> Starting<Fake> {
        Starting {
            what: "fake",
            within,
            every: Duration::from_millis(20),
            child: |f: &mut Fake| &mut f.child,
            ready: |f| {
                f.polls.set(f.polls.get() + 1);
                if f.polls.get() > f.ready_after {
                    Ok(())
                } else {
                    Err(format!("poll {}", f.polls.get()))
                }
            },
            log: |_| "the fake's log".into(),
        }
    }

    fn panic_text(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let e = std::panic::catch_unwind(f).expect_err("should have panicked");
        e.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    #[test]
    fn a_server_is_waited_for_until_ready_and_one_that_dies_or_hangs_is_reported_with_its_log() {
        // Ready on the third probe: returns, the process still running.
        let mut f = fake("sleep 5", 2);
        starting(Duration::from_secs(5)).wait(&mut f);
        assert_eq!(f.polls.get(), 3);
        kill_and_reap(&mut f.child);
        // Exits during start-up: said at once, with the log, and nothing left to kill.
        let text = panic_text(|| {
            let mut f = fake("exit 3", u32::MAX);
            std::thread::sleep(Duration::from_millis(200));
            starting(Duration::from_secs(5)).wait(&mut f);
        });
        assert!(text.contains("fake exited during start-up"), "{text}");
        assert!(text.contains("the fake's log"), "{text}");
        // Never ready: the deadline, with the last answer and the log.
        let mut f = fake("sleep 5", u32::MAX);
        let text = panic_text(std::panic::AssertUnwindSafe(|| {
            starting(Duration::from_millis(100)).wait(&mut f)
        }));
        kill_and_reap(&mut f.child);
        assert!(text.contains("fake not ready within 100ms (poll "), "{text}");
        assert!(text.contains("the fake's log"), "{text}");
    }

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

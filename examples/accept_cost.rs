//! Deterministic per-message cost of the broker thread's accept path, for valgrind (issue 9).
//!   accept_cost PROCESS [validate|forward|malformed|fields]
//! Pre-signs `TOTAL` envelopes of ~235 bytes (the shape `bench_envelopes` makes) for the three
//! test devices, then passes the first PROCESS of them through `Gateway::on_write`, each one
//! accepted. Signing happens for every run, so the difference between two runs with different
//! PROCESS counts is the accept path alone:
//!   valgrind --tool=callgrind   (instructions: `summary` of run B - run A, / (B - A))
//!   valgrind --tool=memcheck    (allocations: "total heap usage" of run B - run A, / (B - A))
//! `malformed` and `fields` send, instead, PROCESS copies of the `reject_malformed` and
//! `reject_required_fields` messages of `benches/validate.rs` (each refused).
use secure_iot_gateway::acl::Identity;
use secure_iot_gateway::config::Config;
use secure_iot_gateway::gateway::{Gateway, Outcome};
use secure_iot_gateway::host::{Host, Level};
use std::sync::Arc;

/// Envelopes signed by every run (the larger of the two PROCESS counts compared).
const TOTAL: usize = 12_000;

struct Quiet;
impl Host for Quiet {
    fn log(&mut self, _: Level, m: &str) {
        if !m.contains("rejected reason=") {
            eprintln!("{m}");
        }
    }
    fn kick(&mut self, _: &str) {}
    fn publish(&mut self, _: &str, _: &[u8]) -> bool {
        true
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let process: usize = a.get(1).and_then(|s| s.parse().ok()).expect("PROCESS count");
    let mode = a.get(2).map_or("validate", String::as_str);
    let forward = mode == "forward";
    assert!(process <= TOTAL);
    // A fixed time: runs compare equal (the id digests and record contents do not vary).
    let now = 1_767_225_600;
    let devices = testkit::SECRETS.map(|(d, _)| d);
    let msgs: Vec<(&str, String, Vec<u8>)> = (0..TOTAL)
        .map(|n| {
            let d = devices[n % devices.len()];
            let payload = format!(r#"{{"temperature":21.5,"humidity":48.25,"seq":{n}}}"#);
            let mid = format!("8c3e11f2-0000-4000-8000-{n:012}");
            (d, format!("device/{d}/data"), testkit::signed_as(d, now, &mid, &payload))
        })
        .collect();

    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("devices.db");
    let c = rusqlite::Connection::open(&db).expect("sqlite");
    secure_iot_gateway::registry::create(&c).expect("schema");
    for (d, s) in testkit::SECRETS {
        c.execute(
            "INSERT INTO devices (device_id, shared_secret, created_at) VALUES (?1, ?2, 0)",
            [d, s],
        )
        .expect("insert");
    }
    // Port 9 (discard) refuses: forwarded messages stay pending, which is the broker thread's
    // cost that matters here (the workers' retries are other threads).
    let backend = if forward { "http://127.0.0.1:9/device/{device_id}/data" } else { "none" };
    let opts = testkit::PluginOpts::new()
        .set("db_path", db.display())
        .set("spool_path", dir.path().join("outbox").display())
        .set("backend_url", backend)
        .set("replay_cache_size", 1_000_000)
        .set("timestamp_tolerance", 300);
    let cfg = Config::from_opts(opts.iter()).expect("config");
    let mut host = Quiet;
    let mut gw = Gateway::start(cfg, Arc::new(|| {}), &mut host).expect("gateway");
    let refused: &[u8] = match mode {
        "malformed" => b"{\"device_id\": \"sensor_001\", ",
        "fields" => br#"{"device_id":"sensor_001","timestamp":1}"#,
        _ => b"",
    };
    for (d, topic, m) in &msgs[..process] {
        if refused.is_empty() {
            let v = gw.on_write(&mut host, Identity::Device(d), topic.as_bytes(), m, now);
            assert_eq!(v, Outcome::Accepted);
        } else {
            let t = "device/sensor_001/data".as_bytes();
            let v = gw.on_write(&mut host, Identity::Device("sensor_001"), t, refused, now);
            assert!(matches!(v, Outcome::Refused(_)));
        }
    }
    println!("{mode}: {process} messages (envelopes of {} bytes)", msgs[0].2.len());
    gw.shutdown(&mut host);
}

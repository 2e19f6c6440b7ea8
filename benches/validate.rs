//! Per-message cost of the work the broker thread does, without a broker:
//! - `parse_verify`: strict parse + canonical form + HMAC verify of a ~300-byte envelope;
//! - `read_envelope` and `hmac_key`: its two parts as the broker thread runs them (reused
//!   working memory; the secret's key schedule done once, as the registry keeps it);
//! - `accept_validate_only`: the whole ACL WRITE path with forwarding off (checks, replay
//!   record, the durable seen-id commit);
//! - `accept_with_outbox`: the same with forwarding on (outbox row + seen id in one commit,
//!   hand-off to a worker lane);
//! - `accept_with_metrics`: `accept_validate_only` with the exporter on (per-device counts);
//! - `metrics_hooks`: only what the metrics add per accepted message (sampled timer, per-device
//!   count), which the accept figures are too noisy to resolve.
//! - `reject_<reason>`: the ACL WRITE path for a message refused for each reason (forwarding
//!   off), `reject_unknown_device` being the registry miss (a valid envelope from a device that
//!   is not registered).
//!
//! Run: `cargo bench --bench validate`.

use criterion::{criterion_group, criterion_main, Criterion};
use secure_iot_gateway::acl::Identity;
use secure_iot_gateway::config::Config;
use secure_iot_gateway::envelope::{self, Envelope, Reason};
use secure_iot_gateway::gateway::Refusal;
use secure_iot_gateway::gateway::{Gateway, Outcome};
use secure_iot_gateway::host::{unix_now, Host, Level};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Quiet;
impl Host for Quiet {
    fn log(&mut self, _: Level, _: &str) {}
    fn kick(&mut self, _: &str) {}
    fn publish(&mut self, _: &str, _: &[u8]) -> bool {
        true
    }
}

const DEVICES: usize = 1000;

fn device(i: usize) -> String {
    format!("sensor_{i:05}")
}

fn envelope_for(i: u64, now: i64) -> Vec<u8> {
    let d = device(i as usize % DEVICES);
    let payload = format!(
        r#"{{"temperature": 22.5, "humidity": 60, "pressure": 1013.25, "battery": 87, "seq": {i}}}"#
    );
    let mid = format!("550e8400-e29b-41d4-a716-{i:012}");
    testkit::signed(&format!("secret-of-{d}"), &d, now, &mid, &payload)
}

fn gateway(dir: &std::path::Path, backend: &str, metrics: Option<String>) -> Gateway {
    gateway_with(dir, backend, metrics, &[])
}

fn gateway_with(
    dir: &std::path::Path,
    backend: &str,
    metrics: Option<String>,
    extra: &[(&str, &str)],
) -> Gateway {
    let db = dir.join("devices.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    secure_iot_gateway::registry::create(&c).unwrap();
    for i in 0..DEVICES {
        let d = device(i);
        c.execute(
            "INSERT INTO devices (device_id, shared_secret, created_at) VALUES (?1, ?2, 0)",
            [&d, &format!("secret-of-{d}")],
        )
        .unwrap();
    }
    let mut opts = testkit::PluginOpts::new()
        .set("db_path", db.display())
        .set("spool_path", dir.join("outbox").display())
        .set("backend_url", backend)
        .set("replay_cache_size", 10_000_000)
        .set("spool_max_bytes", 64u64 << 30);
    if let Some(m) = metrics {
        opts = opts.set("metrics_listen", m);
    }
    let opts = extra.iter().fold(opts, |o, (k, v)| o.set(k, v));
    let cfg = Config::from_opts(opts.iter()).unwrap();
    Gateway::start(cfg, Arc::new(|| {}), &mut Quiet).unwrap()
}

fn bench(c: &mut Criterion) {
    let now = unix_now();
    let sample = envelope_for(7, now);
    println!("envelope size: {} bytes", sample.len());
    c.bench_function("parse_verify", |b| {
        let mut buf = Vec::with_capacity(512);
        b.iter(|| {
            let e = Envelope::parse(&sample, 65536).unwrap();
            buf.clear();
            e.write_canonical(&mut buf);
            assert!(envelope::verify(b"secret-of-sensor_00007", &buf, &e.signature));
        })
    });

    c.bench_function("read_envelope", |b| {
        let mut scratch = envelope::Scratch::default();
        b.iter(|| {
            let e = Envelope::parse_with(&sample, 65536, &mut scratch).unwrap();
            e.recycle(&mut scratch);
        })
    });
    c.bench_function("hmac_key", |b| {
        let e = Envelope::parse(&sample, 65536).unwrap();
        let key = envelope::Key::new(b"secret-of-sensor_00007".to_vec().into_boxed_slice());
        b.iter(|| assert!(key.verify(e.signed_bytes(), &e.signature)))
    });

    let mut counter = 0u64;
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for (name, backend, metrics) in [
        ("accept_validate_only", "none", None),
        ("accept_with_outbox", "http://127.0.0.1:9/device/{device_id}/data", None),
        ("accept_with_metrics", "none", Some(free_port().to_string())),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut gw = gateway(dir.path(), backend, metrics);
        let mut host = Quiet;
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // Fresh, unique, signed messages are made outside the timed region.
                let msgs: Vec<(String, Vec<u8>)> = (0..iters)
                    .map(|_| {
                        counter += 1;
                        (device(counter as usize % DEVICES), envelope_for(counter, now))
                    })
                    .collect();
                let start = Instant::now();
                for (dev, m) in &msgs {
                    let topic = format!("device/{dev}/data");
                    let v = gw.on_write(&mut host, Identity::Device(dev), topic.as_bytes(), m, now);
                    debug_assert_eq!(v, Outcome::Accepted);
                }
                start.elapsed()
            })
        });
        assert_eq!(
            gw.stats().rejected.iter().sum::<u64>(),
            0,
            "{name}: every benchmark message must be accepted"
        );
        gw.shutdown(&mut host);
    }

    // The metrics' own per-message work, on 1000 registered devices.
    let mut monitor = secure_iot_gateway::metrics::Monitor::new(None, 0);
    let mut table = secure_iot_gateway::metrics::DeviceTable::default();
    let names: Vec<String> = (0..DEVICES).map(device).collect();
    let mut i = 0usize;
    c.bench_function("metrics_hooks", |b| {
        b.iter(|| {
            i = (i + 1) % DEVICES;
            let t = monitor.start_timer();
            monitor.stop_timer(t);
            table.accepted(&names[i], now, true);
        })
    });

    // Each refusal: one message that fails exactly that check, repeated (a refusal records
    // nothing, so the same message is refused the same way every time).
    let dev = device(7);
    let other = device(8);
    let secret = format!("secret-of-{dev}");
    let mid = "550e8400-e29b-41d4-a716-000000000001";
    let p =
        r#"{"temperature": 22.5, "humidity": 60, "pressure": 1013.25, "battery": 87, "seq": 1}"#;
    let cases: Vec<(Reason, &str, String, Vec<u8>)> = vec![
        (Reason::Malformed, "", dev.clone(), b"{\"device_id\": \"sensor_00007\", ".to_vec()),
        (
            Reason::RequiredFields,
            "",
            dev.clone(),
            br#"{"device_id":"sensor_00007","timestamp":1}"#.to_vec(),
        ),
        (Reason::Identity, "", other.clone(), testkit::signed(&secret, &dev, now, mid, p)),
        (
            Reason::UnknownDevice,
            "",
            "sensor_99999".into(),
            testkit::signed("secret-of-sensor_99999", "sensor_99999", now, mid, p),
        ),
        (Reason::RateLimited, "rate", dev.clone(), testkit::signed(&secret, &dev, now, mid, p)),
        (Reason::Timestamp, "", dev.clone(), testkit::signed(&secret, &dev, now - 10_000, mid, p)),
        (Reason::Replay, "replay", dev.clone(), testkit::signed(&secret, &dev, now, mid, p)),
        (
            Reason::Signature,
            "",
            dev.clone(),
            testkit::signed("not-the-secret-0123", &dev, now, mid, p),
        ),
    ];
    for (reason, setup, who, m) in cases {
        let dir = tempfile::tempdir().unwrap();
        let extra: &[(&str, &str)] =
            if setup == "rate" { &[("rate_limit", "1"), ("rate_burst", "1")] } else { &[] };
        let mut gw = gateway_with(dir.path(), "none", None, extra);
        let mut host = Quiet;
        let topic = format!("device/{who}/data");
        if setup == "rate" || setup == "replay" {
            // Spend the one token / record the id: accepted once, refused from then on.
            let first = gw.on_write(&mut host, Identity::Device(&who), topic.as_bytes(), &m, now);
            assert_eq!(first, Outcome::Accepted, "{reason:?} setup");
        }
        let v = gw.on_write(&mut host, Identity::Device(&who), topic.as_bytes(), &m, now);
        assert_eq!(v, Outcome::Refused(Refusal::Check(reason)), "the {reason:?} case");
        c.bench_function(&format!("reject_{}", reason.as_str()), |b| {
            b.iter(|| gw.on_write(&mut host, Identity::Device(&who), topic.as_bytes(), &m, now))
        });
        gw.shutdown(&mut host);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);

//! Observability against a real broker with real mutual TLS: `/metrics` after known traffic,
//! `/healthz`, `/devices`, `$SYS`, the `metrics_listen` start-up check, and the monitoring files.
//!
//! Values are read from `/metrics` (or `$SYS`), never from the broker log.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::*;

/// One HTTP/1.1 GET with `Connection: close`: (status, content type, body).
pub(crate) fn get(port: u16, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("cannot connect to the exporter on {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {raw:?}"));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    let ctype =
        head.lines().find_map(|l| l.strip_prefix("Content-Type: ")).unwrap_or_default().to_string();
    (status, ctype, body.to_string())
}

/// Every sample of a scrape, by its full name with labels (e.g. `a_total{reason="x"}`).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
            (name.to_string(), value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

/// Scrapes until `want` holds (the exporter's snapshot is at most 250 ms old), bounded.
fn scrape_until(
    broker: &Broker,
    port: u16,
    what: &str,
    want: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, body) = get(port, "/metrics");
        // Before the broker thread's first snapshot the exporter answers 503 "starting".
        if code == 200 {
            let m = samples(&body);
            if want(&m) {
                return m;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within 15 s; last scrape:\n{body}\nbroker log:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metrics_opts(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn start_with(env: &Env, extra: &[(&str, String)]) -> (Broker, u16) {
    // Held until the broker has bound it (the plugin's listener may share a reserved port).
    let mport = Port::reserve();
    let mut opts = PluginOpts::new().set("metrics_listen", metrics_opts(mport.get()));
    for (k, v) in extra {
        opts = opts.set(k, v);
    }
    (Broker::start(env, &opts), mport.get())
}

fn publish_expect(dev: &mut Mqtt, device: &str, payload: &[u8], ok: bool, broker: &Broker) {
    let ack = dev.publish(&format!("device/{device}/data"), 1, false, payload);
    if ok {
        assert!(ack.is_ok(), "{device}: expected acceptance, got {ack:?}; log:\n{}", broker.log());
    } else {
        assert!(ack.is_not_authorized(), "{device}: expected 0x87, got {ack:?}; {}", broker.log());
    }
}

const REASONS: [&str; 10] = [
    "malformed",
    "required_fields",
    "identity",
    "unknown_device",
    "rate_limited",
    "timestamp",
    "replay",
    "signature",
    "outbox_full",
    "outbox_error",
];

/// The ids of a device that stopped sending are forgotten by the tick once their window closes
/// (a check only forgets its own device's, a bounded share at a time), and an id is new again
/// after its window and not before.
#[test]
fn replay_ids_of_a_quiet_device_are_forgotten_after_their_window() {
    let env = Env::new();
    let (broker, mport) =
        start_with(&env, &[("backend_url", "none".into()), ("timestamp_tolerance", "3".into())]);
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let t = now();
    let ids: Vec<String> = (0..20).map(|_| uid()).collect();
    for id in &ids {
        publish_expect(
            &mut dev,
            "sensor_001",
            &signed_as("sensor_001", t, id, "{}"),
            true,
            &broker,
        );
    }
    // Positive control: inside the window the ids are remembered, and a reused one is refused.
    publish_expect(
        &mut dev,
        "sensor_001",
        &signed_as("sensor_001", now(), &ids[0], "{\"n\":1}"),
        false,
        &broker,
    );
    scrape_until(&broker, mport, "20 ids remembered", |m| m.get("iotgw_replay_ids") == Some(&20.0));
    // Nothing is sent any more: only the tick can forget them, once `now > t + 3`.
    let m = scrape_until(&broker, mport, "every id forgotten", |m| {
        m.get("iotgw_replay_ids") == Some(&0.0)
    });
    assert!(now() > t + 3, "forgotten inside their window; scrape:\n{m:#?}");
    publish_expect(
        &mut dev,
        "sensor_001",
        &signed_as("sensor_001", now(), &ids[0], "{\"n\":2}"),
        true,
        &broker,
    );
}

#[test]
fn metrics_count_known_traffic_exactly_in_the_prometheus_text_format() {
    let env = Env::new();
    let sink = Sink::start();
    let (broker, mport) = start_with(&env, &[("backend_url", sink.url())]);
    let mut s1 = Mqtt::connect(&env, broker.port, "sensor_001");
    let mut s2 = Mqtt::connect(&env, broker.port, "sensor_002");
    let mut rogue = Mqtt::connect(&env, broker.port, "sensor_404");
    let t = now();
    let dup = signed_as("sensor_001", t, &uid(), "{}");
    publish_expect(&mut s1, "sensor_001", &dup, true, &broker);
    for _ in 0..2 {
        publish_expect(
            &mut s1,
            "sensor_001",
            &signed_as("sensor_001", t, &uid(), "{}"),
            true,
            &broker,
        );
    }
    publish_expect(&mut s1, "sensor_001", &dup, false, &broker); // replay
    let tampered = String::from_utf8(signed_as("sensor_001", t, &uid(), r#"{"v":1}"#))
        .unwrap()
        .replace("\"v\":1", "\"v\":2");
    publish_expect(&mut s1, "sensor_001", tampered.as_bytes(), false, &broker); // signature
    publish_expect(
        &mut s2,
        "sensor_002",
        &signed_as("sensor_002", t - 600, &uid(), "{}"),
        false,
        &broker,
    );
    publish_expect(&mut s2, "sensor_002", b"not json", false, &broker); // malformed
    publish_expect(
        &mut rogue,
        "sensor_404",
        &signed_as("sensor_404", t, &uid(), "{}"),
        false,
        &broker,
    );

    assert_eq!(sink.wait_for(3, Duration::from_secs(10)).len(), 3, "{}", broker.log());
    // The snapshot may predate the last publish by up to 250 ms: wait for the last one
    // (unknown_device) too.
    let m = scrape_until(&broker, mport, "3 delivered, 3 responses, the last rejection", |m| {
        m.get("iotgw_forward_delivered_total") == Some(&3.0)
            && m.get("iotgw_responses_published_total") == Some(&3.0)
            && m.get("iotgw_messages_rejected_total{reason=\"unknown_device\"}") == Some(&1.0)
    });
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for r in REASONS {
        let n = match r {
            "replay" | "signature" | "timestamp" | "malformed" | "unknown_device" => 1.0,
            _ => 0.0,
        };
        want.insert(format!("iotgw_messages_rejected_total{{reason=\"{r}\"}}"), n);
    }
    for (k, v) in [
        ("iotgw_messages_accepted_total", 3.0),
        ("iotgw_forward_delivered_total", 3.0),
        ("iotgw_forward_retries_total", 0.0),
        ("iotgw_forward_dead_letters_total", 0.0),
        ("iotgw_responses_published_total", 3.0),
        ("iotgw_outbox_pending_messages", 0.0),
        ("iotgw_outbox_pending_bytes", 0.0),
        ("iotgw_outbox_oldest_pending_age_seconds", 0.0),
        ("iotgw_registry_devices", 3.0),
        ("iotgw_replay_ids", 3.0),
        ("iotgw_backend_request_duration_seconds_count", 3.0),
        ("iotgw_backend_request_duration_seconds_bucket{le=\"+Inf\"}", 3.0),
    ] {
        want.insert(k.to_string(), v);
    }
    for (k, v) in &want {
        assert_eq!(m.get(k), Some(v), "{k}; scrape:\n{m:#?}");
    }
    // Exactly one series per reason: nothing else under that name.
    let reasons = m.keys().filter(|k| k.starts_with("iotgw_messages_rejected_total")).count();
    assert_eq!(reasons, REASONS.len());
    // Validation is timed for 1 message in 16: 8 data messages here may give 0 observations,
    // but the family is served with every bucket.
    assert!(m.contains_key("iotgw_validation_duration_seconds_bucket{le=\"+Inf\"}"));

    let (code, ctype, body) = get(mport, "/metrics");
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    // HELP and TYPE for every family, before its samples.
    let mut typed = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(body.contains(&format!("# HELP {name} ")), "no HELP for {name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} must end in _total");
            }
            typed.insert(name.to_string());
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "sample {name} before its TYPE");
        }
    }
    if let Some(out) = promtool(&["check", "metrics"], Some(&body)) {
        assert!(
            out.status.success(),
            "promtool check metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn pending_and_devices_reflect_each_registered_device_only() {
    let env = Env::new();
    // Nothing listens on the backend port (reserved, never bound): every accepted message stays
    // pending.
    let down = Port::reserve();
    let (broker, mport) = start_with(
        &env,
        &[("backend_url", sink_url(down.get())), ("http_timeout_ms", "500".into())],
    );
    let mut s1 = Mqtt::connect(&env, broker.port, "sensor_001");
    let mut s2 = Mqtt::connect(&env, broker.port, "sensor_002");
    let t = now();
    for _ in 0..2 {
        publish_expect(
            &mut s1,
            "sensor_001",
            &signed_as("sensor_001", t, &uid(), "{}"),
            true,
            &broker,
        );
        let bad = signed("wrong-secret", "sensor_002", t, &uid(), "{}");
        publish_expect(&mut s2, "sensor_002", &bad, false, &broker);
    }
    // A flood of unregistered certificate names must not grow the device table.
    for i in 0..5 {
        let name = format!("random_{i}_{}", uid());
        let mut r = Mqtt::connect(&env, broker.port, &name);
        publish_expect(&mut r, &name, b"not json", false, &broker);
    }
    // The snapshot may predate the last publishes by up to 250 ms: wait for all of them.
    let m = scrape_until(&broker, mport, "2 pending, a retry, 5 malformed", |m| {
        m.get("iotgw_outbox_pending_messages") == Some(&2.0)
            && m.get("iotgw_forward_retries_total").is_some_and(|r| *r >= 1.0)
            && m.get("iotgw_messages_rejected_total{reason=\"malformed\"}") == Some(&5.0)
    });
    assert!(m["iotgw_outbox_pending_bytes"] > 0.0, "{m:#?}");
    assert_eq!(m["iotgw_devices_tracked"], 2.0, "only the two registered publishers: {m:#?}");
    assert!(m["iotgw_outbox_oldest_pending_age_seconds"] >= 0.0);
    assert_eq!(m["iotgw_messages_rejected_total{reason=\"signature\"}"], 2.0);
    assert_eq!(m["iotgw_messages_rejected_total{reason=\"unknown_device\"}"], 0.0);

    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let (code, ctype, body) = get(mport, "/devices");
        assert_eq!((code, ctype.as_str()), (200, "application/json"), "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["devices"][1]["rejected"]["signature"] == 2 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let devices = v["devices"].as_array().unwrap();
    let ids: Vec<&str> = devices.iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sensor_001", "sensor_002", "sensor_003"], "registered devices only: {v:#}");
    let (d1, d2, d3) = (&devices[0], &devices[1], &devices[2]);
    assert_eq!((d1["accepted"].as_u64(), d1["pending"].as_u64()), (Some(2), Some(2)), "{v:#}");
    assert_eq!(d1["rejected"], serde_json::json!({}));
    assert!(d1["last_seen"].as_i64().is_some_and(|s| (s - t).abs() <= 5), "{v:#}");
    assert_eq!(d2["accepted"], 0);
    assert_eq!(d2["rejected"], serde_json::json!({"signature": 2}), "{v:#}");
    assert_eq!(d2["last_rejection"]["reason"], "signature");
    assert!(d2["last_rejection"]["at"].as_i64().is_some_and(|s| (s - t).abs() <= 5));
    assert_eq!(d3["last_seen"], serde_json::Value::Null, "registered, never seen: {v:#}");
    assert_eq!(d3["last_rejection"], serde_json::Value::Null);
}

pub(crate) fn wait_health(broker: &Broker, port: u16, code: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (c, _, body) = get(port, "/healthz");
        if c == code {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {c} ({body:?}), wanted {code}; log:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn healthz_turns_503_while_the_registry_is_unreadable() {
    let env = Env::new();
    let (broker, mport) = start_with(&env, &[]);
    wait_health(&broker, mport, 200);
    let db = env.path().join("devices.db");
    let saved = env.path().join("devices.db.good");
    std::fs::rename(&db, &saved).unwrap();
    std::fs::write(&db, b"this is not an SQLite database").unwrap();
    let body = wait_health(&broker, mport, 503);
    assert!(body.contains("registry unreadable"), "{body}");
    let m = samples(&get(mport, "/metrics").2);
    assert_eq!(m.get("iotgw_registry_stale"), Some(&1.0));
    // Readable again: healthy again, and the metric says so.
    std::fs::rename(&saved, &db).unwrap();
    wait_health(&broker, mport, 200);
    let m = samples(&get(mport, "/metrics").2);
    assert_eq!(m.get("iotgw_registry_stale"), Some(&0.0));
}

#[test]
fn healthz_turns_503_while_the_outbox_directory_is_unwritable() {
    let env = Env::new();
    let (broker, mport) = start_with(&env, &[]);
    let body = wait_health(&broker, mport, 200);
    assert!(body.starts_with("ok: registry loaded (3 devices)"), "{body}");
    assert_eq!(body.lines().count(), 1);
    let outbox = env.path().join("outbox");
    {
        let _frozen = Immutable::set(&outbox);
        let body = wait_health(&broker, mport, 503);
        assert!(body.contains("not writable"), "{body}");
        assert!(body.contains(&outbox.display().to_string()), "names the directory: {body}");
    }
    // Writable again: healthy again.
    wait_health(&broker, mport, 200);
    // Unknown paths are 404, not a health answer.
    assert_eq!(get(mport, "/nope").0, 404);
}

#[test]
fn sys_topics_carry_the_counts() {
    let env = Env::new();
    // The broker's own acl_file decides who reads $SYS: grant the monitor the gateway's topics.
    std::fs::write(
        env.path().join("acl"),
        "user monitor\ntopic read device/#\ntopic read $SYS/broker/secure-iot-gateway/#\n",
    )
    .unwrap();
    let broker = Broker::start(&env, &PluginOpts::new().set("sys_interval", 1));
    let mut monitor = Mqtt::connect(&env, broker.port, "monitor");
    monitor.subscribe("$SYS/broker/secure-iot-gateway/#", 1);
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let m = signed_as("sensor_001", now(), &uid(), "{}");
    publish_expect(&mut dev, "sensor_001", &m, true, &broker);
    publish_expect(&mut dev, "sensor_001", &m, false, &broker);
    let want = [
        ("messages/accepted", "1"),
        ("messages/rejected/replay", "1"),
        ("messages/rejected/signature", "0"),
        ("messages/rejected/outbox_full", "0"),
        ("outbox/pending", "0"),
        ("forward/delivered", "0"),
        ("registry/devices", "3"),
    ];
    let mut latest: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some((topic, payload)) = monitor.next_message(Duration::from_millis(500)) {
            if let Some(t) = topic.strip_prefix("$SYS/broker/secure-iot-gateway/") {
                latest.insert(t.to_string(), String::from_utf8_lossy(&payload).into_owned());
            }
        }
        if want.iter().all(|(t, v)| latest.get(*t).map(String::as_str) == Some(*v)) {
            break;
        }
    }
    for (t, v) in want {
        assert_eq!(latest.get(t).map(String::as_str), Some(v), "{t}; got {latest:#?}");
    }
    // A device is kept to its own response topic: it may not read the gateway's $SYS values.
    let mut other = Mqtt::connect(&env, broker.port, "sensor_002");
    let code = other.subscribe("$SYS/broker/secure-iot-gateway/#", 1);
    assert!(!matches!(code, SubscribeReasonCode::Success(_)), "{code:?}");
}

#[test]
fn a_bad_or_taken_metrics_listen_refuses_to_start_with_one_line_naming_it() {
    let env = Env::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    for (value, expect) in [
        ("nonsense".to_string(), "must be IP:PORT".to_string()),
        ("127.0.0.1:0".to_string(), "must be IP:PORT".to_string()),
        (taken_addr.clone(), "in use".to_string()),
        // Not an address of this machine.
        ("192.0.2.1:9234".to_string(), "cannot serve metrics there".to_string()),
    ] {
        let (code, log) =
            start_expect_failure(&env, &format!("plugin_opt_metrics_listen {value}\n"));
        assert_ne!(code, 0, "{value}: broker started; log:\n{log}");
        let lines: Vec<&str> =
            log.lines().filter(|l| l.contains("plugin_opt_metrics_listen")).collect();
        assert_eq!(lines.len(), 1, "{value}: one line naming the option; log:\n{log}");
        assert!(lines[0].contains(&value) && lines[0].contains(&expect), "{value}: {}", lines[0]);
    }
    drop(taken);
    // Positive control: a free address starts, and serves.
    let (mut broker, mport) = start_with(&env, &[]);
    wait_health(&broker, mport, 200);
    // SIGTERM joins the exporter thread: a clean exit, and the address is free again.
    assert_eq!(broker.stop(), Some(0), "{}", broker.log());
    std::net::TcpListener::bind(("127.0.0.1", mport)).expect("metrics port released at shutdown");
}

/// Runs promtool (Debian's `prometheus` package) if it is installed.
fn promtool(args: &[&str], stdin: Option<&str>) -> Option<std::process::Output> {
    let mut cmd = Command::new("promtool");
    cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    let mut child = cmd.spawn().ok()?;
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    Some(child.wait_with_output().unwrap())
}

/// Every `iotgw_*` name in a file, with the histogram suffixes taken off.
fn referenced_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("iotgw_") {
        let tail = &rest[i..];
        let end =
            tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| b.ends_with("_seconds"))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn dashboard_and_alert_rules_reference_only_served_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring");
    let alerts = std::fs::read_to_string(root.join("alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is valid JSON");
    let env = Env::new();
    // In cluster mode, which serves every series (the cluster ones only exist there).
    let redis = Redis::start();
    let (broker, mport) =
        start_with(&env, &[("cluster_url", redis.url()), ("node_id", "node-1".to_string())]);
    let m = scrape_until(&broker, mport, "first snapshot", |m| !m.is_empty());
    let (_, _, body) = get(mport, "/metrics");
    let served: std::collections::BTreeSet<&str> =
        body.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    assert!(served.len() >= 13, "{m:#?}");
    for (file, text) in [("alerts.yml", &alerts), ("grafana-dashboard.json", &dashboard)] {
        let used = referenced_metrics(text);
        assert!(used.len() >= 4, "{file} references too little: {used:?}");
        for name in used {
            assert!(
                served.contains(name.as_str()),
                "{file} uses {name}, which /metrics does not serve"
            );
        }
    }
    if let Some(out) =
        promtool(&["check", "rules", root.join("alerts.yml").to_str().unwrap()], None)
    {
        assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn outbox_refusals_are_counted_under_their_own_reason() {
    let env = Env::new();
    // Nothing listens on the backend port (reserved, never bound): every accepted message stays
    // pending until the cap.
    let down = Port::reserve();
    let (broker, mport) = start_with(
        &env,
        &[("backend_url", sink_url(down.get())), ("spool_max_bytes", "1048576".into())],
    );
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(60_000));
    let t = now();
    let (mut accepted, mut refused) = (0.0, 0.0);
    for _ in 0..25 {
        let ack = dev.publish(
            "device/sensor_001/data",
            1,
            false,
            &signed_as("sensor_001", t, &uid(), &big),
        );
        if ack.is_ok() {
            accepted += 1.0;
        } else {
            assert!(ack.is_not_authorized(), "{ack:?}");
            refused += 1.0;
        }
    }
    assert!(refused > 0.0 && accepted > 0.0, "accepted {accepted} refused {refused}");
    let m = scrape_until(&broker, mport, "every publish counted", |m| {
        m.get("iotgw_messages_accepted_total") == Some(&accepted)
            && m.get("iotgw_messages_rejected_total{reason=\"outbox_full\"}") == Some(&refused)
    });
    assert_eq!(m["iotgw_outbox_pending_messages"], accepted);
    let bytes = m["iotgw_outbox_pending_bytes"];
    assert!(bytes > accepted * 60_000.0 && bytes <= 1_048_576.0, "{bytes}");
    assert_eq!(m["iotgw_messages_rejected_total{reason=\"outbox_error\"}"], 0.0);
    let (_, _, body) = get(mport, "/devices");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["devices"][0]["rejected"]["outbox_full"].as_f64(), Some(refused), "{v:#}");
    assert_eq!(v["devices"][0]["pending"].as_f64(), Some(accepted), "{v:#}");
}

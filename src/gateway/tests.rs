//! The gateway core driven without a broker: spec vectors, each check's edges, ACL policy,
//! persistence of replay ids, and forwarding against a loopback HTTP sink.

use super::*;
use crate::envelope::Reason;
use rusqlite::Connection;
use std::path::Path;

#[derive(Default)]
struct FakeHost {
    logs: Vec<(Level, String)>,
    published: Vec<(String, Vec<u8>)>,
}

impl Host for FakeHost {
    fn log(&mut self, level: Level, msg: &str) {
        self.logs.push((level, msg.to_string()));
    }
    fn publish(&mut self, topic: &str, payload: &[u8]) -> bool {
        self.published.push((topic.to_string(), payload.to_vec()));
        true
    }
}

fn registry(dir: &Path, devices: &[(&str, &str)]) -> std::path::PathBuf {
    let p = dir.join("devices.db");
    let c = Connection::open(&p).unwrap();
    c.execute_batch(crate::registry::BASE_SCHEMA).unwrap();
    for (id, secret) in devices {
        c.execute("INSERT INTO devices VALUES (?1, ?2, 0)", [id, secret]).unwrap();
    }
    p
}

fn gateway(dir: &Path, extra: &[(&str, &str)]) -> Gateway {
    let devices = [
        ("sensor_001", "supersecretkey123"),
        ("sensor_002", "anothersecretkey456"),
        ("sensor_003", "yetanothersecret789"),
    ];
    gateway_with(dir, &devices, extra)
}

fn gateway_with(dir: &Path, devices: &[(&str, &str)], extra: &[(&str, &str)]) -> Gateway {
    let db = registry(dir, devices);
    let spool = dir.join("outbox");
    let mut opts = vec![
        ("db_path".to_string(), db.display().to_string()),
        ("spool_path".to_string(), spool.display().to_string()),
    ];
    if !extra.iter().any(|(k, _)| *k == "backend_url") {
        opts.push(("backend_url".into(), "none".into()));
    }
    opts.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let cfg = Config::from_opts(opts.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
    Gateway::start(cfg, Arc::new(|| {})).unwrap()
}

fn sign(secret: &str, device: &str, ts: i64, mid: &str, payload: Json) -> Vec<u8> {
    let members = vec![
        ("device_id".to_string(), Json::String(device.into())),
        ("timestamp".to_string(), Json::Number(ts.into())),
        ("message_id".to_string(), Json::String(mid.into())),
        ("payload".to_string(), payload),
    ];
    envelope::sign_members(secret.as_bytes(), &members).into_bytes()
}

const NOW: i64 = 1_704_067_200;
const S1: &str = "supersecretkey123";

fn send(
    gw: &mut Gateway,
    host: &mut FakeHost,
    who: &str,
    topic: &str,
    payload: &[u8],
    now: i64,
) -> Verdict {
    gw.on_write(host, Identity::Device(who), topic.as_bytes(), payload, now)
}

/// sensor_001 sends a message signed with its own secret on its own topic.
fn send1(gw: &mut Gateway, host: &mut FakeHost, ts: i64, mid: &str, now: i64) -> Verdict {
    send(
        gw,
        host,
        "sensor_001",
        "device/sensor_001/data",
        &sign(S1, "sensor_001", ts, mid, Json::Null),
        now,
    )
}

fn last_reason(host: &FakeHost) -> String {
    let line = &host.logs.last().unwrap().1;
    line.split("reason=").nth(1).unwrap().split(' ').next().unwrap().to_string()
}

fn vectors() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vectors.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_valid_vector_reproduces_canonical_form_and_signature() {
    for v in vectors()["valid"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let env = Envelope::parse(v["envelope"].as_str().unwrap().as_bytes(), 65536).unwrap();
        assert_eq!(
            String::from_utf8(env.canonical()).unwrap(),
            v["canonical"].as_str().unwrap(),
            "{name}"
        );
        let sig = envelope::hmac(v["secret"].as_str().unwrap().as_bytes(), &env.canonical());
        assert_eq!(envelope::hex(&sig), v["signature"].as_str().unwrap(), "{name}");
        assert!(
            envelope::verify(
                v["secret"].as_str().unwrap().as_bytes(),
                &env.canonical(),
                &env.signature
            ),
            "{name}"
        );
    }
}

#[test]
fn every_valid_vector_is_accepted_by_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[]);
    let mut host = FakeHost::default();
    for v in vectors()["valid"].as_array().unwrap() {
        let env = Envelope::parse(v["envelope"].as_str().unwrap().as_bytes(), 65536).unwrap();
        let dev = env.device_id().to_string();
        let topic = format!("device/{dev}/data");
        let verdict = send(
            &mut gw,
            &mut host,
            &dev,
            &topic,
            v["envelope"].as_str().unwrap().as_bytes(),
            env.timestamp,
        );
        assert_eq!(verdict, Verdict::Allow, "{}: {:?}", v["name"], host.logs.last());
    }
    assert_eq!(gw.stats().accepted, vectors()["valid"].as_array().unwrap().len() as u64);
}

#[test]
fn every_invalid_vector_is_rejected_with_its_reason() {
    for v in vectors()["invalid"].as_array().unwrap() {
        let dir = tempfile::tempdir().unwrap();
        // sensor_001 is registered with the vector's secret, so wrong_secret is about the secret.
        let secret = v["secret"].as_str().unwrap();
        let mut gw = gateway_with(dir.path(), &[("sensor_001", secret)], &[]);
        let mut host = FakeHost::default();
        let want = v["reason"].as_str().unwrap().split(':').next().unwrap();
        let envelope = v["envelope"].as_str().unwrap().as_bytes();
        let verdict =
            send(&mut gw, &mut host, "sensor_001", "device/sensor_001/data", envelope, NOW);
        assert_eq!(verdict, Verdict::Deny, "{}", v["name"]);
        assert_eq!(last_reason(&host), want, "{}: {:?}", v["name"], host.logs.last());
    }
}

fn gateway_reopen(dir: &Path) -> Gateway {
    let opts = [
        ("db_path".to_string(), dir.join("devices.db").display().to_string()),
        ("spool_path".to_string(), dir.join("outbox").display().to_string()),
        ("backend_url".to_string(), "none".to_string()),
    ];
    let cfg = Config::from_opts(opts.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
    Gateway::start(cfg, Arc::new(|| {})).unwrap()
}

#[test]
fn timestamp_tolerance_is_inclusive_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[]);
    let mut h = FakeHost::default();
    let t = "device/sensor_001/data";
    assert_eq!(send1(&mut gw, &mut h, NOW - 300, "a", NOW), Verdict::Allow);
    assert_eq!(send1(&mut gw, &mut h, NOW + 300, "b", NOW), Verdict::Allow);
    assert_eq!(send1(&mut gw, &mut h, NOW - 301, "c", NOW), Verdict::Deny);
    assert_eq!(last_reason(&h), "timestamp");
    assert_eq!(send1(&mut gw, &mut h, NOW + 301, "d", NOW), Verdict::Deny);
    assert_eq!(last_reason(&h), "timestamp");
    // Extreme values must not overflow the arithmetic (checked before the signature). The
    // most extreme that reaches it is -(2^53 - 1): beyond that the number is malformed.
    for (ts, reason) in [(i64::MIN, "malformed"), (-((1i64 << 53) - 1), "timestamp")] {
        let extreme = format!(
            r#"{{"device_id":"sensor_001","timestamp":{ts},"message_id":"e","payload":1,"signature":"{}"}}"#,
            "0".repeat(64)
        );
        assert_eq!(send(&mut gw, &mut h, "sensor_001", t, extreme.as_bytes(), NOW), Verdict::Deny);
        assert_eq!(last_reason(&h), reason, "{ts}");
    }
}

#[test]
fn replay_same_id_within_window_is_rejected_and_accepted_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[]);
    let mut h = FakeHost::default();
    let t = "device/sensor_001/data";
    let m = sign(S1, "sensor_001", NOW, "id-1", Json::Null);
    assert_eq!(send(&mut gw, &mut h, "sensor_001", t, &m, NOW), Verdict::Allow);
    assert_eq!(send(&mut gw, &mut h, "sensor_001", t, &m, NOW + 10), Verdict::Deny);
    assert_eq!(last_reason(&h), "replay");
    // A fresh message reusing the id after the old one's window closed is fine.
    let later = sign(S1, "sensor_001", NOW + 301, "id-1", Json::Null);
    assert_eq!(send(&mut gw, &mut h, "sensor_001", t, &later, NOW + 301), Verdict::Allow);
}

#[test]
fn forged_message_does_not_burn_the_message_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[]);
    let mut h = FakeHost::default();
    let t = "device/sensor_001/data";
    let forged = sign("wrong", "sensor_001", NOW, "id-9", Json::Null);
    assert_eq!(send(&mut gw, &mut h, "sensor_001", t, &forged, NOW), Verdict::Deny);
    assert_eq!(last_reason(&h), "signature");
    let real = sign(S1, "sensor_001", NOW, "id-9", Json::Null);
    assert_eq!(send(&mut gw, &mut h, "sensor_001", t, &real, NOW), Verdict::Allow);
}

#[test]
fn replay_cap_reached_refuses_instead_of_forgetting() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[("replay_cache_size", "3")]);
    let mut h = FakeHost::default();
    for i in 0..3 {
        assert_eq!(send1(&mut gw, &mut h, NOW, &format!("m{i}"), NOW), Verdict::Allow);
    }
    assert_eq!(send1(&mut gw, &mut h, NOW, "m3", NOW), Verdict::Deny);
    assert_eq!(last_reason(&h), "replay");
    assert!(h.logs.last().unwrap().1.contains("cache full"));
    // The first id is still refused as a replay: it was never forgotten.
    assert_eq!(send1(&mut gw, &mut h, NOW, "m0", NOW), Verdict::Deny);
    // Other devices are unaffected.
    assert_eq!(
        send(
            &mut gw,
            &mut h,
            "sensor_002",
            "device/sensor_002/data",
            &sign("anothersecretkey456", "sensor_002", NOW, "m3", Json::Null),
            NOW
        ),
        Verdict::Allow
    );
}

#[test]
fn replay_ids_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // The real clock: start() rebuilds the cache from ids still inside their window now.
    let now = unix_now();
    let m = sign(S1, "sensor_001", now, "persisted", Json::Null);
    {
        let mut gw = gateway(dir.path(), &[]);
        let mut h = FakeHost::default();
        assert_eq!(
            send(&mut gw, &mut h, "sensor_001", "device/sensor_001/data", &m, now),
            Verdict::Allow
        );
        gw.shutdown(&mut h);
    }
    {
        let mut store = Store::open(&dir.path().join("outbox"), 1 << 20).unwrap();
        let rows = store.take_live_seen(now);
        assert!(rows.iter().any(|(d, dg, exp)| d == "sensor_001"
            && *dg == replay::digest("persisted")
            && *exp == now + 300));
    }
    let mut gw = gateway_reopen(dir.path());
    let mut h = FakeHost::default();
    assert_eq!(
        send(&mut gw, &mut h, "sensor_001", "device/sensor_001/data", &m, now),
        Verdict::Deny
    );
    assert_eq!(last_reason(&h), "replay");
}

#[test]
fn identity_mismatches_are_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[]);
    let mut h = FakeHost::default();
    let m = sign(S1, "sensor_001", NOW, "x", Json::Null);
    // envelope says sensor_001, TLS identity sensor_002, own topic of sensor_002
    assert_eq!(
        send(&mut gw, &mut h, "sensor_002", "device/sensor_002/data", &m, NOW),
        Verdict::Deny
    );
    assert_eq!(last_reason(&h), "identity");
    // device A publishing on device B's topic
    assert_eq!(
        send(&mut gw, &mut h, "sensor_001", "device/sensor_002/data", &m, NOW),
        Verdict::Deny
    );
    assert_eq!(last_reason(&h), "identity");
    // no TLS identity
    assert_eq!(
        gw.on_write(&mut h, Identity::None, b"device/sensor_001/data", &m, NOW),
        Verdict::Deny
    );
    assert_eq!(last_reason(&h), "identity");
    // a service identity cannot publish device data
    assert_eq!(
        gw.on_write(&mut h, Identity::Service("dashboard"), b"device/sensor_001/data", &m, NOW),
        Verdict::Deny
    );
    assert_eq!(last_reason(&h), "identity");
}

#[test]
fn unknown_and_newly_added_devices() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[]);
    let mut h = FakeHost::default();
    let m = sign("s9", "sensor_009", NOW, "x", Json::Null);
    assert_eq!(
        send(&mut gw, &mut h, "sensor_009", "device/sensor_009/data", &m, NOW),
        Verdict::Deny
    );
    assert_eq!(last_reason(&h), "unknown_device");
    Connection::open(dir.path().join("devices.db"))
        .unwrap()
        .execute("INSERT INTO devices VALUES ('sensor_009','s9',0)", [])
        .unwrap();
    assert_eq!(
        send(&mut gw, &mut h, "sensor_009", "device/sensor_009/data", &m, NOW),
        Verdict::Allow
    );
}

#[test]
fn garbage_payloads_are_malformed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[]);
    let mut h = FakeHost::default();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let big = vec![b'{'; 10 << 20];
    let cases: Vec<&[u8]> =
        vec![b"", b"\xff\xfe", b"null", deep.as_bytes(), &big, b"{\"a\":1,\"a\":1}"];
    for c in &cases {
        assert_eq!(
            send(&mut gw, &mut h, "sensor_001", "device/sensor_001/data", c, NOW),
            Verdict::Deny
        );
        assert_eq!(last_reason(&h), "malformed");
    }
    assert_eq!(gw.stats().rejected[Reason::Malformed.index()], cases.len() as u64);
    // Rejection logs never carry the payload.
    assert!(h.logs.iter().all(|(_, l)| l.len() < 600));
}

#[test]
fn acl_policy_for_devices_services_and_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[("service_identities", "dashboard")]);
    let cfg = gw.config().clone();
    let mut h = FakeHost::default();
    let dev = Identity::Device("sensor_001");
    assert_eq!(
        acl_verdict(&cfg, dev, Access::Subscribe, b"device/sensor_001/response"),
        Verdict::Allow
    );
    assert_eq!(acl_verdict(&cfg, dev, Access::Read, b"device/sensor_001/response"), Verdict::Allow);
    assert_eq!(acl_verdict(&cfg, dev, Access::Subscribe, b"device/+/response"), Verdict::Deny);
    assert_eq!(
        acl_verdict(&cfg, dev, Access::Subscribe, b"device/sensor_002/response"),
        Verdict::Deny
    );
    assert_eq!(acl_verdict(&cfg, dev, Access::Read, b"device/sensor_001/data"), Verdict::Deny);
    assert_eq!(acl_verdict(&cfg, dev, Access::Subscribe, b"#"), Verdict::Deny);
    assert_eq!(
        acl_verdict(&cfg, Identity::Device(""), Access::Read, b"device//response"),
        Verdict::Deny
    );
    assert_eq!(
        acl_verdict(&cfg, Identity::Service("dashboard"), Access::Subscribe, b"#"),
        Verdict::Defer
    );
    assert_eq!(
        acl_verdict(&cfg, Identity::None, Access::Read, b"device/sensor_001/data"),
        Verdict::Defer
    );
    // Writes: a device only to its own data topic; nobody to response topics.
    assert_eq!(gw.on_write(&mut h, dev, b"other/topic", b"x", NOW), Verdict::Deny);
    assert_eq!(
        gw.on_write(&mut h, Identity::None, b"device/sensor_001/response", b"x", NOW),
        Verdict::Deny
    );
    assert_eq!(
        gw.on_write(&mut h, Identity::Service("dashboard"), b"alerts/x", b"x", NOW),
        Verdict::Defer
    );
    assert_eq!(gw.on_write(&mut h, Identity::None, b"alerts/x", b"x", NOW), Verdict::Defer);
}

#[test]
fn identity_requires_certificate_cn_equal_to_username() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), &[("service_identities", "dashboard")]);
    let cfg = gw.config();
    assert_eq!(
        identity(cfg, Some(b"sensor_001"), Some(b"sensor_001")),
        Identity::Device("sensor_001")
    );
    assert_eq!(
        identity(cfg, Some(b"sensor_001"), None),
        Identity::None,
        "plain-listener username is not an identity"
    );
    assert_eq!(identity(cfg, Some(b"sensor_001"), Some(b"other")), Identity::None);
    assert_eq!(
        identity(cfg, Some(b"dashboard"), Some(b"dashboard")),
        Identity::Service("dashboard")
    );
    assert_eq!(identity(cfg, Some(b"\xff"), Some(b"\xff")), Identity::Device(""));
    assert_eq!(identity(cfg, None, Some(b"x")), Identity::None);
}

#[test]
fn disabled_device_is_refused_after_a_registry_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &[]);
    let mut h = FakeHost::default();
    let t = "device/sensor_001/data";
    assert_eq!(send1(&mut gw, &mut h, NOW, "a", NOW), Verdict::Allow);
    let c = Connection::open(dir.path().join("devices.db")).unwrap();
    crate::registry::migrate(&c).unwrap();
    c.execute("UPDATE devices SET enabled = 0 WHERE device_id = 'sensor_001'", []).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0.. {
        gw.on_tick(&mut h, NOW);
        let m = sign(S1, "sensor_001", NOW, &format!("b{i}"), Json::Null);
        if send(&mut gw, &mut h, "sensor_001", t, &m, NOW) == Verdict::Deny {
            break;
        }
        assert!(Instant::now() < deadline, "still accepted 5 s after disable");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(last_reason(&h), "unknown_device");
}

#[test]
fn downlink_verifies_with_the_device_secret() {
    let text = downlink(b"k", "d1", "orig", 200, br#"{"status":"ok"}"#, NOW);
    let env = Envelope::parse(text.as_bytes(), 65536).unwrap();
    assert!(envelope::verify(b"k", &env.canonical(), &env.signature));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["in_reply_to"], "orig");
    assert_eq!(v["status"], 200);
    assert_eq!(v["payload"]["status"], "ok");
    let text = downlink(b"k", "d1", "orig", 400, b"not json", NOW);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["payload"], "not json");
}

type Seen = std::sync::mpsc::Receiver<(String, Vec<(String, String)>, Vec<u8>)>;

/// A loopback HTTP sink that answers each request with the next status in `statuses`.
fn sink(statuses: Vec<u16>) -> (String, Seen, std::thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        for status in statuses {
            let Ok(Some(mut req)) = server.recv_timeout(Duration::from_secs(20)) else { return };
            let mut body = Vec::new();
            let _ = std::io::Read::read_to_end(req.as_reader(), &mut body);
            let headers = req
                .headers()
                .iter()
                .map(|h| (h.field.to_string().to_lowercase(), h.value.to_string()))
                .collect();
            let _ = tx.send((req.url().to_string(), headers, body));
            let _ = req.respond(
                tiny_http::Response::from_string(r#"{"ok":true}"#).with_status_code(status),
            );
        }
    });
    (format!("http://127.0.0.1:{port}/device/{{device_id}}/data"), rx, h)
}

#[test]
fn accepted_message_is_forwarded_and_answered_with_a_signed_response() {
    let dir = tempfile::tempdir().unwrap();
    let (url, rx, h) = sink(vec![500, 200]);
    let mut gw = gateway(dir.path(), &[("backend_url", &url), ("workers", "2")]);
    let mut host = FakeHost::default();
    let now = unix_now();
    let m = sign(
        S1,
        "sensor_001",
        now,
        "fw-1",
        serde_json::from_str::<serde_json::Value>(r#"{"b":1,"a":2}"#)
            .map(Json::from_value)
            .unwrap(),
    );
    assert_eq!(
        send(&mut gw, &mut host, "sensor_001", "device/sensor_001/data", &m, now),
        Verdict::Allow
    );
    let first = rx.recv_timeout(Duration::from_secs(10));
    if first.is_err() {
        gw.on_tick(&mut host, now);
        panic!("no request reached the sink: {:?}", host.logs);
    }
    let (path, headers, body) = first.unwrap();
    assert_eq!(path, "/device/sensor_001/data");
    assert_eq!(body, br#"{"a":2,"b":1}"#);
    let hv = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(hv("x-device-id").as_deref(), Some("sensor_001"));
    assert_eq!(hv("x-message-id").as_deref(), Some("fw-1"));
    assert_eq!(hv("content-type").as_deref(), Some("application/json"));
    // The 500 is retried; the 200 produces one response.
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.published.is_empty() {
        assert!(Instant::now() < deadline);
        gw.on_tick(&mut host, now);
        std::thread::sleep(Duration::from_millis(10));
    }
    let (topic, payload) = &host.published[0];
    assert_eq!(topic, "device/sensor_001/response");
    let env = Envelope::parse(payload, 65536).unwrap();
    assert!(envelope::verify(S1.as_bytes(), &env.canonical(), &env.signature));
    assert_eq!(gw.store.pending_count().unwrap(), 0);
    gw.shutdown(&mut host);
    h.join().unwrap();
}

#[test]
fn message_id_with_control_characters_is_delivered_with_an_encoded_header() {
    let dir = tempfile::tempdir().unwrap();
    let (url, rx, h) = sink(vec![200]);
    let mut gw = gateway(dir.path(), &[("backend_url", &url)]);
    let mut host = FakeHost::default();
    let now = unix_now();
    // Legal per the spec (1-128 characters of anything), hostile as a header value.
    let mid = "evil\r\nX-Injected: 1 é";
    let m = sign(S1, "sensor_001", now, mid, Json::Null);
    assert_eq!(
        send(&mut gw, &mut host, "sensor_001", "device/sensor_001/data", &m, now),
        Verdict::Allow
    );
    let (_, headers, _) =
        rx.recv_timeout(Duration::from_secs(10)).expect("delivered, not retried forever");
    let hv = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(hv("x-message-id").as_deref(), Some("evil%0D%0AX-Injected:%201%20%C3%A9"));
    assert_eq!(hv("x-injected"), None);
    gw.shutdown(&mut host);
    h.join().unwrap();
}

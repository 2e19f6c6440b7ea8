//! Durable delivery to the HTTP backend and signed responses, with a real broker and real TLS.

use crate::support::*;
use secure_iot_gateway::envelope::{self, Envelope};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request the backend saw.
#[derive(Debug, Clone)]
pub struct Req {
    pub path: String,
    pub device: String,
    pub message_id: String,
    pub content_type: String,
    pub body: Vec<u8>,
    pub at: Instant,
}

/// A loopback HTTP backend: answers with scripted statuses (then 200), or hangs.
pub struct Sink {
    pub port: u16,
    pub received: Arc<Mutex<Vec<Req>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    hang: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Sink {
    pub fn start(port: u16) -> Sink {
        Self::serve(Arc::new(tiny_http::Server::http(("127.0.0.1", port)).unwrap()), port)
    }

    /// The same sink over TLS, with this certificate and key.
    pub fn start_https(port: u16, cert: Vec<u8>, key: Vec<u8>) -> Sink {
        let ssl = tiny_http::SslConfig { certificate: cert, private_key: key };
        Self::serve(Arc::new(tiny_http::Server::https(("127.0.0.1", port), ssl).unwrap()), port)
    }

    fn serve(server: Arc<tiny_http::Server>, port: u16) -> Sink {
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let hang = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, sc, h, st) = (received.clone(), script.clone(), hang.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let (r, sc, h, st) = (r.clone(), sc.clone(), h.clone(), st.clone());
                std::thread::spawn(move || {
                    let headers: Vec<(String, String)> = req
                        .headers()
                        .iter()
                        .map(|x| {
                            (x.field.as_str().as_str().to_ascii_lowercase(), x.value.to_string())
                        })
                        .collect();
                    let hv = |name: &str| {
                        headers
                            .iter()
                            .find(|(k, _)| k == name)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default()
                    };
                    let mut body = Vec::new();
                    let _ = std::io::Read::read_to_end(req.as_reader(), &mut body);
                    let rec = Req {
                        path: req.url().to_string(),
                        device: hv("x-device-id"),
                        message_id: hv("x-message-id"),
                        content_type: hv("content-type"),
                        body,
                        at: Instant::now(),
                    };
                    // Bounded hang: long enough to outlast the plugin's HTTP timeout.
                    let until = Instant::now() + Duration::from_secs(20);
                    while h.load(Ordering::SeqCst)
                        && !st.load(Ordering::SeqCst)
                        && Instant::now() < until
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let status = sc.lock().unwrap().pop_front().unwrap_or(200);
                    let answer = format!(r#"{{"status":"ok","seen":"{}"}}"#, rec.message_id);
                    if status / 100 == 2 {
                        r.lock().unwrap().push(rec);
                    }
                    let _ = req
                        .respond(tiny_http::Response::from_string(answer).with_status_code(status));
                });
            }
        });
        Sink { port, received, script, hang, stop, handle: Some(handle) }
    }

    pub fn url(port: u16) -> String {
        format!("http://127.0.0.1:{port}/device/{{device_id}}/data")
    }

    pub fn script(&self, statuses: &[u16]) {
        self.script.lock().unwrap().extend(statuses);
    }

    pub fn set_hang(&self, on: bool) {
        self.hang.store(on, Ordering::SeqCst);
    }

    pub fn delivered(&self) -> Vec<Req> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests were answered 2xx (bounded).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Req> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.delivered();
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.hang.store(false, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn backend_opts(port: u16) -> Vec<(&'static str, String)> {
    vec![("backend_url", Sink::url(port)), ("http_timeout_ms", "1000".into())]
}

fn start(env: &Env, opts: &[(&'static str, String)]) -> Broker {
    let o: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Broker::start(env, &o)
}

fn start_on(env: &Env, port: u16, opts: &[(&'static str, String)]) -> Broker {
    let o: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Broker::start_on(env, port, &o)
}

pub fn verify_downlink(payload: &[u8], device: &str) -> serde_json::Value {
    let env = Envelope::parse(payload, 65536).expect("downlink parses as an envelope");
    assert!(
        envelope::verify(secret_of(device).as_bytes(), &env.canonical(), &env.signature),
        "downlink signature does not verify"
    );
    serde_json::from_slice(payload).unwrap()
}

#[test]
fn valid_message_reaches_the_backend_and_a_signed_response_reaches_the_device() {
    let env = Env::new();
    let sink = Sink::start(free_port());
    let broker = start(&env, &backend_opts(sink.port));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    dev.subscribe("device/sensor_001/response", 1);
    let mid = uid();
    let m = signed("sensor_001", now(), &mid, r#"{"temperature": 22.5, "humidity": 60}"#);
    let sent = Instant::now();
    assert!(dev.publish("device/sensor_001/data", 1, false, &m).is_ok());
    // Read the response first: this is the device's view of the round trip.
    let (topic, payload) = dev
        .next_message(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no response; {}", broker.log()));
    let round_trip = sent.elapsed();
    let got = sink.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "{}", broker.log());
    eprintln!(
        "publish -> signed response round trip: {round_trip:?} (publish -> backend {:?})",
        got[0].at - sent
    );
    assert_eq!(got[0].path, "/device/sensor_001/data");
    assert_eq!(got[0].body, br#"{"humidity":60,"temperature":22.5}"#);
    assert_eq!((got[0].device.as_str(), got[0].message_id.as_str()), ("sensor_001", mid.as_str()));
    assert_eq!(got[0].content_type, "application/json");
    assert_eq!(topic, "device/sensor_001/response");
    let v = verify_downlink(&payload, "sensor_001");
    assert_eq!(v["in_reply_to"], mid.as_str());
    assert_eq!(v["status"], 200);
    assert_eq!(v["payload"]["status"], "ok");
    assert_eq!(v["device_id"], "sensor_001");
    assert_ne!(v["message_id"], mid.as_str());
}

#[test]
fn backend_down_then_up_delivers_all_200_in_order_per_device() {
    let env = Env::new();
    let port = free_port();
    let broker = start(&env, &backend_opts(port));
    let mut devs: Vec<Mqtt> =
        ["sensor_001", "sensor_002"].iter().map(|d| Mqtt::connect(&env, broker.port, d)).collect();
    let t = now();
    for i in 0..100 {
        for (k, d) in ["sensor_001", "sensor_002"].iter().enumerate() {
            let m = signed(d, t, &format!("{d}-{i:03}"), &format!(r#"{{"seq":{i}}}"#));
            assert!(devs[k].publish(&format!("device/{d}/data"), 1, false, &m).is_ok());
        }
    }
    assert!(
        broker.wait_log("backend delivery failed", Duration::from_secs(10)),
        "{}",
        broker.log()
    );
    let sink = Sink::start(port);
    let got = sink.wait_for(200, Duration::from_secs(60));
    assert_eq!(got.len(), 200, "{}", broker.log());
    for d in ["sensor_001", "sensor_002"] {
        let seq: Vec<String> =
            got.iter().filter(|r| r.device == d).map(|r| r.message_id.clone()).collect();
        let want: Vec<String> = (0..100).map(|i| format!("{d}-{i:03}")).collect();
        assert_eq!(seq, want, "per-device order for {d}");
    }
}

#[test]
fn kill_9_mid_stream_loses_no_acknowledged_message() {
    let env = Env::new();
    let bport = free_port();
    let sink_port = free_port();
    let mut broker = start_on(&env, bport, &backend_opts(sink_port));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let t = now();
    let mut acked = Vec::new();
    for i in 0..150 {
        let mid = format!("k-{i}");
        if dev
            .publish("device/sensor_001/data", 1, false, &signed("sensor_001", t, &mid, "{}"))
            .is_ok()
        {
            acked.push(mid);
        }
    }
    broker.kill9();
    drop(dev);
    assert_eq!(acked.len(), 150);
    let sink = Sink::start(sink_port);
    let broker = start_on(&env, bport, &backend_opts(sink_port));
    let got = sink.wait_for(150, Duration::from_secs(60));
    let ids: std::collections::HashSet<String> = got.iter().map(|r| r.message_id.clone()).collect();
    for mid in &acked {
        assert!(ids.contains(mid), "{mid} was acknowledged but never delivered; {}", broker.log());
    }
}

#[test]
fn backend_500_then_200_is_retried() {
    let env = Env::new();
    let sink = Sink::start(free_port());
    sink.script(&[500, 503]);
    let broker = start(&env, &backend_opts(sink.port));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let mid = uid();
    assert!(dev
        .publish("device/sensor_001/data", 1, false, &signed("sensor_001", now(), &mid, "{}"))
        .is_ok());
    let got = sink.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", broker.log());
    assert_eq!(got[0].message_id, mid);
    assert!(broker.log().contains("HTTP 500"), "{}", broker.log());
}

#[test]
fn backend_400_is_dead_lettered_and_the_device_gets_status_400() {
    let env = Env::new();
    let sink = Sink::start(free_port());
    sink.script(&[400]);
    let broker = start(&env, &backend_opts(sink.port));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    dev.subscribe("device/sensor_001/response", 1);
    let mid = uid();
    assert!(dev
        .publish("device/sensor_001/data", 1, false, &signed("sensor_001", now(), &mid, "{}"))
        .is_ok());
    let (_, payload) = dev
        .next_message(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no response; {}", broker.log()));
    let v = verify_downlink(&payload, "sensor_001");
    assert_eq!(v["status"], 400);
    assert_eq!(v["in_reply_to"], mid.as_str());
    assert!(
        broker.wait_log("dead-lettered device=sensor_001", Duration::from_secs(5)),
        "{}",
        broker.log()
    );
    let dl = std::fs::read_to_string(env.path().join("outbox/dead_letters.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> =
        dl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1, "{dl}");
    assert_eq!(
        (rows[0]["status"].as_u64(), rows[0]["message_id"].as_str()),
        (Some(400), Some(mid.as_str()))
    );
    assert!(rows[0]["body"].as_str().is_some_and(|b| b.contains("status")), "{dl}");
}

#[test]
fn hanging_backend_does_not_stop_mqtt_traffic() {
    let env = Env::new();
    let sink = Sink::start(free_port());
    sink.set_hang(true);
    let broker =
        start(&env, &[("backend_url", Sink::url(sink.port)), ("http_timeout_ms", "5000".into())]);
    let mut monitor = Mqtt::connect(&env, broker.port, "monitor");
    monitor.subscribe("device/#", 1);
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let t = now();
    for i in 0..50 {
        assert!(dev
            .publish(
                "device/sensor_001/data",
                1,
                false,
                &signed("sensor_001", t, &format!("h{i}"), "{}")
            )
            .is_ok());
    }
    let seen = monitor.drain(Duration::from_millis(500), Duration::from_secs(10));
    assert_eq!(seen.len(), 50, "subscriber starved while the backend hangs; {}", broker.log());
    assert!(sink.delivered().is_empty(), "the backend was supposed to be hanging");
}

#[test]
fn outbox_cap_refuses_new_messages_and_keeps_old_ones() {
    let env = Env::new();
    let port = free_port(); // nothing listens: every message stays queued
    let broker =
        start(&env, &[("backend_url", Sink::url(port)), ("spool_max_bytes", "1048576".into())]);
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(60_000));
    let t = now();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..25 {
        let mid = format!("cap-{i}");
        let ack =
            dev.publish("device/sensor_001/data", 1, false, &signed("sensor_001", t, &mid, &big));
        if ack.is_ok() {
            accepted.push(mid);
        } else {
            assert!(ack.is_not_authorized());
            refused += 1;
        }
    }
    assert!(
        refused > 0 && accepted.len() >= 15,
        "accepted {} refused {refused}; {}",
        accepted.len(),
        broker.log()
    );
    assert!(broker.log().contains("rejected reason=outbox"), "{}", broker.log());
    let sink = Sink::start(port);
    let got = sink.wait_for(accepted.len(), Duration::from_secs(60));
    let ids: Vec<String> = got.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids, accepted, "every accepted message delivered, none of the refused");
}

#[test]
fn sigterm_with_a_full_outbox_exits_cleanly_and_delivers_after_restart() {
    let env = Env::new();
    let bport = free_port();
    let sink_port = free_port();
    let mut broker = start_on(&env, bport, &backend_opts(sink_port));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let t = now();
    for i in 0..20 {
        assert!(dev
            .publish(
                "device/sensor_001/data",
                1,
                false,
                &signed("sensor_001", t, &format!("t{i}"), "{}")
            )
            .is_ok());
    }
    drop(dev);
    let stopped = Instant::now();
    assert_eq!(broker.stop(), Some(0), "{}", broker.log());
    eprintln!("SIGTERM to exit with a backlog: {:?}", stopped.elapsed());
    assert!(broker.log().contains("every worker joined"), "{}", broker.log());
    let (pending, _) = secure_iot_gateway::store::inspect(&env.path().join("outbox")).unwrap();
    assert_eq!(pending, 20);
    let sink = Sink::start(sink_port);
    let broker = start_on(&env, bport, &backend_opts(sink_port));
    assert!(broker.log().contains("(20 pending)"), "{}", broker.log());
    let got = sink.wait_for(20, Duration::from_secs(30));
    assert_eq!(got.len(), 20, "{}", broker.log());
}

#[test]
fn https_backend_is_trusted_through_backend_ca_file_only() {
    let env = Env::new();
    let server = secure_iot_gateway::pki::issue(
        &env.ca,
        "backend",
        secure_iot_gateway::pki::Role::Server,
        &["localhost", "127.0.0.1"],
        1,
    )
    .unwrap();
    let sink = Sink::start_https(free_port(), server.cert_pem(), server.key_pem());
    let url = format!("https://localhost:{}/device/{{device_id}}/data", sink.port);
    // Without the CA file the system trust store does not know our private CA: retried, not sent.
    {
        let broker = start(&env, &[("backend_url", url.clone())]);
        let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
        assert!(dev
            .publish("device/sensor_001/data", 1, false, &signed("sensor_001", now(), &uid(), "{}"))
            .is_ok());
        assert!(
            broker.wait_log("backend delivery failed", Duration::from_secs(10)),
            "{}",
            broker.log()
        );
        assert!(sink.delivered().is_empty());
    }
    let ca = env.path().join("ca.pem").display().to_string();
    let broker = start(&env, &[("backend_url", url), ("backend_ca_file", ca)]);
    // The message queued by the first broker is delivered by this one, then a new one too.
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let mid = uid();
    assert!(dev
        .publish("device/sensor_001/data", 1, false, &signed("sensor_001", now(), &mid, "{}"))
        .is_ok());
    let got = sink.wait_for(2, Duration::from_secs(15));
    assert_eq!(got.len(), 2, "{}", broker.log());
    assert_eq!(got[1].message_id, mid);
}

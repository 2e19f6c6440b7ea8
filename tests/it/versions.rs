//! Behaviour that must hold on every Mosquitto the plugin supports (2.0.11 to 2.1.x), whatever the
//! broker's main loop does between passes. Run against each broker with `MOSQUITTO_BIN`
//! (`make test` does: the system 2.0.11, 2.0.18, 2.1.2, and 2.1.2 without websockets).
//!
//! What differs: 2.0 ticks after a 100 ms network wait; 2.1 ticks before it, sends what a tick
//! published only at the next pass, and without websockets may wait up to 24 h. The plugin's own
//! clock (src/plugin/wake.rs) must make responses and housekeeping independent of that.

use crate::forward::verify_downlink;
use std::time::{Duration, Instant};
use testkit::*;

/// Options for a backend at `url` that may take `timeout_ms` to answer.
fn backend(url: String, timeout_ms: &str) -> PluginOpts {
    PluginOpts::new().set("backend_url", url).set("http_timeout_ms", timeout_ms)
}

fn start(env: &Env, opts: &PluginOpts) -> Broker {
    Broker::start(env, opts)
}

/// Nearest-rank percentile: the smallest value with at least p % of the samples at or below it
/// (p99 of 100 samples is the 99th smallest, p50 the 50th).
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p).div_ceil(100).clamp(1, sorted.len()) - 1]
}

/// Publish -> signed response at the device, 100 messages at 20 msg/s over mutual TLS with
/// `set_tcp_nodelay true` (as in write_conf). Each response is verified before it counts.
#[test]
fn response_latency_is_a_few_ms_on_every_broker() {
    let env = Env::new();
    let sink = Sink::start();
    let broker = start(&env, &backend(sink.url(), "1000"));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    // QoS 0 downlink: the test's MQTT client (rumqttc 0.24) cannot set TCP_NODELAY, so with a
    // QoS 1 subscription its PUBACK for each response holds its *next* PUBLISH under Nagle until
    // the broker's delayed ACK (~40 ms, measured on every version). That is the test client, not
    // the gateway; a device should set TCP_NODELAY as the broker does.
    dev.subscribe("device/sensor_001/response", 0);
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(100);
    let mut sent_at = Vec::with_capacity(100);
    for i in 0..100u32 {
        // A fixed 20 msg/s schedule, so the broker is idle between messages.
        let slot = t0 + Duration::from_millis(50) * i;
        if let Some(d) = slot.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let mid = format!("lat-{i:03}-{}", uid());
        let m = signed_as("sensor_001", now(), &mid, &format!(r#"{{"seq":{i}}}"#));
        let sent = Instant::now();
        assert!(dev.publish("device/sensor_001/data", 1, false, &m).is_ok());
        let (topic, payload) = dev
            .next_message(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no response to message {i}; log:\n{}", broker.log()));
        lat.push(sent.elapsed());
        sent_at.push((mid.clone(), sent, Instant::now()));
        assert_eq!(topic, "device/sensor_001/response");
        let v = verify_downlink(&payload, "sensor_001");
        assert_eq!(
            (v["in_reply_to"].as_str(), v["status"].as_u64()),
            (Some(mid.as_str()), Some(200))
        );
    }
    let reqs = sink.wait_for(100, Duration::from_secs(5));
    assert_eq!(reqs.len(), 100);
    // Where the time goes: publish -> backend request, backend request -> device.
    let (mut there, mut back): (Vec<Duration>, Vec<Duration>) = sent_at
        .iter()
        .filter_map(|(mid, sent, got)| {
            let r = reqs.iter().find(|r| &r.message_id == mid)?;
            Some((r.at.saturating_duration_since(*sent), got.saturating_duration_since(r.at)))
        })
        .unzip();
    there.sort();
    back.sort();
    lat.sort();
    let (p50, p99) = (percentile(&lat, 50), percentile(&lat, 99));
    eprintln!(
        "{}: publish -> verified signed response, 100 at 20 msg/s: p50 {p50:?} p99 {p99:?} max {:?} \
         (publish -> backend p50 {:?} p99 {:?}; backend -> device p50 {:?} p99 {:?})",
        mosquitto_bin(),
        lat[99],
        percentile(&there, 50),
        percentile(&there, 99),
        percentile(&back, 50),
        percentile(&back, 99),
    );
    assert!(
        p50 < Duration::from_millis(5) && p99 < Duration::from_millis(25),
        "p50 {p50:?} (limit 5 ms), p99 {p99:?} (limit 25 ms) on {}; sorted: {lat:?}; log:\n{}",
        mosquitto_bin(),
        broker.log()
    );
}

/// Publishes one signed message while the backend holds its answer, stays silent for 3 s (no
/// client sends anything, so only the plugin's clock can make the broker go round), releases
/// the backend and returns (release time, message id, device, broker).
fn silent_backend(env: &Env, sink: &Sink) -> (Broker, Mqtt, String) {
    sink.set_hang(true);
    let broker = start(env, &backend(sink.url(), "10000"));
    let mut dev = Mqtt::connect(env, broker.port, "sensor_001");
    dev.subscribe("device/sensor_001/response", 1);
    let mid = uid();
    assert!(dev
        .publish("device/sensor_001/data", 1, false, &signed_as("sensor_001", now(), &mid, "{}"))
        .is_ok());
    // 3 s without any client traffic (keep-alive is 30 s). Nothing may arrive meanwhile.
    assert_eq!(dev.next_message(Duration::from_secs(3)), None, "answered before the backend did");
    (broker, dev, mid)
}

/// Within `limit` of `from`, the device gets the verified response to `mid` with `status`.
fn expect_response(
    dev: &mut Mqtt,
    broker: &Broker,
    mid: &str,
    status: u64,
    from: Instant,
    limit: Duration,
) -> Duration {
    let (_, payload) = dev.next_message(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!("no response within 10 s on {}; log:\n{}", mosquitto_bin(), broker.log())
    });
    let took = from.elapsed();
    let v = verify_downlink(&payload, "sensor_001");
    assert_eq!((v["in_reply_to"].as_str(), v["status"].as_u64()), (Some(mid), Some(status)));
    assert!(
        took < limit,
        "response {took:?} after the backend answered (limit {limit:?}) on {}; log:\n{}",
        mosquitto_bin(),
        broker.log()
    );
    took
}

/// The sink polls its hang flag every 20 ms, so a release answers within 20 ms of `released`;
/// measuring from the release is the stricter bound.
const SINK_POLL: Duration = Duration::from_millis(20);

#[test]
fn idle_broker_delivers_a_late_backend_answer_at_once() {
    let env = Env::new();
    let sink = Sink::start();
    let (broker, mut dev, mid) = silent_backend(&env, &sink);
    let released = Instant::now();
    sink.set_hang(false);
    let took = expect_response(
        &mut dev,
        &broker,
        &mid,
        200,
        released,
        Duration::from_millis(50) + SINK_POLL,
    );
    let got = sink.wait_for(1, Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    eprintln!("{}: late answer -> device {took:?} after release", mosquitto_bin());
}

#[test]
fn idle_broker_retries_after_a_503_on_time_and_responds() {
    let env = Env::new();
    let sink = Sink::start();
    sink.script(&[503]);
    let (broker, mut dev, mid) = silent_backend(&env, &sink);
    let released = Instant::now();
    sink.set_hang(false);
    // The 503 goes out within SINK_POLL; the first retry waits backoff(1) <= 100 ms.
    let got = sink.wait_for(1, Duration::from_secs(5));
    assert_eq!(got.len(), 1, "no retry after the 503; log:\n{}", broker.log());
    assert_eq!(got[0].message_id, mid);
    let retry_at = got[0].at - released;
    assert!(
        retry_at < SINK_POLL + Duration::from_millis(100) + Duration::from_millis(50),
        "retry {retry_at:?} after the 503 (backoff ceiling 100 ms) on {}; log:\n{}",
        mosquitto_bin(),
        broker.log()
    );
    let took = expect_response(&mut dev, &broker, &mid, 200, got[0].at, Duration::from_millis(50));
    eprintln!(
        "{}: retry {retry_at:?} after release, response {took:?} after the 200",
        mosquitto_bin()
    );
}

/// Registry snapshots are applied on the tick. 2.1 ticks *before* its network wait, so on an idle
/// broker the pass that reads a publish ticked before the sleep: only the plugin's own clock
/// gets a change made during the silence applied before the next message is judged.
#[test]
fn idle_broker_applies_a_registry_change_before_the_next_message() {
    let env = Env::new();
    let broker = Broker::start(&env, &PluginOpts::new());
    let mut old = Mqtt::connect(&env, broker.port, "sensor_001");
    let mut new = Mqtt::connect(&env, broker.port, "sensor_777");
    // Positive controls before the change.
    assert!(old
        .publish("device/sensor_001/data", 1, false, &signed_as("sensor_001", now(), &uid(), "{}"))
        .is_ok());
    let m = signed("fresh-secret-0123", "sensor_777", now(), &uid(), "{}");
    assert!(new.publish("device/sensor_777/data", 1, false, &m).is_not_authorized());
    env.db()
        .execute("INSERT INTO devices VALUES ('sensor_777','fresh-secret-0123',0)", [])
        .unwrap();
    // Silence: no client sends anything. The watcher polls every 200 ms and the plugin ticks at
    // least every 100 ms; the requirement is 1 s, with the same slack for a loaded machine as
    // core::registry_changes_apply_without_a_restart. An idle 2.1 without websockets sleeps up
    // to 5 s with clients connected.
    const IDLE: Duration = Duration::from_secs(2);
    std::thread::sleep(IDLE);
    let m = signed("fresh-secret-0123", "sensor_777", now(), &uid(), "{}");
    let ack = new.publish("device/sensor_777/data", 1, false, &m);
    assert!(
        ack.is_ok(),
        "added device refused after {IDLE:?} idle: {ack:?}; log:\n{}",
        broker.log()
    );
    env.db().execute("DELETE FROM devices WHERE device_id = 'sensor_001'", []).unwrap();
    std::thread::sleep(IDLE);
    let removed = Instant::now();
    let mut publish = || {
        old.publish(
            "device/sensor_001/data",
            1,
            false,
            &signed_as("sensor_001", now(), &uid(), "{}"),
        )
    };
    // Refused: 0x87, or already closed (the plugin disconnects a device removed while it runs).
    let ack = publish();
    if !ack.is_refused() {
        // For the failure message only: how long until the removal did apply, with traffic.
        let mut until = None;
        while until.is_none() && removed.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
            until = publish().is_refused().then(|| removed.elapsed());
        }
        panic!(
            "removed device accepted after {IDLE:?} idle: {ack:?}; refused {until:?} after the idle \
             period once messages flowed; log:\n{}",
            broker.log()
        );
    }
}

/// `(major, minor)` of the broker under test, from `mosquitto -h`.
fn broker_version() -> (u32, u32) {
    let out = std::process::Command::new(mosquitto_bin()).arg("-h").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text.lines().next().and_then(|l| l.strip_prefix("mosquitto version ")).unwrap_or("");
    let mut it = v.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// The same .so loads everywhere (2.1-only functions are looked up at run time, never imported)
/// and names itself to 2.1 brokers through mosquitto_plugin_set_info, which only they log.
#[test]
fn plugin_loads_and_names_itself_where_the_broker_can_say_it() {
    let env = Env::new();
    let mut broker = Broker::start(&env, &PluginOpts::new());
    let named = format!("Plugin secure-iot-gateway version {} loaded.", env!("CARGO_PKG_VERSION"));
    let version = broker_version();
    assert!(version >= (2, 0), "cannot read the version of {}", mosquitto_bin());
    // The line is written during start-up, before the listener opens.
    assert_eq!(
        broker.log().contains(&named),
        version >= (2, 1),
        "{version:?}; log:\n{}",
        broker.log()
    );
    assert_eq!(broker.stop(), Some(0), "{}", broker.log());
}

/// A device disabled while the broker runs, connecting again: on 2.1 it is closed right after its
/// CONNACK, before it sends anything (the CONNECT event); on 2.0, which has no such event, it is
/// closed at its first action (positive control that the connection is otherwise usable there).
#[test]
fn a_revoked_device_is_closed_at_connect_where_the_broker_says_so() {
    let env = Env::new();
    let broker = Broker::start(&env, &PluginOpts::new());
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let db = env.db();
    secure_iot_gateway::registry::migrate(&db).unwrap();
    db.execute("UPDATE devices SET enabled = 0 WHERE device_id = 'sensor_001'", []).unwrap();
    assert!(dev.wait_closed(Duration::from_secs(5)), "still connected; {}", broker.log());
    // Another device connects and stays (positive control for the closing below).
    let mut other = Mqtt::connect(&env, broker.port, "sensor_002");
    let mut again = Mqtt::connect(&env, broker.port, "sensor_001");
    if broker_version() >= (2, 1) {
        assert!(
            again.wait_closed(Duration::from_secs(2)),
            "not closed at connect; {}",
            broker.log()
        );
    } else {
        assert!(!again.wait_closed(Duration::from_millis(500)), "2.0 has no connect event");
        let m = signed_as("sensor_001", now(), &uid(), "{}");
        assert_eq!(again.publish("device/sensor_001/data", 0, false, &m), Ack::None);
        assert!(again.wait_closed(Duration::from_secs(3)), "{}", broker.log());
    }
    assert!(!other.wait_closed(Duration::from_millis(300)), "the other device was closed");
    let m = signed_as("sensor_002", now(), &uid(), "{}");
    assert!(other.publish("device/sensor_002/data", 1, false, &m).is_ok());
}

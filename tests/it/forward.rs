//! Durable delivery to the HTTP backend and signed responses, with a real broker and real TLS.

use secure_iot_gateway::envelope::{self, Envelope};
use std::time::{Duration, Instant};
use testkit::*;

fn backend_opts(port: u16) -> PluginOpts {
    PluginOpts::new().set("backend_url", sink_url(port)).set("http_timeout_ms", 1000)
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
    let sink = Sink::start();
    let broker = Broker::start(&env, &backend_opts(sink.port()));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    dev.subscribe("device/sensor_001/response", 1);
    let mid = uid();
    let m = signed_as("sensor_001", now(), &mid, r#"{"temperature": 22.5, "humidity": 60}"#);
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
    let port = Port::reserve();
    let broker = Broker::start(&env, &backend_opts(port.get()));
    let mut devs: Vec<Mqtt> =
        ["sensor_001", "sensor_002"].iter().map(|d| Mqtt::connect(&env, broker.port, d)).collect();
    let t = now();
    for i in 0..100 {
        for (k, d) in ["sensor_001", "sensor_002"].iter().enumerate() {
            let m = signed_as(d, t, &format!("{d}-{i:03}"), &format!(r#"{{"seq":{i}}}"#));
            assert!(devs[k].publish(&format!("device/{d}/data"), 1, false, &m).is_ok());
        }
    }
    assert!(
        broker.wait_log("backend delivery failed", Duration::from_secs(10)),
        "{}",
        broker.log()
    );
    let sink = Sink::start_on(port.get());
    let got = sink.wait_for(200, Duration::from_secs(60));
    assert_eq!(got.len(), 200, "{}", broker.log());
    for d in ["sensor_001", "sensor_002"] {
        let seq: Vec<String> =
            got.iter().filter(|r| r.device == d).map(|r| r.message_id.clone()).collect();
        let want: Vec<String> = (0..100).map(|i| format!("{d}-{i:03}")).collect();
        assert_eq!(seq, want, "per-device order for {d}");
    }
}

/// Publishes `n` messages of sensor_001 (QoS 1, all acknowledged); returns their ids.
fn publish_ids(dev: &mut Mqtt, prefix: &str, n: usize) -> Vec<String> {
    publish_range(dev, prefix, 0..n)
}

fn publish_range(dev: &mut Mqtt, prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    let t = now();
    let ids: Vec<String> = range.map(|i| format!("{prefix}-{i:03}")).collect();
    for mid in &ids {
        let m = signed_as("sensor_001", t, mid, "{}");
        assert!(dev.publish("device/sensor_001/data", 1, false, &m).is_ok());
    }
    ids
}

/// Publishes the first message, waits until it reached the backend (which holds it), then the
/// other `n - 1`: they queue behind it, and the one worker sends them as one pipelined batch.
/// Publishing all at once would leave the first batch to the race between the worker and the
/// broker accepting the second message.
fn publish_first_alone(dev: &mut Mqtt, sink: &Sink, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = publish_range(dev, prefix, 0..1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.requests() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(sink.requests(), 1, "the first message did not reach the backend alone");
    ids.extend(publish_range(dev, prefix, 1..n));
    ids
}

#[test]
fn a_backlog_is_pipelined_to_the_backend_in_order_and_pipeline_1_sends_one_at_a_time() {
    // A slow backend (50 ms an answer) and one worker: messages wait in the lane, and the
    // worker sends up to `backend_pipeline` of them back to back on its one connection.
    for (pipeline, most) in [(4usize, 2..=4usize), (1, 1..=1)] {
        let env = Env::new();
        let sink = Sink::start();
        sink.set_delay(Duration::from_millis(50));
        let opts = backend_opts(sink.port()).set("workers", 1).set("backend_pipeline", pipeline);
        let broker = Broker::start(&env, &opts);
        let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
        let sent = publish_ids(&mut dev, "p", 30);
        let got = sink.wait_for(sent.len(), Duration::from_secs(30));
        let ids: Vec<String> = got.iter().map(|r| r.message_id.clone()).collect();
        assert_eq!(ids, sent, "pipeline {pipeline}: order; {}", broker.log());
        assert_eq!(sink.requests(), sent.len(), "pipeline {pipeline}: each sent once");
        assert!(
            most.contains(&sink.max_in_flight()),
            "pipeline {pipeline}: the backend held {} requests at once",
            sink.max_in_flight()
        );
    }
}

#[test]
fn a_message_refused_inside_a_pipelined_batch_is_retried_after_the_rest_and_nothing_twice() {
    let env = Env::new();
    let sink = Sink::start();
    // The first message goes alone and is held 100 ms; the others queue meanwhile and go out
    // as a batch of 8, whose second message (the third request to arrive) is refused for now.
    sink.set_delay(Duration::from_millis(100));
    sink.script(&[200, 200, 503]);
    let opts = backend_opts(sink.port()).set("workers", 1);
    let broker = Broker::start(&env, &opts);
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let sent = publish_first_alone(&mut dev, &sink, "r", 30);
    let got = sink.wait_for(sent.len(), Duration::from_secs(30));
    let order: Vec<String> = got.iter().map(|r| r.message_id.clone()).collect();
    let mut ids = order.clone();
    ids.sort();
    assert_eq!(ids, sent, "each delivered exactly once; {}", broker.log());
    // 30 answered 2xx plus the one refusal: nothing after the refused one was sent again.
    assert_eq!(sink.requests(), sent.len() + 1, "{}", broker.log());
    // As documented: the refused message reached the backend after the rest of its batch, and
    // before anything after that batch.
    let at = |id: &str| order.iter().position(|m| m == id).unwrap();
    assert!(at("r-008") < at("r-002") && at("r-002") < at("r-009"), "order {order:?}");
}

#[test]
fn only_the_first_refusal_of_a_batch_waits_its_retry_after() {
    let env = Env::new();
    let sink = Sink::start();
    // As above, a batch of 8 after the first message; its first three are refused with
    // `Retry-After: 1`. The first of them waits that second; once it got through, the backend
    // takes messages again, so the other two go at once instead of a second each.
    sink.set_delay(Duration::from_millis(100));
    sink.set_retry_after(1);
    sink.script(&[200, 503, 503, 503]);
    let opts = backend_opts(sink.port()).set("workers", 1);
    let broker = Broker::start(&env, &opts);
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let sent = publish_first_alone(&mut dev, &sink, "w", 12);
    let got = sink.wait_for(sent.len(), Duration::from_secs(30));
    assert_eq!(got.len(), sent.len(), "{}", broker.log());
    let at = |id: &str| got.iter().find(|r| r.message_id == id).expect("delivered").at;
    // The positive control: the first refusal did wait its second.
    assert!(
        at("w-001") - at("w-008") >= Duration::from_millis(900),
        "{:?}",
        at("w-001") - at("w-008")
    );
    for (a, b) in [("w-001", "w-002"), ("w-002", "w-003")] {
        let gap = at(b) - at(a);
        assert!(gap < Duration::from_millis(600), "{b} came {gap:?} after {a}");
    }
    assert_eq!(sink.requests(), sent.len() + 3, "{}", broker.log());
}

#[test]
fn kill_9_mid_stream_loses_no_acknowledged_message() {
    let env = Env::new();
    let bport = Port::reserve();
    let sink_port = Port::reserve();
    let mut broker = Broker::start_on(&env, &bport, &backend_opts(sink_port.get()));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let t = now();
    let mut acked = Vec::new();
    for i in 0..150 {
        let mid = format!("k-{i}");
        if dev
            .publish("device/sensor_001/data", 1, false, &signed_as("sensor_001", t, &mid, "{}"))
            .is_ok()
        {
            acked.push(mid);
        }
    }
    broker.kill9();
    drop(dev);
    assert_eq!(acked.len(), 150);
    let sink = Sink::start_on(sink_port.get());
    let broker = Broker::start_on(&env, &bport, &backend_opts(sink_port.get()));
    let got = sink.wait_for(150, Duration::from_secs(60));
    let ids: std::collections::HashSet<String> = got.iter().map(|r| r.message_id.clone()).collect();
    for mid in &acked {
        assert!(ids.contains(mid), "{mid} was acknowledged but never delivered; {}", broker.log());
    }
}

#[test]
fn backend_500_then_200_is_retried() {
    let env = Env::new();
    let sink = Sink::start();
    sink.script(&[500, 503]);
    let broker = Broker::start(&env, &backend_opts(sink.port()));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let mid = uid();
    assert!(dev
        .publish("device/sensor_001/data", 1, false, &signed_as("sensor_001", now(), &mid, "{}"))
        .is_ok());
    let got = sink.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", broker.log());
    assert_eq!(got[0].message_id, mid);
    // The worker's line reaches the log at the broker's next tick, which may follow the delivery.
    assert!(broker.wait_log("HTTP 500", Duration::from_secs(5)), "{}", broker.log());
}

#[test]
fn backend_400_is_dead_lettered_and_the_device_gets_status_400() {
    let env = Env::new();
    let sink = Sink::start();
    sink.script(&[400]);
    let broker = Broker::start(&env, &backend_opts(sink.port()));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    dev.subscribe("device/sensor_001/response", 1);
    let mid = uid();
    assert!(dev
        .publish("device/sensor_001/data", 1, false, &signed_as("sensor_001", now(), &mid, "{}"))
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
    let sink = Sink::start();
    sink.set_hang(true);
    let broker = Broker::start(
        &env,
        &PluginOpts::new().set("backend_url", sink.url()).set("http_timeout_ms", 5000),
    );
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
                &signed_as("sensor_001", t, &format!("h{i}"), "{}")
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
    let port = Port::reserve(); // nothing listens: every message stays queued
    let broker = Broker::start(
        &env,
        &PluginOpts::new().set("backend_url", sink_url(port.get())).set("spool_max_bytes", 1048576),
    );
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(60_000));
    let t = now();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..25 {
        let mid = format!("cap-{i}");
        let ack = dev.publish(
            "device/sensor_001/data",
            1,
            false,
            &signed_as("sensor_001", t, &mid, &big),
        );
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
    let sink = Sink::start_on(port.get());
    let got = sink.wait_for(accepted.len(), Duration::from_secs(60));
    let ids: Vec<String> = got.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids, accepted, "every accepted message delivered, none of the refused");
}

#[test]
fn sigterm_with_a_full_outbox_exits_cleanly_and_delivers_after_restart() {
    let env = Env::new();
    let bport = Port::reserve();
    let sink_port = Port::reserve();
    let mut broker = Broker::start_on(&env, &bport, &backend_opts(sink_port.get()));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let t = now();
    for i in 0..20 {
        assert!(dev
            .publish(
                "device/sensor_001/data",
                1,
                false,
                &signed_as("sensor_001", t, &format!("t{i}"), "{}")
            )
            .is_ok());
    }
    drop(dev);
    let stopped = Instant::now();
    assert_eq!(broker.stop(), Some(0), "{}", broker.log());
    eprintln!("SIGTERM to exit with a backlog: {:?}", stopped.elapsed());
    assert!(broker.log().contains("every worker joined"), "{}", broker.log());
    let (pending, _) =
        secure_iot_gateway::delivery::outbox::inspect(&env.path().join("outbox")).unwrap();
    assert_eq!(pending, 20);
    let sink = Sink::start_on(sink_port.get());
    let broker = Broker::start_on(&env, &bport, &backend_opts(sink_port.get()));
    assert!(broker.log().contains("(20 pending, "), "{}", broker.log());
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
    let sink = Sink::start_https(server.cert_pem(), server.key_pem());
    let url = sink.url();
    // Without the CA file the system trust store does not know our private CA: retried, not sent.
    {
        let broker = Broker::start(&env, &PluginOpts::new().set("backend_url", &url));
        let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
        assert!(dev
            .publish(
                "device/sensor_001/data",
                1,
                false,
                &signed_as("sensor_001", now(), &uid(), "{}")
            )
            .is_ok());
        assert!(
            broker.wait_log("backend delivery failed", Duration::from_secs(10)),
            "{}",
            broker.log()
        );
        assert!(sink.delivered().is_empty());
    }
    let ca = env.path().join("ca.pem").display().to_string();
    let broker =
        Broker::start(&env, &PluginOpts::new().set("backend_url", url).set("backend_ca_file", ca));
    // The message queued by the first broker is delivered by this one, then a new one too.
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let mid = uid();
    assert!(dev
        .publish("device/sensor_001/data", 1, false, &signed_as("sensor_001", now(), &mid, "{}"))
        .is_ok());
    let got = sink.wait_for(2, Duration::from_secs(15));
    assert_eq!(got.len(), 2, "{}", broker.log());
    assert_eq!(got[1].message_id, mid);
}

#[test]
fn backend_3xx_is_final_dead_lettered_and_never_retried() {
    let env = Env::new();
    let sink = Sink::start();
    sink.script(&[302]);
    let broker = Broker::start(&env, &backend_opts(sink.port()));
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    dev.subscribe("device/sensor_001/response", 1);
    let first = uid();
    let m = signed_as("sensor_001", now(), &first, "{}");
    assert!(dev.publish("device/sensor_001/data", 1, false, &m).is_ok());
    let (_, payload) = dev
        .next_message(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no response; {}", broker.log()));
    assert_eq!(verify_downlink(&payload, "sensor_001")["status"], 302);
    // Positive control: the next message is delivered (the script is spent: 200 from now on).
    // Had the 302 been retried, the first message would be delivered too, before it.
    let second = uid();
    let m = signed_as("sensor_001", now(), &second, "{}");
    assert!(dev.publish("device/sensor_001/data", 1, false, &m).is_ok());
    let got = sink.wait_for(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let ids: Vec<String> = sink.delivered().iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids, [second], "{got:?}");
    let dl = std::fs::read_to_string(env.path().join("outbox/dead_letters.jsonl")).unwrap();
    assert!(dl.contains(&first) && dl.contains("\"status\":302"), "{dl}");
}

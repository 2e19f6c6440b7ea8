//! A hostile client and a legitimate device on the same broker, over real mutual TLS: every bad
//! message refused, every good one delivered, the broker alive and exiting 0. Bounded: a few
//! hundred messages, well under a minute.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use testkit::SubscribeReasonCode as R;
use testkit::*;

#[test]
fn a_hostile_client_is_refused_everything_while_a_legitimate_device_is_served() {
    let env = Env::new();
    // A tight rate limit for the attacker to hit; the legitimate device stays under it.
    let mut broker = Broker::start(
        &env,
        &PluginOpts::new()
            .set("rate_limit", "100")
            .set("rate_burst", "40")
            .set("max_payload_bytes", "4096"),
    );
    let mut monitor = Mqtt::connect(&env, broker.port, "monitor");
    assert!(matches!(monitor.subscribe("device/#", 2), R::Success(_)), "{}", broker.log());

    // The legitimate device publishes throughout, at every QoS, from its own thread.
    let port = broker.port;
    let mut good_dev = Mqtt::connect(&env, port, "sensor_002");
    let good_ids: Vec<String> = (0..60).map(|i| format!("good-{i}")).collect();
    let good_payloads: Vec<Vec<u8>> =
        good_ids.iter().map(|id| signed_as("sensor_002", now(), id, r#"{"t":21.5}"#)).collect();
    let legit = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for (i, m) in good_payloads.iter().enumerate() {
            let qos = (i % 3) as u8;
            acks.push((qos, good_dev.publish("device/sensor_002/data", qos, false, m)));
            std::thread::sleep(Duration::from_millis(15));
        }
        acks
    });

    let mut bad = Mqtt::connect(&env, port, "sensor_001");
    let mut refused = 0usize;
    let mut expect_refused = |ack: Ack, what: &str| {
        assert!(ack.is_not_authorized(), "{what}: {ack:?}");
        refused += 1;
    };
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("not json", b"hello".to_vec()),
        ("not utf-8", b"\xff\xfe\xfd{}".to_vec()),
        ("lone surrogate", br#"{"device_id":"\ud800"}"#.to_vec()),
        ("deep", deep.into_bytes()),
        ("oversized", vec![b' '; 8192]),
        ("duplicate member", br#"{"device_id":"sensor_001","device_id":"sensor_002"}"#.to_vec()),
        ("number too big", br#"{"timestamp":1e400}"#.to_vec()),
        ("array", b"[1,2,3]".to_vec()),
        ("forged", signed("not-the-secret-123", "sensor_001", now(), &uid(), "{}")),
        ("other device's id", signed_as("sensor_002", now(), &uid(), "{}")),
        ("stale", signed_as("sensor_001", now() - 3600, &uid(), "{}")),
    ];
    // Malformed and forged, many times over, at QoS 1 and 2.
    for round in 0..12 {
        for (what, payload) in &cases {
            let qos = 1 + (round % 2) as u8;
            expect_refused(bad.publish("device/sensor_001/data", qos, false, payload), what);
        }
    }
    // Replays of its own accepted message (the original is allowed once: positive control).
    let original = signed_as("sensor_001", now(), "replayed-id", "{}");
    assert!(bad.publish("device/sensor_001/data", 1, false, &original).is_ok(), "{}", broker.log());
    for _ in 0..30 {
        expect_refused(bad.publish("device/sensor_001/data", 1, false, &original), "replay");
    }
    // Retained: a bad retained message is never stored (a late subscriber gets nothing).
    for _ in 0..10 {
        expect_refused(bad.publish("device/sensor_001/data", 1, true, b"{}"), "retained");
    }
    // Someone else's topics, response topics, wildcards in topics it may not use.
    for topic in ["device/sensor_002/data", "device/sensor_001/response", "alerts/x", "$SYS/x"] {
        for _ in 0..5 {
            expect_refused(bad.publish(topic, 1, false, &original), topic);
        }
    }
    // v5 topic aliases: the alias resolves to the data topic and is checked all the same. (A
    // refusal makes rumqttc reconnect, which forgets aliases: one alias per connection.)
    const ALIASED: usize = 10;
    for i in 0..ALIASED {
        let mut c = Mqtt::connect(&env, port, "sensor_001");
        let ok = signed_as("sensor_001", now(), &format!("aliased-{i}"), "{}");
        assert!(c.publish_with("device/sensor_001/data", 1, false, &ok, Some(3)).is_ok());
        expect_refused(c.publish_with("", 1, false, b"not json", Some(3)), "alias");
    }
    // A rate-limited burst: all signed and fresh, more than the bucket holds.
    let mut limited = 0;
    for _ in 0..150 {
        let m = signed_as("sensor_001", now(), &uid(), "{}");
        if bad.publish("device/sensor_001/data", 1, false, &m).is_not_authorized() {
            limited += 1;
        }
    }
    assert!(limited > 0, "the rate limit never applied");
    let accepted_in_burst = 150 - limited;
    // Subscriptions it may not have.
    for filter in ["#", "device/#", "device/sensor_002/response", "$SYS/#"] {
        assert!(!matches!(bad.subscribe(filter, 1), R::Success(_)), "{filter}");
    }
    // A will on the data topic that is not signed: refused when the connection drops.
    let willer = Mqtt::try_connect(
        &env,
        port,
        ConnectOpts {
            cn: Some("sensor_003"),
            ca: None,
            cert: None,
            will: Some(("device/sensor_003/data".into(), b"unsigned will".to_vec())),
        },
    )
    .unwrap();
    drop(willer);
    // A certificate whose CN holds MQTT wildcards: denied everything.
    let mut wild = Mqtt::connect(&env, port, "evil+#");
    assert!(!matches!(wild.subscribe("#", 1), R::Success(_)));
    // (2.1 closes an invalid identity right after CONNACK.)
    assert!(wild.publish("alerts/x", 1, false, b"x").is_refused());

    let acks = legit.join().unwrap();
    for (qos, ack) in &acks {
        assert!(ack.is_ok(), "legitimate QoS {qos} publish refused: {ack:?}; {}", broker.log());
    }
    // Exactly the good messages reached the subscriber: the legitimate device's, the attacker's
    // one original, its aliased messages and what the rate limit let through.
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = good_ids.len() + 1 + ALIASED + accepted_in_burst;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        got.extend(monitor.drain(Duration::from_millis(300), Duration::from_secs(2)));
    }
    got.extend(monitor.drain(Duration::from_millis(500), Duration::from_secs(2)));
    let good_seen: BTreeSet<String> = got
        .iter()
        .filter(|(t, _)| t == "device/sensor_002/data")
        .map(|(_, p)| {
            let v: serde_json::Value = serde_json::from_slice(p).unwrap();
            v["message_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        good_seen,
        good_ids.iter().cloned().collect::<BTreeSet<_>>(),
        "{}",
        tail(&broker.log())
    );
    let from_bad: Vec<&Vec<u8>> =
        got.iter().filter(|(t, _)| t != "device/sensor_002/data").map(|(_, p)| p).collect();
    assert_eq!(from_bad.len(), 1 + ALIASED + accepted_in_burst, "{:?}", from_bad.len());
    assert!(from_bad.iter().all(|p| serde_json::from_slice::<serde_json::Value>(p)
        .is_ok_and(|v| v["device_id"] == "sensor_001")));
    // A late subscriber sees no retained message on the data topics.
    let mut late = Mqtt::connect(&env, port, "monitor");
    assert!(matches!(late.subscribe("device/#", 1), R::Success(_)));
    assert!(late.drain(Duration::from_millis(500), Duration::from_secs(2)).is_empty());
    assert!(refused > 200, "{refused}");
    assert!(broker.alive(), "{}", broker.log());
    assert_eq!(broker.stop(), Some(0), "{}", tail(&broker.log()));
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

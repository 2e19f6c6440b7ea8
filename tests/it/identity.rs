//! The identity read from a client's certificate is remembered per connection (issue 9); a new
//! connection, even one that reuses the previous connection's memory, never inherits it.

use std::time::Duration;
use testkit::*;

#[test]
fn each_connection_gets_its_own_identity_across_reconnects() {
    let env = Env::new();
    let broker = Broker::start(&env, &PluginOpts::new());
    let mut monitor = Mqtt::connect(&env, broker.port, "monitor");
    assert!(
        matches!(monitor.subscribe("device/#", 1), SubscribeReasonCode::Success(_)),
        "{}",
        broker.log()
    );
    let devices = ["sensor_001", "sensor_002", "sensor_003"];
    let rounds = 30;
    let mut sent = Vec::new();
    for i in 0..rounds {
        // One connection at a time, alternating identities: the broker frees each client before
        // the next arrives, so client memory is likely reused.
        let dev = devices[i % devices.len()];
        let prev = devices[(i + devices.len() - 1) % devices.len()];
        let mut c = Mqtt::connect(&env, broker.port, dev);
        // Positive control: its own message on its own topic is accepted (twice: the second
        // WRITE check is answered from the cache).
        for _ in 0..2 {
            let m = signed_as(dev, now(), &uid(), r#"{"t":1}"#);
            let ack = c.publish(&format!("device/{dev}/data"), 1, false, &m);
            assert!(ack.is_ok(), "round {i}: {dev} refused: {ack:?}; log:\n{}", broker.log());
            sent.push(m);
        }
        // The previous connection's identity must not carry over: its data is refused.
        let m = signed_as(prev, now(), &uid(), r#"{"t":1}"#);
        let ack = c.publish(&format!("device/{prev}/data"), 1, false, &m);
        assert!(
            ack.is_not_authorized(),
            "round {i}: {dev} published as {prev}: {ack:?}; log:\n{}",
            broker.log()
        );
        c.disconnect();
    }
    let got: Vec<Vec<u8>> = monitor
        .drain(Duration::from_millis(500), Duration::from_secs(10))
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(got.len(), sent.len(), "log:\n{}", broker.log());
    assert_eq!(got, sent, "the monitor reads exactly the accepted messages, in order");
}

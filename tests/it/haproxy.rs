//! Cluster deployment behind HAProxy (issue 11): real brokers with the plugin behind a real
//! HAProxy in TCP mode (TLS passthrough), health-checked on each node's `/readyz`.
//!
//! Where a connection landed is read from each node's `/metrics`, never from logs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use testkit::*;

const WAIT: Duration = Duration::from_secs(15);

fn accepted(node: &Node) -> f64 {
    node.metrics().get("iotgw_messages_accepted_total").copied().unwrap_or(-1.0)
}

/// Sum of a sample over the nodes (a node not serving yet counts 0).
fn total(nodes: &[Node], name: &str) -> f64 {
    nodes.iter().map(|n| n.metrics().get(name).copied().unwrap_or(0.0)).sum()
}

fn logs(nodes: &[Node], h: &Haproxy) -> String {
    let mut out = format!("haproxy:\n{}", h.log());
    for n in nodes {
        out += &format!("\nnode {}:\n{}", n.index, n.broker.log());
    }
    out
}

/// `k` devices connect through HAProxy one after another, each publishes one signed message,
/// expects it accepted, and disconnects.
fn publish_through(env: &Env, h: &Haproxy, nodes: &[Node], k: usize) {
    for i in 0..k {
        let dev = SECRETS[i % SECRETS.len()].0;
        let mut c = Mqtt::connect(env, h.port(), dev);
        let ack = c.publish(
            &format!("device/{dev}/data"),
            1,
            false,
            &signed_as(dev, now(), &uid(), r#"{"i":1}"#),
        );
        assert!(ack.is_ok(), "{dev} through haproxy: {ack:?}; {}", logs(nodes, h));
        c.disconnect();
    }
}

/// Waits until the nodes' accepted counts add up to `want` (each snapshot lags up to 250 ms).
fn wait_total_accepted(nodes: &[Node], want: f64, h: &Haproxy) -> Vec<f64> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let per: Vec<f64> = nodes.iter().map(accepted).collect();
        if per.iter().sum::<f64>() == want {
            return per;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "accepted per node {per:?}, wanted {want} in total; {}",
            logs(nodes, h)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn passthrough_keeps_the_certificate_identity() {
    let env = Env::new();
    let nodes = start_nodes(&env, 2, |_| PluginOpts::new());
    let h = Haproxy::start(&upstreams(&nodes));
    h.wait_up(2, WAIT);

    // Positive control: a registered device, its own message, through HAProxy.
    let mut dev = Mqtt::connect(&env, h.port(), "sensor_001");
    let ack = dev.publish(
        "device/sensor_001/data",
        1,
        false,
        &signed_as("sensor_001", now(), &uid(), "{}"),
    );
    assert!(ack.is_ok(), "{ack:?}; {}", logs(&nodes, &h));
    // The same connection with a message signed for another device: the plugin compares it
    // with the certificate's CN, which it could not if TLS ended in HAProxy.
    let ack = dev.publish(
        "device/sensor_001/data",
        1,
        false,
        &signed_as("sensor_002", now(), &uid(), "{}"),
    );
    assert!(ack.is_not_authorized(), "{ack:?}; {}", logs(&nodes, &h));
    // A certificate whose CN is not registered, with a well-signed envelope for that name.
    let mut rogue = Mqtt::connect(&env, h.port(), "sensor_404");
    let ack = rogue.publish(
        "device/sensor_404/data",
        1,
        false,
        &signed_as("sensor_404", now(), &uid(), "{}"),
    );
    assert!(ack.is_not_authorized(), "{ack:?}; {}", logs(&nodes, &h));

    wait_total_accepted(&nodes, 1.0, &h);
    let deadline = std::time::Instant::now() + WAIT;
    while total(&nodes, "iotgw_messages_rejected_total{reason=\"unknown_device\"}") != 1.0
        || total(&nodes, "iotgw_messages_rejected_total{reason=\"identity\"}") != 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "one unknown_device and one identity rejection expected: {:?}; {}",
            nodes.iter().map(Node::metrics).collect::<Vec<_>>(),
            logs(&nodes, &h)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_unhealthy_node_is_marked_down_and_new_connections_land_on_the_healthy_one() {
    let env = Env::new();
    let nodes = start_nodes(&env, 2, |_| PluginOpts::new());
    let h = Haproxy::start(&upstreams(&nodes));
    h.wait_up(2, WAIT);

    // Control: with both healthy, round robin spreads connections over both.
    publish_through(&env, &h, &nodes, 4);
    let before = wait_total_accepted(&nodes, 4.0, &h);
    assert!(
        before.iter().all(|n| *n >= 1.0),
        "not spread over both nodes: {before:?}; {}",
        logs(&nodes, &h)
    );

    {
        // Node 1's outbox unwritable: its /readyz turns 503, HAProxy takes it out.
        let _frozen = Immutable::set(&nodes[1].spool);
        let body = nodes[1].wait_health(503, WAIT);
        assert!(body.contains("not writable"), "{body}");
        nodes[0].wait_health(200, WAIT);
        h.wait_up(1, WAIT);
        assert_eq!(h.server_status()[1].1, "DOWN", "{:?}", h.server_status());

        // Every new connection lands on node 0 (one landing on node 1 would be refused there,
        // its outbox being unwritable, and publish_through would fail).
        publish_through(&env, &h, &nodes, 6);
        let after = wait_total_accepted(&nodes, 10.0, &h);
        assert_eq!(after[1], before[1], "node 1 accepted while down: {after:?}");
        assert_eq!(after[0], before[0] + 6.0, "{after:?}");
    }

    // Writable again: healthy again, back in the rotation.
    nodes[1].wait_health(200, WAIT);
    h.wait_up(2, WAIT);
    publish_through(&env, &h, &nodes, 4);
    let last = wait_total_accepted(&nodes, 14.0, &h);
    assert!(last[1] > before[1], "node 1 never chosen again: {last:?}");
}

#[test]
fn devices_on_a_node_marked_down_are_disconnected_with_shutdown_sessions() {
    let env = Env::new();
    let nodes = start_nodes(&env, 2, |_| PluginOpts::new());
    let h = Haproxy::start_with(
        &upstreams(&nodes),
        "balance roundrobin\ndefault-server on-marked-down shutdown-sessions",
    );
    h.wait_up(2, WAIT);
    // Two held connections, one per node (round robin); find which is on node 1 by publishing.
    let mut devs: Vec<(&str, Mqtt)> = ["sensor_001", "sensor_002"]
        .into_iter()
        .map(|d| (d, Mqtt::connect(&env, h.port(), d)))
        .collect();
    let mut on_node1 = None;
    for (i, (d, c)) in devs.iter_mut().enumerate() {
        let before = accepted(&nodes[1]);
        let ack =
            c.publish(&format!("device/{d}/data"), 1, false, &signed_as(d, now(), &uid(), "{}"));
        assert!(ack.is_ok(), "{ack:?}; {}", logs(&nodes, &h));
        wait_total_accepted(&nodes, i as f64 + 1.0, &h);
        if accepted(&nodes[1]) > before {
            on_node1 = Some(i);
        }
    }
    let on_node1 =
        on_node1.unwrap_or_else(|| panic!("no connection on node 1; {}", logs(&nodes, &h)));
    let on_node0 = 1 - on_node1;

    // Taken out by its health check (maintenance would not fire on-marked-down).
    let _frozen = Immutable::set(&nodes[1].spool);
    h.wait_up(1, WAIT);
    assert!(
        devs[on_node1].1.wait_closed(WAIT),
        "the device on node 1 stayed connected; {}",
        logs(&nodes, &h)
    );
    // Control: the device on the healthy node keeps its connection and publishes.
    let (d0, c0) = &mut devs[on_node0];
    assert!(!c0.wait_closed(Duration::from_millis(500)), "node 0's device was cut too");
    let ack =
        c0.publish(&format!("device/{d0}/data"), 1, false, &signed_as(d0, now(), &uid(), "{}"));
    assert!(ack.is_ok(), "{ack:?}; {}", logs(&nodes, &h));
}

#[test]
fn a_killed_node_restarts_on_its_ports_and_haproxy_takes_it_back() {
    let env = Env::new();
    let mut nodes = start_nodes(&env, 1, |_| PluginOpts::new().set("max_payload_bytes", 65536));
    let h = Haproxy::start(&upstreams(&nodes));
    h.wait_up(1, WAIT);
    publish_through(&env, &h, &nodes, 1);
    wait_total_accepted(&nodes, 1.0, &h);
    let (port, mport) = (nodes[0].mqtt_port(), nodes[0].metrics_port.get());

    nodes[0].broker.kill9();
    h.wait_up(0, WAIT);
    assert_eq!(nodes[0].healthz().0, 0, "metrics port still answers after kill -9");

    nodes[0].restart(&env);
    assert_eq!((nodes[0].mqtt_port(), nodes[0].metrics_port.get()), (port, mport));
    nodes[0].wait_health(200, WAIT);
    // The per-node options and spool survive the restart.
    let conf = std::fs::read_to_string(&nodes[0].broker.conf_path).unwrap();
    assert!(conf.contains("plugin_opt_max_payload_bytes 65536"), "{conf}");
    assert!(conf.contains(&format!("plugin_opt_spool_path {}", nodes[0].spool.display())));
    h.wait_up(1, WAIT);
    // Counters restart with the process: the one message after the restart is the only one.
    publish_through(&env, &h, &nodes, 1);
    wait_total_accepted(&nodes, 1.0, &h);
}

fn haproxy_check(cfg: &Path) -> (bool, String) {
    let out = Command::new(haproxy_bin())
        .arg("-c")
        .arg("-f")
        .arg(cfg)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e})", haproxy_bin()));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_deploy_example_passes_haproxy_check() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let (ok, out) = haproxy_check(&cfg);
    assert!(ok, "haproxy -c -f {}:\n{out}", cfg.display());
    for needle in [
        "mode tcp",
        "option httpchk GET /readyz",
        "http-check expect status 200",
        "balance leastconn",
        "option tcpka",
        "on-marked-down shutdown-sessions",
    ] {
        let set = text.lines().any(|l| !l.trim_start().starts_with('#') && l.contains(needle));
        assert!(set, "no `{needle}` outside comments");
    }
    let proxy = text.lines().any(|l| !l.trim_start().starts_with('#') && l.contains("send-proxy"));
    assert!(!proxy, "the example must not send PROXY protocol");
    // Negative control: the check does reject a broken copy.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("haproxy.cfg");
    std::fs::write(&broken, text.replace("balance leastconn", "balance no-such-algorithm"))
        .unwrap();
    let (ok, out) = haproxy_check(&broken);
    assert!(!ok, "a broken config passed:\n{out}");
}

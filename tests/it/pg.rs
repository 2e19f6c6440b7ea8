//! The device registry in PostgreSQL (`plugin_opt_registry_url`), against real brokers: changes
//! made with `iotgw device … --registry-url` reach every node within a second, and a PostgreSQL
//! outage keeps known devices working while /healthz says the registry is stale.

use crate::metrics::{get, wait_health};
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::*;

const PASSWORD: &str = "hunter2-pg-password";

/// `iotgw ARGS`; panics with its output unless it succeeds.
fn iotgw(args: &[&str]) -> String {
    let o = Command::new(iotgw_path()).args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "iotgw {args:?}: {out}{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A gateway directory (the CLI's CA and mosquitto.conf) whose registry is in PostgreSQL.
struct Cli {
    _t: tempfile::TempDir,
    dir: String,
    url: String,
}

impl Cli {
    fn new(url: &str) -> Cli {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("gw").display().to_string();
        let plugin = plugin_path().display().to_string();
        iotgw(&[
            "init",
            &dir,
            "--port",
            "1",
            "--plugin",
            &plugin,
            "--backend-url",
            "http://127.0.0.1:9/device/{device_id}/data",
        ]);
        Cli { _t: t, dir, url: url.to_string() }
    }

    /// `iotgw device ARGS --dir DIR --registry-url URL`; returns when the change is committed.
    fn device(&self, args: &[&str]) -> String {
        let mut a = vec!["device"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--dir", &self.dir, "--registry-url", &self.url]);
        iotgw(&a)
    }
}

fn node(env: &Env, url: &str) -> (Broker, u16) {
    // Held until the broker has bound it.
    let mport = Port::reserve();
    let opts = PluginOpts::new()
        .set("registry_url", url)
        .set("metrics_listen", format!("127.0.0.1:{}", mport.get()));
    let b = Broker::start(env, &opts);
    (b, mport.get())
}

/// Waits (bounded) for a /healthz 503 that names the registry (before its first snapshot the
/// exporter answers 503 "starting", which is not what these tests look for).
fn wait_registry_stale(b: &Broker, port: u16) -> String {
    let t0 = Instant::now();
    loop {
        let (code, _, body) = get(port, "/healthz");
        if code == 503 && body.contains("registry") {
            return body;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "/healthz {code} {body:?}; {}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn publish(dev: &mut Mqtt, device: &str, secret: &str) -> Ack {
    let m = signed(secret, device, now(), &uid(), "{}");
    dev.publish(&format!("device/{device}/data"), 1, false, &m)
}

/// Connects and publishes until a publish is accepted; how long it took from `t0` (bounded).
fn accepted_after(env: &Env, b: &Broker, device: &str, secret: &str, t0: Instant) -> Duration {
    loop {
        let mut dev = Mqtt::connect(env, b.port, device);
        // A refused publish closes rumqttc's connection: a new one per attempt.
        if publish(&mut dev, device, secret).is_ok() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{device} never accepted; {}", b.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn cli_changes_reach_every_node_within_a_second_and_an_outage_keeps_known_devices_working() {
    let mut pg = Postgres::start();
    let url = pg.url_with_password(PASSWORD);
    let cli = Cli::new(&url);
    iotgw(&["registry", "init", "--registry-url", &url]);
    for d in ["sensor_001", "sensor_002"] {
        cli.device(&["add", d, "--secret", secret_of(d)]);
    }
    let (env1, env2) = (Env::new(), Env::new());
    let (b1, m1) = node(&env1, &url);
    let (b2, m2) = node(&env2, &url);
    for (b, m) in [(&b1, m1), (&b2, m2)] {
        wait_health(b, m, 200);
    }
    let nodes = [(&env1, &b1), (&env2, &b2)];

    // Positive control: a registered device is accepted on both nodes; negative control: one
    // that is not yet registered is refused.
    let new_secret = "pg-new-device-secret-01";
    for (env, b) in nodes {
        let mut d = Mqtt::connect(env, b.port, "sensor_001");
        assert!(publish(&mut d, "sensor_001", secret_of("sensor_001")).is_ok(), "{}", b.log());
        let mut n = Mqtt::connect(env, b.port, "pg_new");
        assert!(publish(&mut n, "pg_new", new_secret).is_refused(), "{}", b.log());
    }

    // Added through the CLI: accepted on every node within a second of the command's return.
    cli.device(&["add", "pg_new", "--secret", new_secret]);
    let added = Instant::now();
    for (env, b) in nodes {
        let took = accepted_after(env, b, "pg_new", new_secret, added);
        eprintln!("pg: add seen by the node on {} after {took:?}", b.port);
        assert!(took < Duration::from_secs(1), "{took:?}; {}", b.log());
    }

    // Disabled: its session is kicked on every node within a second, and it is refused after.
    let mut sessions: Vec<Mqtt> = nodes
        .iter()
        .map(|(env, b)| {
            let mut d = Mqtt::connect(env, b.port, "pg_new");
            assert!(publish(&mut d, "pg_new", new_secret).is_ok(), "{}", b.log());
            d
        })
        .collect();
    cli.device(&["disable", "pg_new"]);
    let disabled = Instant::now();
    for (s, (_, b)) in sessions.iter_mut().zip(nodes) {
        assert!(s.wait_closed(Duration::from_secs(1)), "still connected; {}", b.log());
    }
    eprintln!("pg: disabled device kicked on both nodes after {:?}", disabled.elapsed());
    for (env, b) in nodes {
        let mut d = Mqtt::connect(env, b.port, "pg_new");
        assert!(publish(&mut d, "pg_new", new_secret).is_refused(), "{}", b.log());
    }
    // Enabled again, then removed: refused within a second.
    cli.device(&["enable", "pg_new"]);
    for (env, b) in nodes {
        accepted_after(env, b, "pg_new", new_secret, Instant::now());
    }
    cli.device(&["remove", "pg_new"]);
    let removed = Instant::now();
    for (env, b) in nodes {
        loop {
            let mut d = Mqtt::connect(env, b.port, "pg_new");
            if publish(&mut d, "pg_new", new_secret).is_refused() {
                break;
            }
            assert!(
                removed.elapsed() < Duration::from_secs(1),
                "removed device accepted; {}",
                b.log()
            );
        }
    }

    // PostgreSQL stops: known devices keep working from memory, /healthz is 503 naming the
    // registry, and the metric says stale.
    let mut s2 = Mqtt::connect(&env1, b1.port, "sensor_002");
    assert!(publish(&mut s2, "sensor_002", secret_of("sensor_002")).is_ok());
    pg.stop();
    wait_registry_stale(&b1, m1);
    assert!(get(m1, "/metrics").2.contains("\niotgw_registry_stale 1\n"));
    for _ in 0..3 {
        assert!(publish(&mut s2, "sensor_002", secret_of("sensor_002")).is_ok(), "{}", b1.log());
    }
    // Back: healthy again, and changes flow again.
    pg.start_again();
    wait_health(&b1, m1, 200);
    wait_health(&b2, m2, 200);
    cli.device(&["disable", "sensor_002"]);
    assert!(s2.wait_closed(Duration::from_secs(1)), "still connected; {}", b1.log());
    for b in [&b1, &b2] {
        assert!(!b.log().contains(PASSWORD), "the password is in the broker's log");
    }
}

/// PostgreSQL down when the broker starts: it starts anyway, refusing every device and saying
/// so on /healthz, and catches up when PostgreSQL answers.
#[test]
fn a_broker_started_while_postgresql_is_down_starts_stale_and_catches_up() {
    let mut pg = Postgres::start();
    let url = pg.url();
    let cli = Cli::new(&url);
    cli.device(&["add", "sensor_001", "--secret", secret_of("sensor_001")]);
    pg.stop();
    let env = Env::new();
    let (b, m) = node(&env, &url);
    wait_registry_stale(&b, m);
    let mut d = Mqtt::connect(&env, b.port, "sensor_001");
    assert!(publish(&mut d, "sensor_001", secret_of("sensor_001")).is_refused(), "{}", b.log());
    pg.start_again();
    wait_health(&b, m, 200);
    accepted_after(&env, &b, "sensor_001", secret_of("sensor_001"), Instant::now());
}

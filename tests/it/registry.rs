//! The device registry under faults, against a real broker with real mutual TLS: a registry
//! locked by another process, a registry replaced by a file the plugin cannot read, rows whose
//! secret is too short, and a disabled device in a replaced registry.

use rusqlite::Connection as Db;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use testkit::*;

const DATA: &str = "device/sensor_001/data";

fn monitor_on(env: &Env, broker: &Broker, filter: &str) -> Mqtt {
    let mut monitor = Mqtt::connect(env, broker.port, "monitor");
    let code = monitor.subscribe(filter, 1);
    assert!(matches!(code, SubscribeReasonCode::Success(_)), "{code:?}; {}", broker.log());
    monitor
}

/// The counter for `reason` in the newest `stats` line (SIGHUP makes the plugin log it).
/// A revoked device's publish was refused for the right reason: with 0x87 and logged as
/// `unknown_device`, or closed before it was read (2.1 closes a device revoked while the broker
/// runs right after its CONNACK, so there is no reason to check; 2.0 shows the reason).
fn refused_as_unknown(broker: &Broker, ack: &Ack, mid: &str) -> bool {
    *ack == Ack::Closed || (ack.is_not_authorized() && rejected_with(broker, "unknown_device", mid))
}

fn stats_count(broker: &Broker, reason: &str) -> Option<u64> {
    let log = broker.log();
    let line = log.lines().rev().find(|l| l.contains("secure-iot-gateway: stats "))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{reason}=")))
        .and_then(|n| n.parse().ok())
}

/// Publishes a fresh message for `device` until the broker accepts one (at least one attempt,
/// then until `within` passes); returns how long it took.
fn accepted_within(
    dev: &mut Mqtt,
    device: &str,
    secret: &str,
    within: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        let m = signed(secret, device, now(), &uid(), "{}");
        if dev.publish(&format!("device/{device}/data"), 1, false, &m).is_ok() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() >= within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Publish -> receipt at the monitor, one message at a time, `n` times.
fn latencies(dev: &mut Mqtt, monitor: &mut Mqtt, broker: &Broker, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let m = signed_as("sensor_001", now(), &uid(), "{}");
        let t0 = Instant::now();
        assert!(dev.publish(DATA, 0, false, &m).is_ok());
        let got = monitor.next_message(Duration::from_secs(10));
        lat.push(t0.elapsed());
        assert_eq!(got.map(|x| x.1), Some(m), "good message lost; {}", broker.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    lat
}

struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Issue 8 finding 3. Another process holds the registry locked (`BEGIN EXCLUSIVE`) while a
/// client with a valid certificate but no registry row floods the data topic. The registered
/// device's publish -> subscriber latency must stay low: the broker thread never waits on SQLite.
#[test]
fn locked_registry_and_an_unknown_device_flood_do_not_slow_a_registered_device() {
    let env = Env::new();
    // Up to 1,101 good messages inside the timestamp window: above the default replay cap.
    let broker = Broker::start(&env, &PluginOpts::new().set("replay_cache_size", 5000));
    let mut monitor = monitor_on(&env, &broker, DATA);
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    // Positive control before anything else: the good path works.
    let m = signed_as("sensor_001", now(), &uid(), "{}");
    assert!(dev.publish(DATA, 0, false, &m).is_ok());
    assert_eq!(monitor.next_message(Duration::from_secs(5)).map(|x| x.1), Some(m));

    let lock = env.db();
    let probe = env.db();
    probe.busy_timeout(Duration::ZERO).unwrap();
    let count = |c: &rusqlite::Connection| {
        c.query_row("SELECT count(*) FROM devices", [], |r| r.get::<_, i64>(0))
    };
    let stop = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    const CONTROL: usize = 200;
    const LIMIT: Duration = Duration::from_millis(5);
    const SAMPLES: usize = 300;
    let (control, locked, mut intruder) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let mut intruder = Mqtt::connect(&env, broker.port, "intruder_1");
            while !stop.load(Ordering::Relaxed) {
                // QoS 0, paced: an open-loop flood of ~150 messages a second (7 times what the
                // old plugin could refuse per second with the registry locked), without starving
                // the 2-core test machine.
                let m = signed("unregistered-secret", "intruder_1", now(), &uid(), "{}");
                assert!(intruder.publish("device/intruder_1/data", 0, false, &m).is_ok());
                sent.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            intruder
        });
        // Whatever happens below (a failed assertion too), the flood stops and the scope ends.
        let _stop = StopOnDrop(&stop);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.load(Ordering::Relaxed) < 20 && !flood.is_finished() {
            assert!(Instant::now() < deadline, "the flood did not start; {}", broker.log());
            std::thread::sleep(Duration::from_millis(5));
        }
        // Control: the same flood, the registry not locked. It tells what this (shared) machine
        // can do at this moment.
        let control = latencies(&mut dev, &mut monitor, &broker, CONTROL);
        lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
        // The lock is real: any other connection is refused at once.
        let r = count(&probe);
        assert!(
            matches!(&r, Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy),
            "the registry is not locked: {r:?}"
        );
        // Up to three windows with the lock held throughout; see the assertions for why.
        let mut locked = Vec::new();
        for _ in 0..3 {
            let mut w = latencies(&mut dev, &mut monitor, &broker, SAMPLES);
            w.sort();
            let clean = percentile(&w, 0.99) < LIMIT;
            locked.push(w);
            if clean {
                break;
            }
        }
        assert!(count(&probe).is_err(), "the lock was lost during the measurement");
        lock.execute_batch("ROLLBACK").unwrap();
        stop.store(true, Ordering::Relaxed);
        (control, locked, flood.join().unwrap())
    });
    let q = |v: &[Duration]| (percentile(v, 0.5), percentile(v, 0.9), percentile(v, 0.99));
    let mut control = control;
    control.sort();
    let (c50, c90, c99) = q(&control);
    let sent = sent.load(Ordering::Relaxed) as u64 + 1;
    eprintln!(
        "unknown-device flood of {sent} messages; registered device publish->receipt (n={CONTROL}/window {SAMPLES}): registry unlocked p50 {c50:?} p90 {c90:?} p99 {c99:?} max {:?}",
        control.last().unwrap()
    );
    for (i, w) in locked.iter().enumerate() {
        let (p50, p90, p99) = q(w);
        eprintln!(
            "  registry locked, window {}: p50 {p50:?} p90 {p90:?} p99 {p99:?} max {:?}",
            i + 1,
            w.last().unwrap()
        );
        // Before the fix every unknown-device message held the broker ~50 ms: p50 ~100 ms. The
        // median is held to 5 ms always; p90 too, or to the control's when the machine is busy.
        assert!(p50 < LIMIT, "window {}: p50 {p50:?}; the broker stalled", i + 1);
        let allowed90 = LIMIT.max(c90 * 3 / 2);
        assert!(
            p90 < allowed90,
            "window {}: p90 {p90:?} over {allowed90:?}; the broker stalled",
            i + 1
        );
    }
    // p99 under 5 ms. On a shared 2-core machine the tail of a 2-second window is at the mercy
    // of other processes: under load the unlocked control alone misses 5 ms (measured 5-12 ms
    // at load 9). So the best of up to three locked windows must be under 5 ms, or, when the
    // control shows the machine cannot do that at the moment, no worse than 1.5 times the
    // control: the lock adds nothing that the same machine does not show without it. A broker
    // that waits on the lock fails either way (before the fix: p50 ~100 ms, p99 ~190 ms).
    let best = locked.iter().map(|w| percentile(w, 0.99)).min().unwrap();
    let allowed = LIMIT.max(c99 * 3 / 2);
    assert!(
        best < allowed,
        "best window p99 {best:?} over {allowed:?} (control p99 {c99:?}); the broker stalled"
    );
    // Positive control: the flood was large and reached the plugin, which refused every message
    // as unknown_device (acl_file alone would also refuse it, so the plugin's own counter must
    // account for all of them).
    assert!(sent >= 300, "only {sent} flood messages; the test did not flood");
    // The intruder is refused, not disconnected.
    let m = signed("unregistered-secret", "intruder_1", now(), &uid(), "{}");
    let ack = intruder.publish("device/intruder_1/data", 1, false, &m);
    assert!(ack.is_not_authorized(), "{ack:?}; {}", broker.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        broker.signal("HUP");
        std::thread::sleep(Duration::from_millis(200));
        match stats_count(&broker, "unknown_device") {
            Some(n) if n >= sent => break,
            n => assert!(
                Instant::now() < deadline,
                "the plugin counted {n:?} unknown_device refusals of {sent} sent; {}",
                broker.log()
            ),
        }
    }
}

fn replace_file(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A copy of the registry (`VACUUM INTO`), changed by `sql`, moved over the original (new inode,
/// as a restore from backup or an editor would do).
fn replace_registry(env: &Env, sql: &str) {
    let path = env.path().join("devices.db");
    let tmp = env.path().join("devices.db.new");
    let _ = std::fs::remove_file(&tmp);
    env.db().execute("VACUUM INTO ?1", [tmp.to_str().unwrap()]).unwrap();
    let c = Db::open(&tmp).unwrap();
    secure_iot_gateway::registry::migrate(&c).unwrap();
    c.execute_batch(sql).unwrap();
    drop(c);
    std::fs::rename(&tmp, &path).unwrap();
}

/// Issue 8 finding 4. The registry replaced by a file the plugin cannot read: one error line for
/// the change of state (not one per poll), the last good snapshot stays in use meanwhile (the
/// documented choice), and a readable registry again logs one recovery line and applies.
#[test]
fn unreadable_registry_is_logged_once_and_recovery_applies_the_new_state() {
    let env = Env::new();
    let broker = Broker::start(&env, &PluginOpts::new());
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    let mut dev2 = Mqtt::connect(&env, broker.port, "sensor_002");
    assert!(
        accepted_within(&mut dev, "sensor_001", secret_of("sensor_001"), Duration::ZERO).is_some()
    );

    const BROKEN: &str = "registry unreadable";
    const RECOVERED: &str = "registry readable again";
    let path = env.path().join("devices.db");
    replace_file(&path, b"this is not an SQLite database, just bytes in its place\n");
    assert!(broker.wait_log(BROKEN, Duration::from_secs(2)), "no error line; {}", broker.log());
    // Several more polls: still one line.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(broker.count(BROKEN), 1, "{}", broker.log());
    // Meanwhile the last good snapshot decides.
    let m = signed_as("sensor_001", now(), &uid(), "{}");
    assert!(dev.publish(DATA, 1, false, &m).is_ok(), "{}", broker.log());

    // A readable registry again, in which sensor_001 is disabled.
    let good = env.path().join("good.db");
    let c = Db::open(&good).unwrap();
    secure_iot_gateway::registry::create(&c).unwrap();
    c.execute("INSERT INTO devices (device_id, shared_secret, created_at, enabled) VALUES ('sensor_001', ?1, 0, 0), ('sensor_002', ?2, 0, 1)", [secret_of("sensor_001"), secret_of("sensor_002")]).unwrap();
    drop(c);
    std::fs::rename(&good, &path).unwrap();
    assert!(
        broker.wait_log(RECOVERED, Duration::from_secs(2)),
        "no recovery line; {}",
        broker.log()
    );
    let t0 = Instant::now();
    loop {
        let mid = uid();
        let ack = dev.publish(DATA, 1, false, &signed_as("sensor_001", now(), &mid, "{}"));
        if ack.is_refused() {
            assert!(refused_as_unknown(&broker, &ack, &mid), "{}", broker.log());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "disabled device still accepted; {}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        accepted_within(&mut dev2, "sensor_002", secret_of("sensor_002"), Duration::from_secs(1))
            .is_some(),
        "{}",
        broker.log()
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(broker.count(BROKEN), 1, "{}", broker.log());
    assert_eq!(broker.count(RECOVERED), 1, "{}", broker.log());
}

/// Issue 8 finding 6. Rows with an empty or 5-byte secret are not usable devices: refused as
/// unknown_device, with one line naming each; a 16-byte secret is accepted.
#[test]
fn secrets_shorter_than_16_bytes_make_the_device_unusable() {
    let env = Env::new();
    let db = env.db();
    for (id, secret) in [("short_5", "abcde"), ("empty_0", ""), ("exact_16", "0123456789abcdef")] {
        db.execute("INSERT INTO devices VALUES (?1, ?2, 0)", [id, secret]).unwrap();
    }
    let broker = Broker::start(&env, &PluginOpts::new());
    for (id, secret) in [("short_5", "abcde"), ("empty_0", "")] {
        let mut dev = Mqtt::connect(&env, broker.port, id);
        let mid = uid();
        let ack = dev.publish(
            &format!("device/{id}/data"),
            1,
            false,
            &signed(secret, id, now(), &mid, "{}"),
        );
        assert!(ack.is_not_authorized(), "{id}: {ack:?}; {}", broker.log());
        assert!(rejected_with(&broker, "unknown_device", &mid), "{id}: {}", broker.log());
        assert_eq!(
            broker
                .count(&format!("device {id} is not usable: its secret is shorter than 16 bytes")),
            1,
            "{}",
            broker.log()
        );
    }
    let mut ok = Mqtt::connect(&env, broker.port, "exact_16");
    let m = signed("0123456789abcdef", "exact_16", now(), &uid(), "{}");
    assert!(ok.publish("device/exact_16/data", 1, false, &m).is_ok(), "{}", broker.log());
}

/// Issue 8 finding 6, second part. A registry restored from another copy (a new file) in which
/// sensor_001 has a new secret and is disabled: the device is refused as unknown_device whatever
/// it signs with. (The broker thread used to keep a connection to the replaced file and looked
/// misses up there: the old row came back, so the new secret failed as `signature` and the old
/// one was accepted.)
#[test]
fn disabled_device_in_a_replaced_registry_is_unknown_whatever_it_signs_with() {
    let env = Env::new();
    let broker = Broker::start(&env, &PluginOpts::new());
    let mut dev = Mqtt::connect(&env, broker.port, "sensor_001");
    assert!(
        accepted_within(&mut dev, "sensor_001", secret_of("sensor_001"), Duration::ZERO).is_some()
    );
    let new_secret = "rotated-secret-0123456789";
    replace_registry(
        &env,
        &format!(
            "UPDATE devices SET shared_secret = '{new_secret}', enabled = 0 WHERE device_id = 'sensor_001';
             INSERT INTO devices (device_id, shared_secret, created_at) VALUES ('sensor_004', 'sensor-four-secret-0001', 0);"
        ),
    );
    // sensor_004 exists only in the new file: once it is accepted, the new file is in use.
    let mut dev4 = Mqtt::connect(&env, broker.port, "sensor_004");
    assert!(
        accepted_within(&mut dev4, "sensor_004", "sensor-four-secret-0001", Duration::from_secs(2))
            .is_some(),
        "{}",
        broker.log()
    );
    for secret in [new_secret, secret_of("sensor_001")] {
        let mid = uid();
        let ack = dev.publish(DATA, 1, false, &signed(secret, "sensor_001", now(), &mid, "{}"));
        assert!(ack.is_refused(), "disabled device accepted ({ack:?}); {}", broker.log());
        assert!(refused_as_unknown(&broker, &ack, &mid), "{}", broker.log());
    }
    // In place (the CLI's way), and back: enabled again, accepted with the new secret.
    env.db().execute("UPDATE devices SET enabled = 1 WHERE device_id = 'sensor_001'", []).unwrap();
    assert!(
        accepted_within(&mut dev, "sensor_001", new_secret, Duration::from_secs(2)).is_some(),
        "{}",
        broker.log()
    );
    env.db().execute("UPDATE devices SET enabled = 0 WHERE device_id = 'sensor_001'", []).unwrap();
    let t0 = Instant::now();
    loop {
        let mid = uid();
        let ack = dev.publish(DATA, 1, false, &signed(new_secret, "sensor_001", now(), &mid, "{}"));
        if ack.is_refused() {
            assert!(refused_as_unknown(&broker, &ack, &mid), "{}", broker.log());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "disabled device still accepted; {}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

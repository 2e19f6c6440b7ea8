//! `iotgw` through the built binary, against temp dirs; and init + device add + broker + sign end
//! to end.

use crate::support::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn iotgw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iotgw")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = iotgw(args);
    assert!(
        o.status.success(),
        "iotgw {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str], needle: &str) -> String {
    let o = iotgw(args);
    let all = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "iotgw {args:?} should fail:\n{all}");
    assert!(all.contains(needle), "iotgw {args:?}: expected {needle:?} in:\n{all}");
    all
}

/// A gateway dir the broker user can traverse (tempdirs are 0700).
fn gwdir(port: u16) -> (tempfile::TempDir, String) {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = t.path().join("gw").display().to_string();
    let plugin = plugin_path().display().to_string();
    ok(&[
        "init",
        &dir,
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--plugin",
        &plugin,
        "--backend-url",
        "http://127.0.0.1:9/device/{device_id}/data",
    ]);
    (t, dir)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn secret_from(out: &str) -> String {
    out.lines()
        .find_map(|l| {
            l.rsplit_once("secret (shown once, store it in the device): ")
                .map(|(_, s)| s.to_string())
        })
        .expect("secret printed")
}

fn db_rows(dir: &str) -> i64 {
    rusqlite::Connection::open(Path::new(dir).join("devices.db"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn init_writes_a_complete_directory_with_safe_modes_and_refuses_to_overwrite() {
    let (_t, dir) = gwdir(free_port());
    let d = Path::new(&dir);
    for f in ["ca.pem", "ca.key", "broker.pem", "broker.key", "devices.db", "acl", "mosquitto.conf"]
    {
        assert!(d.join(f).exists(), "{f} missing");
    }
    for secret in ["ca.key", "broker.key", "devices.db"] {
        assert_eq!(mode(&d.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(mode(&d.join("state")), 0o700);
    let conf = std::fs::read_to_string(d.join("mosquitto.conf")).unwrap();
    assert!(conf.contains(&format!("cafile {}", d.join("ca.pem").display())), "{conf}");
    assert!(
        conf.contains("require_certificate true") && conf.contains("use_identity_as_username true")
    );
    let cert =
        openssl::x509::X509::from_pem(&std::fs::read(d.join("broker.pem")).unwrap()).unwrap();
    let sans: Vec<String> = cert
        .subject_alt_names()
        .unwrap()
        .iter()
        .map(|n| n.dnsname().map(str::to_owned).unwrap_or_else(|| format!("{:?}", n.ipaddress())))
        .collect();
    assert!(
        sans.contains(&"localhost".to_string()) && sans.iter().any(|s| s.contains("127, 0, 0, 1")),
        "{sans:?}"
    );
    let ca_before = std::fs::read(d.join("ca.pem")).unwrap();
    fails(&["init", &dir], "already has a CA");
    assert_eq!(std::fs::read(d.join("ca.pem")).unwrap(), ca_before);
    ok(&["init", &dir, "--force", "--host", "mqtt.example.com"]);
    assert_ne!(std::fs::read(d.join("ca.pem")).unwrap(), ca_before);
    ok(&["check-config", &format!("{dir}/mosquitto.conf")]);
}

#[test]
fn device_commands_and_their_bad_input() {
    let (_t, dir) = gwdir(free_port());
    let out = ok(&["device", "add", "sensor_001", "--dir", &dir]);
    let secret = secret_from(&out);
    assert_eq!(secret.len(), 64, "32 random bytes, hex");
    assert!(Path::new(&dir).join("devices/sensor_001.pem").exists());
    assert_eq!(mode(&Path::new(&dir).join("devices/sensor_001.key")), 0o600);
    ok(&["device", "add", "sensor_002", "--secret", "a-chosen-secret-1234", "--dir", &dir]);
    // Bad input changes nothing.
    fails(&["device", "add", "sensor_001", "--dir", &dir], "already exists");
    fails(&["device", "add", "bad/id", "--dir", &dir], "invalid device id");
    fails(&["device", "add", "..", "--dir", &dir], "invalid device id");
    fails(&["device", "add", "x", "--secret", "short", "--dir", &dir], "shorter than 16");
    fails(&["device", "show", "nope", "--dir", &dir], "no device \"nope\"");
    fails(&["device", "disable", "nope", "--dir", &dir], "no device");
    fails(&["device", "remove", "nope", "--dir", &dir], "no device");
    fails(&["device", "rotate-secret", "nope", "--dir", &dir], "no device");
    fails(&["device", "list", "--dir", "/nonexistent/gw"], "no device registry");
    assert_eq!(db_rows(&dir), 2);
    // list and show never print the secret unless asked.
    let list = ok(&["device", "list", "--dir", &dir]);
    assert!(list.contains("sensor_001") && list.contains("sensor_002") && !list.contains(&secret));
    assert!(!ok(&["device", "show", "sensor_001", "--dir", &dir]).contains(&secret));
    assert!(ok(&["device", "show", "sensor_001", "--show-secret", "--dir", &dir]).contains(&secret));
    ok(&["device", "disable", "sensor_001", "--dir", &dir]);
    assert!(ok(&["device", "list", "--dir", &dir])
        .lines()
        .any(|l| l.starts_with("sensor_001") && l.contains(" no ")));
    ok(&["device", "enable", "sensor_001", "--dir", &dir]);
    ok(&["device", "remove", "sensor_002", "--dir", &dir]);
    assert!(!Path::new(&dir).join("devices/sensor_002.pem").exists());
    assert_eq!(db_rows(&dir), 1);
    // An unreadable CA: a clear error, and no row or file left behind.
    std::fs::rename(Path::new(&dir).join("ca.key"), Path::new(&dir).join("ca.key.moved")).unwrap();
    fails(&["device", "add", "sensor_003", "--dir", &dir], "cannot read the CA key");
    assert_eq!(db_rows(&dir), 1);
    assert!(!Path::new(&dir).join("devices/sensor_003.pem").exists());
}

#[test]
fn import_is_all_or_nothing() {
    let (t, dir) = gwdir(free_port());
    ok(&["device", "add", "existing", "--dir", &dir]);
    let f = t.path().join("fleet.csv");
    std::fs::write(&f, "# id,secret\nfleet_1\nfleet_2,secret-of-fleet-two\nfleet_1\n").unwrap();
    fails(&["device", "import", f.to_str().unwrap(), "--dir", &dir], "appears twice");
    std::fs::write(&f, "fleet_1\nbad id\n").unwrap();
    fails(&["device", "import", f.to_str().unwrap(), "--dir", &dir], "line 2");
    std::fs::write(&f, "fleet_1\nexisting\n").unwrap();
    fails(&["device", "import", f.to_str().unwrap(), "--dir", &dir], "already exists");
    assert_eq!(db_rows(&dir), 1);
    assert!(!Path::new(&dir).join("devices/fleet_1.pem").exists());
    std::fs::write(&f, "fleet_1\nfleet_2,secret-of-fleet-two\n\nfleet_3\n").unwrap();
    let out = ok(&["device", "import", f.to_str().unwrap(), "--dir", &dir]);
    assert!(
        out.contains("imported 3 devices") && out.contains("fleet_2,secret-of-fleet-two"),
        "{out}"
    );
    assert_eq!(db_rows(&dir), 4);
}

#[test]
fn sign_and_verify_reproduce_every_vector() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vectors.json"
        ))
        .unwrap(),
    )
    .unwrap();
    for case in v["valid"].as_array().unwrap() {
        let env: serde_json::Value =
            serde_json::from_str(case["envelope"].as_str().unwrap()).unwrap();
        let secret = case["secret"].as_str().unwrap();
        let mut args = vec![
            "sign".to_string(),
            "--device".into(),
            env["device_id"].as_str().unwrap().into(),
            "--secret".into(),
            secret.into(),
            "--message-id".into(),
            env["message_id"].as_str().unwrap().into(),
            "--timestamp".into(),
            env["timestamp"].to_string(),
            "--payload".into(),
            env["payload"].to_string(),
        ];
        for (k, val) in env.as_object().unwrap() {
            if !["device_id", "timestamp", "message_id", "payload", "signature"]
                .contains(&k.as_str())
            {
                args.push("--extra".into());
                args.push(format!("{k}={val}"));
            }
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ok(&argv);
        let signed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(signed["signature"], case["signature"], "{}", case["name"]);
        assert!(
            ok(&["verify", "--secret", secret, case["envelope"].as_str().unwrap()])
                .starts_with("valid"),
            "{}",
            case["name"]
        );
    }
    for case in v["invalid"].as_array().unwrap() {
        let o = iotgw(&[
            "verify",
            "--secret",
            case["secret"].as_str().unwrap(),
            case["envelope"].as_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1), "{} should not verify", case["name"]);
        let want = case["reason"].as_str().unwrap().split(':').next().unwrap();
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(want),
            "{}: {}",
            case["name"],
            String::from_utf8_lossy(&o.stdout)
        );
    }
    fails(&["sign", "--device", "a/b", "--secret", "s", "--payload", "{}"], "invalid device id");
    fails(&["sign", "--device", "d", "--secret", "s", "--payload", "{nope"], "not JSON");
    // The signer refuses what the verifier would call malformed; the edge itself is signed.
    fails(&["sign", "--device", "d", "--secret", "s", "--payload", "9007199254740992"], "2^53");
    fails(
        &["sign", "--device", "d", "--secret", "s", "--payload", "{\"a\":1,\"a\":2}"],
        "duplicate",
    );
    ok(&["sign", "--device", "d", "--secret", "s", "--payload=-9007199254740991"]);
}

#[test]
fn check_config_names_the_bad_option() {
    let (_t, dir) = gwdir(free_port());
    let conf = format!("{dir}/mosquitto.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text + "plugin_opt_workers lots\n").unwrap();
    fails(&["check-config", &conf], "plugin_opt_workers \"lots\"");
}

#[test]
fn init_device_add_broker_and_sign_end_to_end_with_a_secret_rotation() {
    let port = free_port();
    let (t, dir) = gwdir(port);
    let secret = secret_from(&ok(&["device", "add", "sensor_001", "--dir", &dir]));
    // The broker exactly as `init` configured it (as root it drops to the mosquitto user).
    let mut env = Env::new();
    env.dir = tempfile::tempdir_in(t.path()).unwrap();
    let d = Path::new(&dir);
    let broker = Broker::start_conf(&env, port, d.join("mosquitto.conf"));
    let ca = std::fs::read(d.join("ca.pem")).unwrap();
    let cert = (
        std::fs::read(d.join("devices/sensor_001.pem")).unwrap(),
        std::fs::read(d.join("devices/sensor_001.key")).unwrap(),
    );
    let mut dev = Mqtt::try_connect(
        &env,
        port,
        ConnectOpts { cn: None, ca: Some(ca), cert: Some(cert), will: None },
    )
    .unwrap();
    let envelope = ok(&[
        "sign",
        "--device",
        "sensor_001",
        "--payload",
        r#"{"temperature":22.5}"#,
        "--dir",
        &dir,
    ]);
    assert!(
        dev.publish("device/sensor_001/data", 1, false, envelope.trim().as_bytes()).is_ok(),
        "{}",
        broker.log()
    );
    // Rotation: both secrets work during the grace period, only the new one after it.
    let out = ok(&["device", "rotate-secret", "sensor_001", "--grace", "4s", "--dir", &dir]);
    let rotated = std::time::Instant::now();
    let new =
        out.lines().find_map(|l| l.strip_prefix("new secret (shown once): ")).unwrap().to_string();
    let with = |s: &str| ok(&["sign", "--device", "sensor_001", "--secret", s, "--payload", "{}"]);
    // Registry changes reach the plugin within a second.
    while !dev.publish("device/sensor_001/data", 1, false, with(&new).trim().as_bytes()).is_ok() {
        assert!(
            rotated.elapsed() < Duration::from_secs(2),
            "new secret still refused; {}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        dev.publish("device/sensor_001/data", 1, false, with(&secret).trim().as_bytes()).is_ok(),
        "old secret refused during grace; {}",
        broker.log()
    );
    // The deadline is a whole Unix second, inclusive: allow one second of granularity.
    std::thread::sleep(Duration::from_millis(5100).saturating_sub(rotated.elapsed()));
    assert!(
        dev.publish("device/sensor_001/data", 1, false, with(&secret).trim().as_bytes())
            .is_not_authorized(),
        "old secret still accepted after grace"
    );
    assert!(dev.publish("device/sensor_001/data", 1, false, with(&new).trim().as_bytes()).is_ok());
    assert!(broker.log().contains("rejected reason=signature"), "{}", broker.log());
}

#[test]
fn simulator_runs_readings_and_the_four_attacks() {
    let port = free_port();
    let (t, dir) = gwdir(port);
    for dev in ["sensor_001", "sensor_002"] {
        ok(&["device", "add", dev, "--dir", &dir]);
    }
    let mut env = Env::new();
    env.dir = tempfile::tempdir_in(t.path()).unwrap();
    let broker = Broker::start_conf(&env, port, Path::new(&dir).join("mosquitto.conf"));
    let out = ok(&[
        "simulate",
        "--dir",
        &dir,
        "--port",
        &port.to_string(),
        "--device",
        "sensor_001",
        "--device",
        "sensor_002",
        "--count",
        "2",
        "--interval",
        "0.2",
        "--no-color",
        "--attack",
        "tamper",
        "--attack",
        "replay",
        "--attack",
        "old-timestamp",
        "--attack",
        "wrong-identity",
    ]);
    assert!(
        out.contains("simulation: 8 messages sent, 8 answered as expected"),
        "{out}\n{}",
        broker.log()
    );
    for reason in ["signature", "replay", "timestamp", "identity"] {
        assert!(
            broker.log().contains(&format!("rejected reason={reason} ")),
            "{reason}: {}",
            broker.log()
        );
    }
}

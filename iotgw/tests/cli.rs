//! `iotgw` through the built binary, against temp dirs; and init + device add + broker + sign end
//! to end.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use testkit::*;

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
fn gwdir(port: &Port) -> (tempfile::TempDir, String) {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = t.path().join("gw").display().to_string();
    let plugin = plugin_path().display().to_string();
    ok(&[
        "init",
        &dir,
        "--port",
        &port.get().to_string(),
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
    let (_t, dir) = gwdir(&Port::reserve());
    let d = Path::new(&dir);
    for f in ["ca.pem", "ca.key", "broker.pem", "broker.key", "devices.db", "acl", "mosquitto.conf"]
    {
        assert!(d.join(f).exists(), "{f} missing");
    }
    for secret in ["ca.key", "broker.key", "devices.db"] {
        assert_eq!(mode(&d.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(mode(&d.join("state")), 0o700);
    assert_eq!(mode(&d.join("acl")), 0o640, "the acl_file is not world-readable");
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
    let (_t, dir) = gwdir(&Port::reserve());
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
    let (t, dir) = gwdir(&Port::reserve());
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
            "/../tests/fixtures/vectors.json"
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
    let (_t, dir) = gwdir(&Port::reserve());
    let conf = format!("{dir}/mosquitto.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text + "plugin_opt_workers lots\n").unwrap();
    fails(&["check-config", &conf], "plugin_opt_workers \"lots\"");
}

#[test]
fn init_device_add_broker_and_sign_end_to_end_with_a_secret_rotation() {
    let port = Port::reserve();
    let (t, dir) = gwdir(&port);
    let secret = secret_from(&ok(&["device", "add", "sensor_001", "--dir", &dir]));
    // The broker exactly as `init` configured it (as root it drops to the mosquitto user).
    let mut env = Env::new();
    env.dir = tempfile::tempdir_in(t.path()).unwrap();
    let d = Path::new(&dir);
    let broker = Broker::start_conf(&env, &port, d.join("mosquitto.conf"));
    let ca = std::fs::read(d.join("ca.pem")).unwrap();
    let cert = (
        std::fs::read(d.join("devices/sensor_001.pem")).unwrap(),
        std::fs::read(d.join("devices/sensor_001.key")).unwrap(),
    );
    let mut dev = Mqtt::try_connect(
        &env,
        port.get(),
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
    let port = Port::reserve();
    let (t, dir) = gwdir(&port);
    for dev in ["sensor_001", "sensor_002"] {
        ok(&["device", "add", dev, "--dir", &dir]);
    }
    let mut env = Env::new();
    env.dir = tempfile::tempdir_in(t.path()).unwrap();
    let broker = Broker::start_conf(&env, &port, Path::new(&dir).join("mosquitto.conf"));
    let out = ok(&[
        "simulate",
        "--dir",
        &dir,
        "--port",
        &port.get().to_string(),
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

#[test]
fn a_device_cannot_be_named_like_a_service_identity() {
    let (t, dir) = gwdir(&Port::reserve());
    let d = Path::new(&dir);
    // `init` makes `dashboard` a service identity.
    fails(&["device", "add", "dashboard", "--dir", &dir], "is a service identity");
    let f = t.path().join("fleet.csv");
    std::fs::write(&f, "fleet_1\ndashboard\n").unwrap();
    fails(&["device", "import", f.to_str().unwrap(), "--dir", &dir], "line 2");
    assert_eq!(db_rows(&dir), 0);
    assert!(!d.join("devices/dashboard.pem").exists() && !d.join("devices/fleet_1.pem").exists());
    // Positive controls: other names work, and the names come from mosquitto.conf.
    ok(&["device", "add", "dashboard2", "--dir", &dir]);
    let conf = d.join("mosquitto.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text.replace("service_identities dashboard", "service_identities ops"))
        .unwrap();
    fails(&["device", "add", "ops", "--dir", &dir], "is a service identity");
    ok(&["device", "add", "dashboard", "--dir", &dir]);
    ok(&["check-config", conf.to_str().unwrap()]);
    // A registry that already holds one (written behind the CLI's back) fails check-config.
    std::fs::write(&conf, text).unwrap();
    let out = iotgw(&["check-config", conf.to_str().unwrap()]);
    let all = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("device \"dashboard\"") && all.contains("service identity"), "{all}");
}

#[test]
fn device_ids_are_1_to_64_characters_in_every_tool() {
    let (t, dir) = gwdir(&Port::reserve());
    let (id64, id65) = ("a".repeat(64), "b".repeat(65));
    ok(&["device", "add", &id64, "--dir", &dir]);
    let cert = openssl::x509::X509::from_pem(
        &std::fs::read(Path::new(&dir).join(format!("devices/{id64}.pem"))).unwrap(),
    )
    .unwrap();
    let cn = cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .map(|e| String::from_utf8(e.data().as_slice().to_vec()).unwrap())
        .unwrap();
    assert_eq!(cn, id64);
    fails(&["device", "add", &id65, "--dir", &dir], "invalid device id");
    let f = t.path().join("fleet.csv");
    std::fs::write(&f, format!("{id65}\n")).unwrap();
    fails(&["device", "import", f.to_str().unwrap(), "--dir", &dir], "invalid device id");
    assert_eq!(db_rows(&dir), 1);
    let s = "sixteen-chars-secret";
    let signed64 = ok(&["sign", "--device", &id64, "--secret", s, "--payload", "{}"]);
    assert!(ok(&["verify", "--secret", s, signed64.trim()]).starts_with("valid"));
    fails(&["sign", "--device", &id65, "--secret", s, "--payload", "{}"], "invalid device id");
    // An envelope from a 65-character id is malformed, not a signature mismatch.
    let forged = signed64.replace(&id64, &id65);
    let o = iotgw(&["verify", "--secret", s, forged.trim()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("malformed"), "{o:?}");
    fails(&["device", "show", &id65, "--dir", &dir], "invalid device id");
    fails(&["simulate", "--dir", &dir, "--device", &id65, "--count", "0"], "invalid device id");
}

#[test]
fn init_and_device_add_refuse_planted_symlinks_and_leave_their_targets_untouched() {
    use std::os::unix::fs::{symlink, MetadataExt};
    let outside = tempfile::tempdir().unwrap();
    let (file, odir) = (outside.path().join("file"), outside.path().join("dir"));
    std::fs::write(&file, b"precious").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::create_dir(&odir).unwrap();
    std::fs::set_permissions(&odir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode())
    };
    let (file_meta, dir_meta) = (before(&file), before(&odir));
    let plugin = plugin_path().display().to_string();
    for (name, target) in [
        ("broker.key", &file),
        ("state", &odir),
        ("devices.db", &outside.path().join("new.db")),
        ("ca.key", &outside.path().join("new.key")),
    ] {
        let t = tempfile::tempdir().unwrap();
        let gw = t.path().join("gw");
        std::fs::create_dir(&gw).unwrap();
        symlink(target, gw.join(name)).unwrap();
        fails(&["init", gw.to_str().unwrap(), "--plugin", &plugin], "symbolic link");
        assert!(!gw.join("ca.pem").exists(), "{name}: wrote before refusing");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious", "{name}");
        assert_eq!((before(&file), before(&odir)), (file_meta, dir_meta), "{name}");
        assert_eq!(std::fs::read_dir(&odir).unwrap().count(), 0, "{name}");
        assert!(
            !outside.path().join("new.db").exists() && !outside.path().join("new.key").exists()
        );
    }
    // Positive control: the same init in a clean directory works; then a planted device key.
    let (_t, dir) = gwdir(&Port::reserve());
    symlink(&file, Path::new(&dir).join("devices/sensor_009.key")).unwrap();
    fails(&["device", "add", "sensor_009", "--dir", &dir], "symbolic link");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    assert_eq!(before(&file), file_meta);
    assert_eq!(db_rows(&dir), 0);
    ok(&["device", "add", "sensor_010", "--dir", &dir]);
    // init --force over a regular directory replaces its files, still without following links.
    ok(&["init", &dir, "--force", "--plugin", &plugin]);
}

#[test]
fn a_registry_the_broker_cannot_read_refuses_the_change() {
    use std::os::unix::fs::MetadataExt;
    let (_t, dir) = gwdir(&Port::reserve());
    ok(&["device", "add", "sensor_001", "--dir", &dir]);
    let d = Path::new(&dir);
    let conf = d.join("mosquitto.conf");
    // The broker's user, as the configuration says (as root mosquitto drops to it anyway).
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("user mosquitto\n{text}")).unwrap();
    let db = d.join("devices.db");
    let me = std::fs::metadata(d).unwrap();
    // Owned by whoever runs the tests (root or not), 0600: mosquitto cannot read it.
    std::os::unix::fs::chown(&db, Some(me.uid()), Some(me.gid())).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_ne!(
        me.uid(),
        iotgw::cli::gwdir::BrokerUser::lookup("mosquitto")
            .expect("a mosquitto user (make deps installs it)")
            .uid
    );
    let enabled = || -> i64 {
        rusqlite::Connection::open(&db)
            .unwrap()
            .query_row("SELECT enabled FROM devices WHERE device_id='sensor_001'", [], |r| r.get(0))
            .unwrap()
    };
    for cmd in [
        vec!["device", "disable", "sensor_001"],
        vec!["device", "remove", "sensor_001"],
        vec!["device", "rotate-secret", "sensor_001"],
        vec!["device", "add", "sensor_002"],
    ] {
        let mut args = cmd.clone();
        args.extend(["--dir", &dir]);
        fails(&args, "would not see this change");
    }
    assert_eq!(enabled(), 1);
    assert_eq!(db_rows(&dir), 1);
    // Positive control: readable by the broker's user, the same change goes through.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    ok(&["device", "disable", "sensor_001", "--dir", &dir]);
    assert_eq!(enabled(), 0);
    // A directory above it that the broker cannot enter is the same problem.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    fails(&["device", "enable", "sensor_001", "--dir", &dir], "cannot enter");
    assert_eq!(enabled(), 0);
}

/// `check-config` with `mosquitto -h` answering as this version.
fn check_config_as(t: &Path, conf: &Path, version: &str) -> (i32, Vec<String>) {
    let fake = t.join(format!("mosquitto-{version}"));
    std::fs::write(&fake, format!("#!/bin/sh\necho 'mosquitto version {version}'\nexit 3\n"))
        .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_iotgw"))
        .args(["check-config", conf.to_str().unwrap()])
        .env("MOSQUITTO_BIN", &fake)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let warnings = out.lines().filter_map(|l| l.strip_prefix("warning: ")).map(String::from);
    (o.status.code().unwrap_or(-1), warnings.collect())
}

#[test]
fn check_config_warns_about_each_known_hazard_and_not_about_a_clean_config() {
    let (t, dir) = gwdir(&Port::reserve());
    let conf = Path::new(&dir).join("mosquitto.conf");
    let clean = std::fs::read_to_string(&conf).unwrap();
    assert_eq!(check_config_as(t.path(), &conf, "2.0.11"), (0, vec![]), "init's config is clean");
    let cases: [(String, &str, &str); 4] = [
        (clean.replace("set_tcp_nodelay true\n", ""), "2.0.18", "set_tcp_nodelay"),
        (format!("{clean}max_queued_messages 0\n"), "2.0.11", "max_queued_messages 0"),
        (
            clean.replace("per_listener_settings false", "per_listener_settings true"),
            "2.0.18",
            "per_listener_settings true",
        ),
        (
            clean
                .lines()
                .filter(|l| !l.starts_with("acl_file"))
                .map(|l| format!("{l}\n"))
                .collect(),
            "2.0.18",
            "without `acl_file`",
        ),
    ];
    for (text, version, needle) in cases {
        std::fs::write(&conf, &text).unwrap();
        let (code, w) = check_config_as(t.path(), &conf, version);
        assert_eq!(code, 0, "{needle}: {w:?}");
        assert_eq!(w.len(), 1, "{needle}: {w:?}");
        assert!(w[0].contains(needle), "{needle}: {w:?}");
    }
    // The 2.0.11 hazard is not reported for a broker that does not have it.
    std::fs::write(&conf, format!("{clean}max_queued_messages 0\n")).unwrap();
    assert_eq!(check_config_as(t.path(), &conf, "2.0.18"), (0, vec![]));
}

#[test]
fn device_revoke_adds_the_certificate_to_the_crl_and_the_broker_disconnects_it_live() {
    let port = Port::reserve();
    let (t, dir) = gwdir(&port);
    ok(&["device", "add", "sensor_001", "--dir", &dir]);
    ok(&["device", "add", "sensor_002", "--dir", &dir]);
    let mut env = Env::new();
    env.dir = tempfile::tempdir_in(t.path()).unwrap();
    let d = Path::new(&dir);
    // `init` wrote an empty CRL and told the plugin to watch it.
    let conf = std::fs::read_to_string(d.join("mosquitto.conf")).unwrap();
    assert!(conf.contains(&format!("plugin_opt_crl_file {}", d.join("crl.pem").display())));
    let broker = Broker::start_conf(&env, &port, d.join("mosquitto.conf"));
    let ca = std::fs::read(d.join("ca.pem")).unwrap();
    let connect = |id: &str| {
        let cert = (
            std::fs::read(d.join(format!("devices/{id}.pem"))).unwrap(),
            std::fs::read(d.join(format!("devices/{id}.key"))).unwrap(),
        );
        let o = ConnectOpts { cn: None, ca: Some(ca.clone()), cert: Some(cert), will: None };
        Mqtt::try_connect(&env, port.get(), o).unwrap()
    };
    let sign = |id: &str| ok(&["sign", "--device", id, "--payload", "{}", "--dir", &dir]);
    let mut dev = connect("sensor_001");
    let mut other = connect("sensor_002");
    // Positive control, which also lets the plugin see the certificate it will revoke.
    assert!(dev
        .publish("device/sensor_001/data", 1, false, sign("sensor_001").trim().as_bytes())
        .is_ok());
    let out = ok(&["device", "revoke", "sensor_001", "--dir", &dir]);
    let revoked_at = std::time::Instant::now();
    assert!(out.contains("revoked sensor_001"), "{out}");
    assert!(dev.wait_closed(Duration::from_secs(5)), "still connected; {}", broker.log());
    assert!(revoked_at.elapsed() < Duration::from_millis(1500), "{:?}", revoked_at.elapsed());
    // The CRL is the CA's and lists exactly that certificate; the device is disabled too.
    let crl = openssl::x509::X509Crl::from_pem(&std::fs::read(d.join("crl.pem")).unwrap()).unwrap();
    let ca_cert = openssl::x509::X509::from_pem(&ca).unwrap();
    assert!(crl.verify(&ca_cert.public_key().unwrap()).unwrap());
    let dev_cert =
        openssl::x509::X509::from_pem(&std::fs::read(d.join("devices/sensor_001.pem")).unwrap())
            .unwrap();
    assert!(matches!(crl.get_by_cert(&dev_cert), openssl::x509::CrlStatus::Revoked(_)));
    assert_eq!(crl.get_revoked().map_or(0, |r| r.len()), 1);
    assert!(ok(&["device", "list", "--dir", &dir])
        .lines()
        .any(|l| l.starts_with("sensor_001") && l.contains(" no ")));
    // Revoking twice keeps one entry; the other device is untouched.
    ok(&["device", "revoke", "sensor_001", "--dir", &dir]);
    let crl = openssl::x509::X509Crl::from_pem(&std::fs::read(d.join("crl.pem")).unwrap()).unwrap();
    assert_eq!(crl.get_revoked().map_or(0, |r| r.len()), 1);
    assert!(other
        .publish("device/sensor_002/data", 1, false, sign("sensor_002").trim().as_bytes())
        .is_ok());
    fails(&["device", "revoke", "sensor_404", "--dir", &dir], "sensor_404");
}

/// `--registry-url`: every device command against PostgreSQL instead of DIR/devices.db; the
/// table and its NOTIFY trigger appear on first use; check-config reads the registry.
#[test]
fn device_commands_work_against_a_postgresql_registry() {
    let pg = Postgres::start();
    let url = pg.url();
    let (t, dir) = gwdir(&Port::reserve());
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|s| s.to_string())
            .chain(["--dir".into(), dir.clone(), "--registry-url".into(), url.clone()])
            .collect()
    };
    let run_ok = |args: &[&str]| {
        let a = with(args);
        ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let run_fails = |args: &[&str], needle: &str| {
        let a = with(args);
        fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };
    let count =
        || -> i64 { pg.client().query_one("SELECT count(*) FROM devices", &[]).unwrap().get(0) };
    fails(
        &["device", "list", "--dir", &dir, "--registry-url", "mysql://x/y"],
        "must start with postgresql://",
    );
    // A password never appears in what the CLI prints (nothing listens on port 1).
    let out = fails(
        &[
            "device",
            "list",
            "--dir",
            &dir,
            "--registry-url",
            "postgresql://u:hunter2@127.0.0.1:1/db",
        ],
        "cannot connect to postgresql://u:***@127.0.0.1:1/db",
    );
    assert!(!out.contains("hunter2"), "{out}");

    let secret = secret_from(&run_ok(&["device", "add", "pg_dev_1"]));
    let triggers: i64 = pg
        .client()
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'iotgw_devices_%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(triggers, 2, "the first use installs the NOTIFY triggers");
    assert_eq!((count(), db_rows(&dir)), (1, 0), "the row is in PostgreSQL, not in devices.db");
    assert!(Path::new(&dir).join("devices/pg_dev_1.pem").exists());
    assert!(run_ok(&["device", "show", "pg_dev_1", "--show-secret"]).contains(&secret));
    run_fails(&["device", "add", "pg_dev_1"], "already exists");
    run_fails(&["device", "add", "dashboard"], "is a service identity");
    run_ok(&["device", "disable", "pg_dev_1"]);
    assert!(run_ok(&["device", "list"])
        .lines()
        .any(|l| l.starts_with("pg_dev_1") && l.contains(" no ")));
    run_ok(&["device", "enable", "pg_dev_1"]);
    assert!(run_ok(&["device", "list"])
        .lines()
        .any(|l| l.starts_with("pg_dev_1") && l.contains(" yes ")));
    let new =
        secret_from_rotation(&run_ok(&["device", "rotate-secret", "pg_dev_1", "--grace", "1h"]));
    let (cur, prev): (String, String) = {
        let r = pg
            .client()
            .query_one(
                "SELECT shared_secret, previous_secret FROM devices WHERE device_id = 'pg_dev_1'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((cur, prev), (new, secret));
    let f = t.path().join("fleet.csv");
    std::fs::write(&f, "pg_dev_2\npg_dev_3,0123456789abcdef0\n").unwrap();
    run_ok(&["device", "import", f.to_str().unwrap()]);
    assert_eq!(count(), 3);
    // All or nothing: one existing id refuses the whole file.
    std::fs::write(&f, "pg_dev_4\npg_dev_1\n").unwrap();
    run_fails(&["device", "import", f.to_str().unwrap()], "already exists");
    assert_eq!(count(), 3);
    assert!(!Path::new(&dir).join("devices/pg_dev_4.pem").exists());
    run_ok(&["device", "revoke", "pg_dev_3"]);
    run_ok(&["device", "remove", "pg_dev_1"]);
    run_fails(&["device", "remove", "pg_dev_1"], "no device");
    assert_eq!(count(), 2);
    assert!(!Path::new(&dir).join("devices/pg_dev_1.pem").exists());
    ok(&["registry", "init", "--registry-url", &url]);
    ok(&["registry", "init", "--registry-url", &url]);

    // check-config reads the PostgreSQL registry the configuration names.
    let conf = Path::new(&dir).join("mosquitto.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let line = text.lines().find(|l| l.starts_with("plugin_opt_db_path")).unwrap().to_string();
    std::fs::write(&conf, text.replace(&line, &format!("plugin_opt_registry_url {url}"))).unwrap();
    let out = ok(&["check-config", conf.to_str().unwrap()]);
    // pg_dev_2 only: pg_dev_3 was revoked (disabled), pg_dev_1 removed.
    assert!(out.contains(", 1 devices,"), "{out}");
    // Without the trigger brokers would lag by up to 30 s: check-config says so.
    pg.execute("DROP TRIGGER iotgw_devices_notify ON devices");
    fails(&["check-config", conf.to_str().unwrap()], "NOTIFY trigger");
}

fn secret_from_rotation(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("new secret (shown once): ").map(str::to_string))
        .expect("new secret printed")
}

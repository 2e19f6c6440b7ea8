//! The real-broker harness: a real Mosquitto with the built plugin behind real mutual TLS.
//!
//! Each [`Env`] is a temp dir with its own PKI, registry and outbox; each [`Broker`] a
//! `mosquitto -c` child on a reserved loopback [`Port`], killed by Drop. Readiness is polled,
//! never slept for, and every failure message carries the broker's log.

use crate::{PluginOpts, Port, SECRETS};
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
use rumqttc::v5::mqttbytes::v5::{
    LastWill, Packet, PubAckReason, PubRecReason, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Connection, ConnectionError, Event, MqttOptions, StateError};
use rumqttc::{TlsConfiguration, Transport};
use rusqlite::Connection as Db;
use secure_iot_gateway::pki::{self, Issued, Role};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The plugin under test: `$IOTGW_PLUGIN_SO`, else the cdylib cargo built next to this test.
pub fn plugin_path() -> PathBuf {
    if let Ok(p) = std::env::var("IOTGW_PLUGIN_SO") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for cand in [
        deps.join("libsecure_iot_gateway.so"),
        deps.parent().unwrap().join("libsecure_iot_gateway.so"),
    ] {
        if cand.exists() {
            return cand;
        }
    }
    panic!("libsecure_iot_gateway.so not found next to {}; run `cargo build` first", exe.display());
}

/// The `iotgw` binary: `$IOTGW_BIN`, else the one `cargo build --workspace` put next to this test
/// (`make test` builds it first).
pub fn iotgw_path() -> PathBuf {
    if let Ok(p) = std::env::var("IOTGW_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for cand in [deps.join("iotgw"), deps.parent().unwrap().join("iotgw")] {
        if cand.is_file() {
            return cand;
        }
    }
    panic!("iotgw not found next to {}; run `cargo build --workspace` first", exe.display());
}

pub fn mosquitto_bin() -> String {
    std::env::var("MOSQUITTO_BIN").unwrap_or_else(|_| "/usr/sbin/mosquitto".into())
}

/// A temp dir with a CA, broker and client certificates, a registry and an ACL file.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub ca: Issued,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::new_ca("test ca", 2).unwrap();
        let p = dir.path();
        std::fs::write(p.join("ca.pem"), ca.cert_pem()).unwrap();
        let server =
            pki::issue(&ca, "broker", Role::Server, &["localhost", "127.0.0.1"], 2).unwrap();
        std::fs::write(p.join("server.pem"), server.cert_pem()).unwrap();
        std::fs::write(p.join("server.key"), server.key_pem()).unwrap();
        let db = Db::open(p.join("devices.db")).unwrap();
        db.execute_batch(secure_iot_gateway::registry::BASE_SCHEMA).unwrap();
        for (d, s) in SECRETS {
            db.execute("INSERT INTO devices VALUES (?1, ?2, 0)", [d, s]).unwrap();
        }
        std::fs::write(p.join("acl"), "user monitor\ntopic read device/#\n").unwrap();
        Env { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn db(&self) -> Db {
        Db::open(self.path().join("devices.db")).unwrap()
    }

    /// PEM certificate and key for a client with this CN, signed by this env's CA.
    pub fn client_cert(&self, cn: &str) -> (Vec<u8>, Vec<u8>) {
        let c = pki::issue(&self.ca, cn, Role::Client, &[], 2).unwrap();
        (c.cert_pem(), c.key_pem())
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.path().join("ca.pem")).unwrap()
    }

    /// The options every broker of this env gets: its registry and outbox, the `monitor`
    /// service identity, forwarding off.
    pub fn base_opts(&self) -> PluginOpts {
        let p = self.path();
        PluginOpts::new()
            .set("db_path", p.join("devices.db").display())
            .set("spool_path", p.join("outbox").display())
            .set("service_identities", "monitor")
            .set("backend_url", "none")
    }
}

impl Default for Env {
    fn default() -> Env {
        Env::new()
    }
}

/// A running broker; killed on drop.
pub struct Broker {
    pub child: Option<Child>,
    pub port: u16,
    pub log_path: PathBuf,
    pub conf_path: PathBuf,
    /// The port's reservation when the broker chose the port itself (see [`Port`]).
    _reserved: Option<Port>,
}

/// The configuration the tests use: [`Env::base_opts`] with `opts` applied over them.
pub fn write_conf(env: &Env, port: u16, opts: &PluginOpts) -> PathBuf {
    let p = env.path();
    // db_path and registry_url are exclusive: a broker given a PostgreSQL registry has no file.
    let base = match opts.get("registry_url") {
        Some(_) => env.base_opts().unset("db_path"),
        None => env.base_opts(),
    };
    let conf = format!(
        // max_packet_size: 2.1 lowered the default from 256 MB to 2,000,000 bytes and drops a
        // client that exceeds it before any plugin sees the message; pinning 2.0's value keeps
        // the plugin under test with large payloads on every version.
        "per_listener_settings false\nset_tcp_nodelay true\npersistence false\nuser root\nlog_dest stderr\nlog_type all\n\
         max_packet_size 268435455\n\
         listener {port} 127.0.0.1\ncafile {ca}\ncertfile {crt}\nkeyfile {key}\nrequire_certificate true\n\
         use_identity_as_username true\nacl_file {acl}\nplugin {so}\n{opts}",
        ca = p.join("ca.pem").display(),
        crt = p.join("server.pem").display(),
        key = p.join("server.key").display(),
        acl = p.join("acl").display(),
        so = plugin_path().display(),
        opts = base.with(opts).conf_lines(),
    );
    let path = p.join(format!("mosquitto-{port}.conf"));
    std::fs::write(&path, conf).unwrap();
    path
}

impl Broker {
    /// Starts a broker with the plugin on a port of its own and waits until it accepts
    /// connections.
    pub fn start(env: &Env, opts: &PluginOpts) -> Broker {
        let port = Port::reserve();
        let conf_path = write_conf(env, port.get(), opts);
        Self::launch(env, port.get(), conf_path, Some(port))
    }

    /// The same on a port the test holds, e.g. to restart a broker where devices expect it.
    pub fn start_on(env: &Env, port: &Port, opts: &PluginOpts) -> Broker {
        let conf_path = write_conf(env, port.get(), opts);
        Self::launch(env, port.get(), conf_path, None)
    }

    /// A broker from a configuration file written elsewhere (e.g. by `iotgw init`) that
    /// listens on `port`.
    pub fn start_conf(env: &Env, port: &Port, conf_path: PathBuf) -> Broker {
        Self::launch(env, port.get(), conf_path, None)
    }

    fn launch(env: &Env, port: u16, conf_path: PathBuf, reserved: Option<Port>) -> Broker {
        let log_path = env.path().join(format!(
            "broker-{port}-{}.log",
            Instant::now().elapsed().as_nanos() ^ std::process::id() as u128 ^ rand_u32() as u128
        ));
        let child = crate::spawn_logged(
            Command::new(mosquitto_bin()).arg("-c").arg(&conf_path),
            &log_path,
            &format!("{} (`make deps` installs mosquitto)", mosquitto_bin()),
        );
        let mut b = Broker { child: Some(child), port, log_path, conf_path, _reserved: reserved };
        b.wait_ready();
        b
    }

    fn wait_ready(&mut self) {
        crate::Starting {
            what: "broker",
            within: Duration::from_secs(10),
            every: Duration::from_millis(20),
            child: |b: &mut Broker| &mut b.child,
            ready: |b| {
                let port = ("127.0.0.1", b.port);
                std::net::TcpStream::connect(port).map(drop).map_err(|e| e.to_string())
            },
            log: Broker::log,
        }
        .wait(self);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls the log until `needle` appears (bounded).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let ok = Command::new("kill").args([&format!("-{sig}"), &pid]).status().unwrap().success();
        assert!(ok, "kill -{sig} {pid} failed");
    }

    /// Sends SIGTERM and waits for exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(15))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s.code();
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }

    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Number of log lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    openssl::rand::rand_bytes(&mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Runs the broker's config check for plugin errors: starts it and expects a non-zero exit.
pub fn start_expect_failure(env: &Env, opts_lines: &str) -> (i32, String) {
    let port = Port::reserve();
    let path = write_conf(env, port.get(), &PluginOpts::new());
    let conf = std::fs::read_to_string(&path).unwrap() + opts_lines;
    std::fs::write(&path, conf).unwrap();
    let out =
        Command::new(mosquitto_bin()).arg("-c").arg(&path).stdin(Stdio::null()).output().unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), log)
}

/// What the broker answered to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // named after the MQTT packets
pub enum Ack {
    /// QoS 0: nothing comes back.
    None,
    PubAck(PubAckReason),
    PubRec(PubRecReason),
    /// The broker closed the connection before answering (a revoked client, say).
    Closed,
}

impl Ack {
    /// Not accepted: refused with 0x87, or the connection closed before an answer (how a
    /// revoked client is refused where the broker closes it as soon as it acts).
    pub fn is_refused(&self) -> bool {
        self.is_not_authorized() || *self == Ack::Closed
    }
    pub fn is_not_authorized(&self) -> bool {
        matches!(
            self,
            Ack::PubAck(PubAckReason::NotAuthorized) | Ack::PubRec(PubRecReason::NotAuthorized)
        )
    }
    pub fn is_ok(&self) -> bool {
        matches!(
            self,
            Ack::None
                | Ack::PubAck(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
                | Ack::PubRec(PubRecReason::Success | PubRecReason::NoMatchingSubscribers)
        )
    }
}

/// What [`Mqtt::pump`] shows its callback.
enum Pumped<'a> {
    Packet(&'a Packet),
    /// A refused PUBACK / PUBREC / SUBACK / UNSUBACK.
    Refused(&'a StateError),
    /// The connection ended (the broker closed it, or it failed).
    Closed,
}

/// An MQTT v5 client over mutual TLS (rumqttc), driven synchronously with timeouts.
pub struct Mqtt {
    pub client: Client,
    conn: Connection,
    pub inbox: Vec<(String, Vec<u8>)>,
    opts: MqttOptions,
}

/// Why [`Mqtt::try_connect`] got no session.
#[derive(Debug)]
pub enum ConnectError {
    /// No CONNACK within 10 s.
    Timeout,
    /// The broker answered CONNACK with this code.
    Refused(ConnectReturnCode),
    /// The connection failed (TLS handshake refused, reset, ...).
    Connection(ConnectionError),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Timeout => write!(f, "no CONNACK within 10 s"),
            ConnectError::Refused(code) => write!(f, "CONNACK {code:?}"),
            ConnectError::Connection(e) => write!(f, "connection error: {e}"),
        }
    }
}

pub struct ConnectOpts<'a> {
    pub cn: Option<&'a str>,
    pub ca: Option<Vec<u8>>,
    pub cert: Option<(Vec<u8>, Vec<u8>)>,
    pub will: Option<(String, Vec<u8>)>,
}

impl Mqtt {
    /// Connects as the device/service `cn` with a certificate from `env`'s CA.
    pub fn connect(env: &Env, port: u16, cn: &str) -> Mqtt {
        Self::try_connect(env, port, ConnectOpts { cn: Some(cn), ca: None, cert: None, will: None })
            .unwrap_or_else(|e| panic!("{cn} could not connect: {e}"))
    }

    pub fn try_connect(env: &Env, port: u16, o: ConnectOpts<'_>) -> Result<Mqtt, ConnectError> {
        let id = format!("{}-{}", o.cn.unwrap_or("anon"), rand_u32());
        let mut opts = MqttOptions::new(id, "localhost", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let client_auth = o.cert.or_else(|| o.cn.map(|cn| env.client_cert(cn)));
        let tls = TlsConfiguration::Simple {
            ca: o.ca.unwrap_or_else(|| env.ca_pem()),
            alpn: None,
            client_auth,
        };
        opts.set_transport(Transport::tls_with_config(tls));
        if let Some((topic, payload)) = o.will {
            opts.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, false, None));
        }
        let (client, conn) = Client::new(opts.clone(), 100);
        let mut m = Mqtt { client, conn, inbox: Vec::new(), opts };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnectError::Timeout);
            }
            match m.conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    return if ack.code == ConnectReturnCode::Success {
                        Ok(m)
                    } else {
                        Err(ConnectError::Refused(ack.code))
                    };
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ConnectError::Connection(e)),
                Err(_) => return Err(ConnectError::Timeout),
            }
        }
    }

    /// After a refusal or a closed connection: a new rumqttc client with the same options (it
    /// connects at the next operation). rumqttc would reconnect by itself, but it would also
    /// resend publishes it had not seen acknowledged, and their answers would be taken for the
    /// next operation's.
    fn fresh(&mut self) {
        let (client, conn) = Client::new(self.opts.clone(), 100);
        self.client = client;
        self.conn = conn;
    }

    /// Polls the connection until `f` returns Some or the timeout passes; buffers publishes.
    /// rumqttc reports a refused PUBACK/PUBREC/SUBACK as a state error, so `f` sees those too;
    /// any other connection error is shown to `f` as [`Pumped::Closed`] (rumqttc reconnects at
    /// the next poll).
    fn pump<T>(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(Pumped<'_>) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(p))) => {
                    if let Packet::Publish(publ) = &p {
                        self.inbox.push((
                            String::from_utf8_lossy(&publ.topic).into_owned(),
                            publ.payload.to_vec(),
                        ));
                    }
                    if let Some(t) = f(Pumped::Packet(&p)) {
                        return Some(t);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(ConnectionError::MqttState(
                    e @ (StateError::PubAckFail { .. }
                    | StateError::PubRecFail { .. }
                    | StateError::SubFail { .. }
                    | StateError::UnsubFail { .. }),
                ))) => {
                    if let Some(t) = f(Pumped::Refused(&e)) {
                        return Some(t);
                    }
                }
                Ok(Err(_)) => {
                    if let Some(t) = f(Pumped::Closed) {
                        return Some(t);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return None,
            }
        }
    }

    /// Publishes and waits for the broker's answer (PUBACK for QoS 1, PUBREC for QoS 2).
    pub fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) -> Ack {
        self.publish_with(topic, qos, retain, payload, None)
    }

    /// The same with an MQTT v5 topic alias (an empty `topic` uses one set up before).
    pub fn publish_with(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: &[u8],
        topic_alias: Option<u16>,
    ) -> Ack {
        let q = match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        match topic_alias {
            None => self.client.publish(topic, q, retain, payload.to_vec()).unwrap(),
            Some(alias) => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    topic_alias: Some(alias),
                    ..Default::default()
                };
                self.client
                    .publish_with_properties(topic, q, retain, payload.to_vec(), props)
                    .unwrap()
            }
        }
        let ack = match qos {
            0 => {
                // Let the packet leave: wait for the outgoing event.
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if let Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))) =
                        self.conn.recv_timeout(Duration::from_millis(100))
                    {
                        break;
                    }
                }
                Some(Ack::None)
            }
            1 => self.pump(Duration::from_secs(10), |p| match p {
                Pumped::Packet(Packet::PubAck(a)) => Some(Ack::PubAck(a.reason)),
                Pumped::Refused(StateError::PubAckFail { reason }) => Some(Ack::PubAck(*reason)),
                Pumped::Closed => Some(Ack::Closed),
                _ => None,
            }),
            _ => self.pump(Duration::from_secs(10), |p| match p {
                Pumped::Packet(Packet::PubRec(r)) => Some(Ack::PubRec(r.reason)),
                Pumped::Refused(StateError::PubRecFail { reason }) => Some(Ack::PubRec(*reason)),
                Pumped::Closed => Some(Ack::Closed),
                _ => None,
            }),
        }
        .unwrap_or_else(|| {
            panic!("no acknowledgement for a QoS {qos} publish to {topic} within 10 s")
        });
        if !ack.is_ok() {
            self.fresh();
        }
        ack
    }

    /// Subscribes and returns the SUBACK's first reason code.
    pub fn subscribe(&mut self, filter: &str, qos: u8) -> SubscribeReasonCode {
        let q = if qos == 0 {
            QoS::AtMostOnce
        } else if qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        self.client.subscribe(filter, q).unwrap();
        let code = self
            .pump(Duration::from_secs(10), |p| match p {
                Pumped::Packet(Packet::SubAck(s)) => s.return_codes.first().cloned(),
                Pumped::Refused(StateError::SubFail { reason }) => Some(*reason),
                // Closed before answering: not granted.
                Pumped::Closed => Some(SubscribeReasonCode::Unspecified),
                _ => None,
            })
            .expect("no SUBACK within 10 s");
        if !matches!(code, SubscribeReasonCode::Success(_)) {
            self.fresh();
        }
        code
    }

    /// Waits for the next application message (bounded).
    pub fn next_message(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        if !self.inbox.is_empty() {
            return Some(self.inbox.remove(0));
        }
        self.pump(timeout, |p| matches!(p, Pumped::Packet(Packet::Publish(_))).then_some(()))?;
        Some(self.inbox.remove(0))
    }

    /// Collects messages until `quiet` passes with none (bounded by `max`).
    pub fn drain(&mut self, quiet: Duration, max: Duration) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + max;
        let mut out = std::mem::take(&mut self.inbox);
        while Instant::now() < deadline {
            match self.next_message(quiet) {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }

    /// Waits (bounded) until the broker closes the connection; true if it did.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::Disconnect(_)))) => return true,
                // Refusals of single packets are answers, not a closed connection.
                Ok(Err(ConnectionError::MqttState(
                    StateError::PubAckFail { .. }
                    | StateError::PubRecFail { .. }
                    | StateError::SubFail { .. }
                    | StateError::UnsubFail { .. },
                ))) => {}
                Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    pub fn disconnect(mut self) {
        let _ = self.client.disconnect();
        // Poll until the connection ends and no further: polling after an error makes rumqttc
        // reconnect, which opened a second, idle session (behind a load balancer, on another
        // node, taking that node's turn).
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !matches!(self.conn.recv_timeout(left), Ok(Ok(_))) {
                break;
            }
        }
    }
}

/// Is `reason=...` logged for a rejection of `message_id`?
pub fn rejected_with(broker: &Broker, reason: &str, message_id: &str) -> bool {
    broker.wait_log(&format!("rejected reason={reason} "), Duration::from_secs(5))
        && broker.log().lines().any(|l| {
            l.contains(&format!("rejected reason={reason} "))
                && l.contains(&format!("message_id={message_id}"))
        })
}

//! `iotgw simulate`: devices that connect with their certificates, send signed readings, and
//! verify the signed responses; plus the four attacks of the original README, so an operator
//! can watch the gateway refuse them.

use super::gwdir::GwDir;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, ConnectionError, Event, MqttOptions, StateError};
use rumqttc::{TlsConfiguration, Transport};
use secure_iot_gateway::envelope::{self, Envelope};
use secure_iot_gateway::host::unix_now;
use secure_iot_gateway::json::Json;
use std::time::{Duration, Instant};

/// The original README's attacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// Change the payload after signing (→ signature).
    Tamper,
    /// Send the same message twice (→ replay).
    Replay,
    /// A timestamp 10 minutes old (→ timestamp).
    OldTimestamp,
    /// Claim another device's id (→ identity).
    WrongIdentity,
}

/// Settings of one simulated device.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub host: String,
    pub port: u16,
    pub interval: Duration,
    /// Readings per device; None: until stopped.
    pub count: Option<u64>,
    pub attacks: Vec<Attack>,
    pub color: bool,
}

fn paint(color: bool, code: &str, s: &str) -> String {
    if color {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// A signed reading.
pub fn reading(secret: &str, device: &str, ts: i64, mid: &str, seq: u64) -> String {
    // A slowly varying temperature that crosses the backend's alert thresholds now and then.
    let t = 20.0 + 12.0 * ((seq as f64) * 0.7).sin();
    let t = (t * 10.0).round() / 10.0;
    let payload =
        serde_json::json!({"temperature": t, "humidity": 40 + (seq % 30) as i64, "seq": seq});
    let members = vec![
        ("device_id".to_string(), Json::String(device.into())),
        ("timestamp".to_string(), Json::Number(ts.into())),
        ("message_id".to_string(), Json::String(mid.into())),
        ("payload".to_string(), Json::from_value(payload)),
    ];
    envelope::sign_members(secret.as_bytes(), &members)
}

/// What the gateway said to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Rejected(PubAckReason),
    NoAnswer,
}

struct Device {
    id: String,
    secret: String,
    client: Client,
    conn: rumqttc::v5::Connection,
    color: bool,
    responses: u64,
    bad_responses: u64,
}

impl Device {
    fn connect(dir: &GwDir, id: &str, secret: &str, o: &SimOptions) -> Result<Device, String> {
        let read =
            |p: std::path::PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
        let tls = TlsConfiguration::Simple {
            ca: read(dir.ca_cert())?,
            alpn: None,
            client_auth: Some((read(dir.device_cert(id))?, read(dir.device_key(id))?)),
        };
        let mut opts =
            MqttOptions::new(format!("sim-{id}-{}", std::process::id()), o.host.clone(), o.port);
        opts.set_transport(Transport::tls_with_config(tls));
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, conn) = Client::new(opts, 64);
        let mut d = Device {
            id: id.into(),
            secret: secret.into(),
            client,
            conn,
            color: o.color,
            responses: 0,
            bad_responses: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match d.conn.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(format!("{id}: cannot connect to {}:{}: {e}", o.host, o.port))
                }
                Err(_) => {
                    return Err(format!("{id}: no answer from {}:{} within 10 s", o.host, o.port))
                }
            }
        }
        d.client
            .subscribe(format!("device/{id}/response"), QoS::AtLeastOnce)
            .map_err(|e| e.to_string())?;
        Ok(d)
    }

    /// Publishes and waits for the PUBACK; prints responses that arrive meanwhile.
    fn send(&mut self, payload: &[u8], topic: Option<&str>) -> Outcome {
        let topic = topic.map(str::to_owned).unwrap_or_else(|| format!("device/{}/data", self.id));
        if self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()).is_err() {
            return Outcome::NoAnswer;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    return if matches!(
                        a.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ) {
                        Outcome::Accepted
                    } else {
                        Outcome::Rejected(a.reason)
                    };
                }
                Ok(Err(ConnectionError::MqttState(StateError::PubAckFail { reason }))) => {
                    return Outcome::Rejected(reason)
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => self.on_response(&p.payload),
                _ => {}
            }
        }
        Outcome::NoAnswer
    }

    /// Waits a while for responses (bounded).
    fn listen(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                self.conn.recv_timeout(Duration::from_millis(50))
            {
                self.on_response(&p.payload);
            }
        }
    }

    fn on_response(&mut self, payload: &[u8]) {
        let ok = Envelope::parse(payload, 1 << 20).ok().filter(|e| {
            e.device_id() == self.id
                && envelope::verify(self.secret.as_bytes(), &e.canonical(), &e.signature)
        });
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        if ok.is_some() {
            self.responses += 1;
            println!(
                "{} {} status={} in_reply_to={} payload={} {}",
                paint(self.color, "36", &format!("[{}] <- response", self.id)),
                paint(self.color, "32", "signature OK"),
                v["status"],
                v["in_reply_to"].as_str().unwrap_or("?"),
                v["payload"],
                if v["payload"]["alert"].is_string() {
                    paint(self.color, "33", "ALERT")
                } else {
                    String::new()
                }
            );
        } else {
            self.bad_responses += 1;
            println!(
                "{} {}",
                paint(self.color, "31", &format!("[{}] <- response", self.id)),
                paint(self.color, "31", "SIGNATURE INVALID: ignored")
            );
        }
    }
}

/// Prints one sent message and the gateway's verdict.
fn report(
    color: bool,
    who: &str,
    label: &str,
    mid: &str,
    outcome: &Outcome,
    expect_ok: bool,
) -> bool {
    let verdict = match outcome {
        Outcome::Accepted => paint(color, "32", "accepted"),
        Outcome::Rejected(r) => {
            paint(color, "31", &format!("rejected by the gateway ({r:?}, 0x87)"))
        }
        Outcome::NoAnswer => paint(color, "31", "no answer"),
    };
    println!(
        "{} {label} message_id={mid} -> {verdict}",
        paint(color, "34", &format!("[{who}] ->"))
    );
    (*outcome == Outcome::Accepted) == expect_ok
}

/// Runs the simulation; returns (sent, as_expected) counts.
pub fn run(
    dir: &GwDir,
    devices: &[(String, String)],
    o: &SimOptions,
) -> Result<(u64, u64), String> {
    let mut devs = Vec::new();
    for (id, secret) in devices {
        devs.push(Device::connect(dir, id, secret, o)?);
    }
    let (mut sent, mut expected) = (0u64, 0u64);
    let mut seq = 0u64;
    while o.count.is_none_or(|c| seq < c) {
        for d in devs.iter_mut() {
            let mid = envelope::uuid_v4();
            let msg = reading(&d.secret, &d.id, unix_now(), &mid, seq);
            println!("{} {}", paint(o.color, "34", &format!("[{}] signed", d.id)), msg);
            let out = d.send(msg.as_bytes(), None);
            sent += 1;
            expected += report(o.color, &d.id, "reading", &mid, &out, true) as u64;
        }
        seq += 1;
        let wait =
            if o.count.is_none_or(|c| seq < c) { o.interval } else { Duration::from_millis(500) };
        let per = wait / devs.len().max(1) as u32;
        for d in devs.iter_mut() {
            d.listen(per);
        }
    }
    if !o.attacks.is_empty() {
        let first = devs.first_mut().ok_or("no device to attack with")?;
        let other = devices.get(1).map(|(i, _)| i.clone()).unwrap_or_else(|| "sensor_other".into());
        for a in &o.attacks {
            let mid = envelope::uuid_v4();
            let (label, outs) = attack(first, *a, &mid, &other);
            for out in outs {
                sent += 1;
                // Every attack message must be refused.
                expected += report(o.color, &first.id, label, &mid, &out, false) as u64;
            }
        }
        first.listen(Duration::from_millis(300));
    }
    let got: u64 = devs.iter().map(|d| d.responses).sum();
    let bad: u64 = devs.iter().map(|d| d.bad_responses).sum();
    println!("simulation: {sent} messages sent, {expected} answered as expected, {got} signed responses verified, {bad} invalid responses");
    for d in devs {
        let _ = d.client.disconnect();
    }
    Ok((sent, expected))
}

fn attack(d: &mut Device, a: Attack, mid: &str, other: &str) -> (&'static str, Vec<Outcome>) {
    let now = unix_now();
    match a {
        Attack::Tamper => {
            let msg = reading(&d.secret, &d.id, now, mid, 1);
            let v: serde_json::Value = serde_json::from_str(&msg).unwrap_or_default();
            let t = v["payload"]["temperature"].to_string();
            let tampered = msg.replacen(&format!("\"temperature\":{t}"), "\"temperature\":99.9", 1);
            ("attack tamper", vec![d.send(tampered.as_bytes(), None)])
        }
        Attack::Replay => {
            let msg = reading(&d.secret, &d.id, now, mid, 2);
            let first = d.send(msg.as_bytes(), None);
            report(d.color, &d.id, "replay (original)", mid, &first, true);
            ("attack replay", vec![d.send(msg.as_bytes(), None)])
        }
        Attack::OldTimestamp => {
            let msg = reading(&d.secret, &d.id, now - 600, mid, 3);
            ("attack old-timestamp", vec![d.send(msg.as_bytes(), None)])
        }
        Attack::WrongIdentity => {
            // Signed with our own secret but claiming to be another device.
            let msg = reading(&d.secret, other, now, mid, 4);
            ("attack wrong-identity", vec![d.send(msg.as_bytes(), None)])
        }
    }
}

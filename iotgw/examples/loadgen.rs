//! End-to-end load generator for `scripts/bench-e2e.sh` (loopback only, bounded).
//!
//! Runs an HTTP sink that counts what the gateway forwards, and N device connections (mutual
//! TLS, MQTT v5, QoS 1) that publish M pre-signed envelopes each as fast as the broker
//! acknowledges them. Prints the ingest rate (PUBACKs) and the end-to-end rate (messages
//! validated, queued, POSTed and answered 2xx).
//!
//! `cargo run --release --example loadgen -- DIR PORT SINK_PORT DEVICES MESSAGES`

use iotgw::cli::device::secret_of;
use iotgw::cli::gwdir::GwDir;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: loadgen DIR MQTT_PORT SINK_PORT DEVICES MESSAGES_PER_DEVICE");
        std::process::exit(2);
    }
    let dir = GwDir::new(std::path::Path::new(&a[1]));
    let port: u16 = a[2].parse().unwrap();
    let sink_port: u16 = a[3].parse().unwrap();
    let devices: usize = a[4].parse().unwrap();
    let per: u64 = a[5].parse().unwrap();
    let total = devices as u64 * per;

    // SINK_PORT 0: a baseline run without the plugin, nothing is forwarded (the sink then
    // listens on a port nobody uses).
    let sink = testkit::Sink::start_on(sink_port);

    // Sign everything up front: the generator must not be the bottleneck.
    let now = testkit::now();
    let mut batches = Vec::new();
    for d in 0..devices {
        let id = format!("bench_{d:03}");
        let secret = secret_of(&dir, &id).expect("device in registry");
        let msgs: Vec<Vec<u8>> = (0..per)
            .map(|i| {
                let payload = format!(r#"{{"temperature": 22.5, "humidity": 60, "seq": {i}}}"#);
                testkit::signed(&secret, &id, now, &format!("{id}-{i:09}"), &payload)
            })
            .collect();
        batches.push((id, msgs));
    }
    let size = batches[0].1[0].len();

    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for (id, msgs) in batches {
        let (acked, refused) = (acked.clone(), refused.clone());
        let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
        let tls = TlsConfiguration::Simple {
            ca: read(dir.ca_cert()),
            alpn: None,
            client_auth: Some((read(dir.device_cert(&id)), read(dir.device_key(&id)))),
        };
        handles.push(std::thread::spawn(move || {
            let mut o = MqttOptions::new(format!("load-{id}"), "localhost", port);
            o.set_transport(Transport::tls_with_config(tls));
            o.set_keep_alive(Duration::from_secs(60));
            o.set_outgoing_inflight_upper_limit(200);
            let (client, mut conn) = Client::new(o, 1000);
            let n = msgs.len() as u64;
            let topic = format!("device/{id}/data");
            std::thread::spawn(move || {
                for m in msgs {
                    if client.publish(topic.clone(), QoS::AtLeastOnce, false, m).is_err() {
                        return;
                    }
                }
            });
            let mut done = 0u64;
            let deadline = Instant::now() + Duration::from_secs(300);
            while done < n && Instant::now() < deadline {
                match conn.recv_timeout(Duration::from_secs(5)) {
                    Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                        done += 1;
                        if matches!(
                            a.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        ) {
                            acked.fetch_add(1, Ordering::Relaxed);
                        } else {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Err(rumqttc::v5::ConnectionError::MqttState(_))) => {
                        done += 1;
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        eprintln!("{id}: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Ok(Ok(_)) => {}
                    Err(_) => break,
                }
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    let ingest = start.elapsed();
    // SINK_PORT 0: a baseline run without the plugin; nothing is forwarded.
    let deadline = Instant::now() + Duration::from_secs(if sink_port == 0 { 0 } else { 300 });
    while (sink.count() as u64) < acked.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let e2e = start.elapsed();
    let (ok, bad, fwd) =
        (acked.load(Ordering::Relaxed), refused.load(Ordering::Relaxed), sink.count() as u64);
    println!("envelope {size} bytes, {devices} devices x {per} messages = {total}");
    println!("ingest:  {ok} accepted, {bad} refused in {:.2} s = {:.0} msg/s (validated + durably queued + PUBACK)", ingest.as_secs_f64(), ok as f64 / ingest.as_secs_f64());
    println!(
        "forward: {fwd} delivered to the backend in {:.2} s = {:.0} msg/s end to end",
        e2e.as_secs_f64(),
        fwd as f64 / e2e.as_secs_f64()
    );
    // Where this process's CPU went (it shares the machine with the broker).
    let tick = 100.0; // USER_HZ on Linux
    let mut by_name: std::collections::BTreeMap<String, f64> = Default::default();
    for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm =
            std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let f: Vec<&str> = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("").split(' ').collect();
        let cpu = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *by_name.entry(comm).or_default() += cpu * 1000.0 / tick;
    }
    let total: f64 = by_name.values().sum();
    println!("load generator + sink process CPU: {total:.0} ms (live threads: {by_name:?})");
    if bad > 0 || (sink_port != 0 && fwd < ok) {
        std::process::exit(1);
    }
}

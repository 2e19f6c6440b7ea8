//! Registry scale: load time and memory for N registered devices (default 100,000), and the
//! cost of a known-device lookup. `cargo run --release --example registry_scale [N]`
use secure_iot_gateway::registry::{self, Registry};
use std::time::Instant;

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("devices.db");
    {
        let mut c = rusqlite::Connection::open(&path).unwrap();
        registry::create(&c).unwrap();
        let tx = c.transaction().unwrap();
        for i in 0..n {
            // 64-hex-character secrets, as `iotgw device add` makes them.
            tx.execute(
                "INSERT INTO devices (device_id, shared_secret, created_at) VALUES (?1, ?2, 0)",
                [format!("sensor_{i:07}"), format!("{:064x}", i)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let before = rss_kb();
    let t = Instant::now();
    let reg = Registry::open(&path).unwrap();
    let load = t.elapsed();
    let after = rss_kb();
    let t = Instant::now();
    let mut found = 0;
    for i in 0..n {
        found += reg.get(&format!("sensor_{i:07}")).is_ok() as usize;
    }
    let per = t.elapsed() / n as u32;
    assert_eq!(found, n);
    println!("{n} devices: loaded in {load:?}, resident memory +{} KiB ({} bytes per device), known-device lookup {per:?} (incl. formatting the id)", after - before, (after - before) * 1024 / n as u64);
}

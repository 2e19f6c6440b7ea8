//! Pre-signs envelopes for `scripts/bench.sh` (signing stays outside the timed region).
//!   bench_envelopes SECRET DEVICE COUNT TIMESTAMP ID_PREFIX > file
//! One envelope a line, ~237 bytes each, UUID-shaped message ids from an 8-hex-digit ID_PREFIX and the sequence number (distinct per file so
//! every round's messages are fresh for the replay check).
use secure_iot_gateway::envelope;
use secure_iot_gateway::json::Json;
use std::io::Write;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: bench_envelopes SECRET DEVICE COUNT TIMESTAMP ID_PREFIX");
        std::process::exit(2);
    }
    let (secret, device, prefix) = (a[1].as_bytes(), &a[2], &a[5]);
    let count: u64 = a[3].parse().expect("COUNT is a number");
    let ts: i64 = a[4].parse().expect("TIMESTAMP is a number");
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for n in 0..count {
        let payload = Json::Object(vec![
            ("temperature".to_string(), Json::Number(serde_json::Number::from_f64(21.5).unwrap())),
            ("humidity".to_string(), Json::Number(serde_json::Number::from_f64(48.25).unwrap())),
            ("seq".to_string(), Json::Number(n.into())),
        ]);
        let members = vec![
            ("device_id".to_string(), Json::String(device.clone())),
            ("timestamp".to_string(), Json::Number(ts.into())),
            ("message_id".to_string(), Json::String(format!("{prefix}-0000-4000-8000-{n:012}"))),
            ("payload".to_string(), payload),
        ];
        writeln!(out, "{}", envelope::sign_members(secret, &members)).expect("write");
    }
}

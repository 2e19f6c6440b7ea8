//! `iotgw backend`: the demo HTTP backend (what the original Flask app did). Accepts
//! `POST /device/<id>/data`, logs it, raises an alert for temperatures above 30 °C or below
//! 10 °C, and answers JSON that the gateway signs and sends back to the device.

use std::io::Read;
use std::sync::Arc;

/// The answer for one reading: (HTTP status, JSON body, log line).
pub fn handle(path: &str, device_header: &str, body: &[u8]) -> (u16, String, String) {
    let device = path.strip_prefix("/device/").and_then(|p| p.strip_suffix("/data"));
    let Some(device) = device.filter(|d| !d.is_empty() && !d.contains('/')) else {
        return (404, r#"{"error":"POST /device/<id>/data"}"#.into(), format!("404 {path}"));
    };
    if device != device_header {
        return (
            400,
            r#"{"error":"X-Device-Id does not match the URL"}"#.into(),
            format!("400 {path}: header {device_header:?}"),
        );
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (400, r#"{"error":"body is not JSON"}"#.into(), format!("400 {path}: not JSON"));
    };
    let temp = v.get("temperature").and_then(|t| t.as_f64());
    let alert = match temp {
        Some(t) if t > 30.0 => Some(format!("high temperature {t} °C")),
        Some(t) if t < 10.0 => Some(format!("low temperature {t} °C")),
        _ => None,
    };
    let answer = serde_json::json!({
        "status": "ok",
        "device_id": device,
        "alert": alert,
    });
    let line = match &alert {
        Some(a) => format!("ALERT {device}: {a} ({v})"),
        None => format!("data  {device}: {v}"),
    };
    (200, answer.to_string(), line)
}

/// Serves until the process is stopped; `threads` handlers share one listener.
pub fn serve(listen: &str, threads: usize, quiet: bool) -> Result<(), String> {
    let server = Arc::new(
        tiny_http::Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?,
    );
    eprintln!("demo backend listening on http://{listen}/device/<id>/data");
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let server = server.clone();
        handles.push(std::thread::spawn(move || {
            while let Ok(mut req) = server.recv() {
                let mut body = Vec::new();
                let _ = req.as_reader().take(1 << 20).read_to_end(&mut body);
                let dev = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("X-Device-Id"))
                    .map(|h| h.value.to_string())
                    .unwrap_or_default();
                let (status, answer, line) = if req.method() == &tiny_http::Method::Post {
                    handle(req.url(), &dev, &body)
                } else {
                    (405, r#"{"error":"use POST"}"#.into(), format!("405 {}", req.url()))
                };
                if !quiet {
                    println!("[backend] {line}");
                }
                let header = tiny_http::Header::from_bytes("Content-Type", "application/json")
                    .expect("static header");
                let _ = req.respond(
                    tiny_http::Response::from_string(answer)
                        .with_status_code(status)
                        .with_header(header),
                );
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_follow_the_original_thresholds() {
        let (s, body, line) = handle("/device/d1/data", "d1", br#"{"temperature":31}"#);
        assert_eq!(s, 200);
        assert!(body.contains("high temperature"), "{body}");
        assert!(line.starts_with("ALERT"));
        assert!(handle("/device/d1/data", "d1", br#"{"temperature":9.5}"#)
            .1
            .contains("low temperature"));
        assert!(handle("/device/d1/data", "d1", br#"{"temperature":20}"#)
            .1
            .contains(r#""alert":null"#));
        assert_eq!(handle("/device/d1/data", "d2", b"{}").0, 400);
        assert_eq!(handle("/x", "d1", b"{}").0, 404);
        assert_eq!(handle("/device/d1/data", "d1", b"nope").0, 400);
    }
}

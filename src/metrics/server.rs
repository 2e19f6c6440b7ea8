//! The exporter: a tiny blocking HTTP/1.1 server on one plugin thread, serving the latest
//! [`Snapshot`] as `/metrics`, `/healthz`, `/readyz` and `/devices`. It never calls the broker.
//!
//! Bounded by construction: one connection at a time (others wait in the kernel's backlog),
//! a request head of at most [`MAX_REQUEST`] bytes, and a deadline of [`REQUEST_DEADLINE`] per
//! connection, so a slow or hostile client delays a scrape by at most that and costs no memory.
//!
//! The same thread probes the outbox directory every [`PROBE_EVERY`] by creating and removing a
//! file in it: a real write through the filesystem, off the broker thread, that fails when the
//! directory is read-only, immutable, gone or replaced (even for root, which ignores modes).

use super::{health, readiness, render_devices, render_prometheus, Snapshot};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const MAX_REQUEST: usize = 8 * 1024;
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How often the idle thread checks for a connection or shutdown.
const POLL: Duration = Duration::from_millis(50);
pub const PROBE_FILE: &str = ".healthz-probe";

struct Shared {
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    stop: AtomicBool,
    /// Set by a `/devices` request; the broker thread then copies the per-device table.
    devices_wanted: AtomicBool,
}

impl Shared {
    fn latest(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The running exporter thread; joined by [`Exporter::stop`] (and on drop).
pub struct Exporter {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Serves on `listener` (already bound, so a bad or taken address fails at start-up).
    pub fn start(listener: TcpListener, spool: PathBuf) -> io::Result<Exporter> {
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            snapshot: Mutex::new(None),
            stop: AtomicBool::new(false),
            devices_wanted: AtomicBool::new(false),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("iotgw-metrics".into())
            .spawn(move || run(listener, s, spool))?;
        Ok(Exporter { shared, handle: Some(handle) })
    }

    /// Replaces the snapshot (broker thread; the lock is held only for a pointer swap).
    pub fn publish(&self, s: Snapshot) {
        let s = Arc::new(s);
        *self.shared.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }

    /// Whether `/devices` was asked for since the last call (broker thread).
    pub fn take_devices_request(&self) -> bool {
        self.shared.devices_wanted.swap(false, Ordering::Relaxed)
    }

    /// Asks (again) for the per-device rows.
    pub fn request_devices(&self) {
        self.shared.devices_wanted.store(true, Ordering::Relaxed);
    }

    /// Stops the thread and joins it (at most one poll interval plus one request deadline).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn probe(dir: &std::path::Path) -> Result<(), String> {
    let p = dir.join(PROBE_FILE);
    // A probe file left by a crash would make create_new fail for the wrong reason.
    let _ = std::fs::remove_file(&p);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(|e| e.to_string())?;
    let written = f.write_all(b"probe\n").map_err(|e| e.to_string());
    drop(f);
    std::fs::remove_file(&p).map_err(|e| e.to_string())?;
    written
}

fn run(listener: TcpListener, shared: Arc<Shared>, spool: PathBuf) {
    let mut probed: Option<Instant> = None;
    let mut probe_result: Result<(), String> = Ok(());
    while !shared.stop.load(Ordering::SeqCst) {
        if probed.is_none_or(|t| t.elapsed() >= PROBE_EVERY) {
            probe_result = probe(&spool);
            probed = Some(Instant::now());
        }
        match listener.accept() {
            Ok((stream, _)) => {
                // A panic while serving one request must not end the exporter.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _ = serve(stream, &shared, &probe_result);
                }));
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Reads the request head (bounded in size and time) and returns its request line.
fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(line).trim_end().to_string()));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(Some(String::new()));
        }
    }
}

fn respond(stream: &mut TcpStream, status: u16, ctype: &str, body: &str, head_only: bool) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    let _ = stream.write_all(out.as_bytes());
}

/// Asks the broker thread for current per-device rows and waits (bounded) for a snapshot that
/// has them; on timeout, the last rows (their `generated_at` says how old).
fn fresh_devices(shared: &Shared) -> Option<Arc<Snapshot>> {
    let asked = Instant::now();
    shared.devices_wanted.store(true, Ordering::Relaxed);
    let deadline = asked + REQUEST_DEADLINE;
    loop {
        let s = shared.latest();
        let fresh = s.as_ref().is_some_and(|s| s.devices_at.is_some_and(|t| t >= asked));
        if fresh || Instant::now() >= deadline || shared.stop.load(Ordering::SeqCst) {
            return s;
        }
        std::thread::sleep(POLL);
    }
}

fn serve(mut stream: TcpStream, shared: &Shared, probe: &Result<(), String>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let Some(line) = read_head(&mut stream)? else { return Ok(()) };
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if target.is_empty() {
        respond(&mut stream, 400, "text/plain", "bad request\n", false);
        return Ok(());
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        respond(&mut stream, 405, "text/plain", "only GET\n", false);
        return Ok(());
    }
    let path = target.split('?').next().unwrap_or("");
    let snap = if path == "/devices" { fresh_devices(shared) } else { shared.latest() };
    let snap = snap.as_deref();
    match (path, snap) {
        ("/healthz", _) => {
            let (code, why) = health(snap, probe);
            respond(&mut stream, code, "text/plain", &format!("{why}\n"), head_only);
        }
        ("/readyz", _) => {
            let (code, why) = readiness(snap, probe);
            respond(&mut stream, code, "text/plain", &format!("{why}\n"), head_only);
        }
        ("/metrics" | "/devices", None) => {
            respond(&mut stream, 503, "text/plain", "starting\n", head_only);
        }
        ("/metrics", Some(s)) => respond(
            &mut stream,
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &render_prometheus(s),
            head_only,
        ),
        ("/devices", Some(s)) => {
            respond(&mut stream, 200, "application/json", &render_devices(s), head_only)
        }
        _ => respond(
            &mut stream,
            404,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz, /devices\n",
            head_only,
        ),
    }
    Ok(())
}

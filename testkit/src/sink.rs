//! The one HTTP backend for tests, benches and the load generator.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request the sink answered 2xx.
#[derive(Debug, Clone)]
pub struct Req {
    pub path: String,
    pub device: String,
    pub message_id: String,
    pub content_type: String,
    /// Every header, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

#[derive(Default)]
struct Shared {
    /// With the number of its arrival.
    received: Mutex<Vec<(u64, Req)>>,
    /// Held while taking the next request: the number of the next arrival. Pipelined requests
    /// (several on one connection before the first is answered) are served by several threads
    /// at once, so arrival, not answering, is what keeps their order.
    arrivals: Mutex<u64>,
    /// Every request, whatever it was answered.
    requests: std::sync::atomic::AtomicUsize,
    script: Mutex<VecDeque<u16>>,
    hang: AtomicBool,
    /// Microseconds each answer waits (see [`Sink::set_delay`]).
    delay_us: std::sync::atomic::AtomicU64,
    /// Seconds of `Retry-After` on every answer that is not 2xx (0: none).
    retry_after_s: std::sync::atomic::AtomicU64,
    /// Requests taken and not answered yet, and the most there ever were.
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
    stop: AtomicBool,
}

/// A loopback HTTP(S) backend: answers with scripted statuses (then 200), or hangs; records the
/// requests it answered 2xx. Statuses are handed out, and records kept, in the order the
/// requests arrived.
pub struct Sink {
    port: u16,
    https: bool,
    server: Arc<tiny_http::Server>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// Requests served at once. A fixed pool, not a thread per request, so that the load
/// generator's sink costs little CPU; more than the plugin's default worker count, so a hanging
/// sink still takes every concurrent request.
const WORKERS: usize = 8;

/// How long a hanging sink holds a request at most: longer than any `http_timeout_ms` the tests
/// use, bounded so a forgotten hang cannot wedge a test run.
const MAX_HANG: Duration = Duration::from_secs(20);

/// The URL of a sink on `port` (for a backend that is down now and started later).
pub fn sink_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/device/{{device_id}}/data")
}

impl Sink {
    /// A plain-HTTP sink on a port the kernel chose; the listener is kept, so no race.
    pub fn start() -> Sink {
        Self::serve(tiny_http::Server::http("127.0.0.1:0").expect("bind a loopback port"), false)
    }

    /// A plain-HTTP sink on this port (reserve it with [`crate::Port`] until this is called).
    pub fn start_on(port: u16) -> Sink {
        let server = tiny_http::Server::http(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("sink cannot bind 127.0.0.1:{port}: {e}"));
        Self::serve(server, false)
    }

    /// An HTTPS sink with this certificate and key, on a port the kernel chose.
    pub fn start_https(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Sink {
        let ssl = tiny_http::SslConfig { certificate: cert_pem, private_key: key_pem };
        Self::serve(
            tiny_http::Server::https("127.0.0.1:0", ssl).expect("bind a loopback port"),
            true,
        )
    }

    fn serve(server: tiny_http::Server, https: bool) -> Sink {
        let port = server.server_addr().to_ip().expect("a TCP listener").port();
        let server = Arc::new(server);
        let shared = Arc::new(Shared::default());
        let workers = (0..WORKERS)
            .map(|i| {
                let (server, shared) = (server.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("sink-{i}"))
                    .spawn(move || {
                        // Blocking recv, not a polling timeout: cheaper under load; Drop
                        // unblocks each worker.
                        loop {
                            let next = {
                                let mut arrivals = shared.arrivals.lock().unwrap();
                                // An error is a failed accept (or a stray unblock).
                                server.recv().ok().map(|req| {
                                    *arrivals += 1;
                                    let status = shared.script.lock().unwrap().pop_front();
                                    (req, *arrivals, status.unwrap_or(200))
                                })
                            };
                            if shared.stop.load(Ordering::SeqCst) {
                                return;
                            }
                            if let Some((req, arrival, status)) = next {
                                answer(&shared, req, arrival, status);
                            }
                        }
                    })
                    .expect("spawn a sink thread")
            })
            .collect();
        Sink { port, https, server, shared, workers }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `backend_url` that reaches this sink.
    pub fn url(&self) -> String {
        if self.https {
            format!("https://localhost:{}/device/{{device_id}}/data", self.port)
        } else {
            sink_url(self.port)
        }
    }

    /// The next requests get these statuses, in order; after them, 200.
    pub fn script(&self, statuses: &[u16]) {
        self.shared.script.lock().unwrap().extend(statuses);
    }

    /// Forgets the statuses scripted and not used yet: from now on, 200.
    pub fn clear_script(&self) {
        self.shared.script.lock().unwrap().clear();
    }

    /// While on, requests are read but not answered (up to [`MAX_HANG`]).
    pub fn set_hang(&self, on: bool) {
        self.shared.hang.store(on, Ordering::SeqCst);
    }

    /// Each answer waits this long (a slow backend: a client that pipelines has several
    /// requests here at once).
    pub fn set_delay(&self, d: Duration) {
        self.shared.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Every answer that is not 2xx says `Retry-After: secs` (0: no such header).
    pub fn set_retry_after(&self, secs: u64) {
        self.shared.retry_after_s.store(secs, Ordering::SeqCst);
    }

    /// The most requests this sink held unanswered at once. Over 1 with a single client
    /// connection means that client pipelines.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// The requests answered 2xx so far, in the order they arrived.
    pub fn delivered(&self) -> Vec<Req> {
        let mut got = self.shared.received.lock().unwrap().clone();
        got.sort_by_key(|(arrival, _)| *arrival);
        got.into_iter().map(|(_, r)| r).collect()
    }

    /// How many requests were answered 2xx so far.
    /// Requests received so far, whatever they were answered (retries included).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    /// Waits until at least `n` requests were answered 2xx (bounded); returns them all.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Req> {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.delivered()
    }
}

fn answer(shared: &Shared, mut req: tiny_http::Request, arrival: u64, status: u16) {
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let header = |name: &str| {
        req.headers()
            .iter()
            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.to_string())
            .unwrap_or_default()
    };
    let (device, message_id, content_type) =
        (header("x-device-id"), header("x-message-id"), header("content-type"));
    let headers = req
        .headers()
        .iter()
        .map(|h| (h.field.as_str().as_str().to_ascii_lowercase(), h.value.to_string()))
        .collect();
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let mut body = Vec::new();
    let _ = std::io::Read::read_to_end(req.as_reader(), &mut body);
    let rec = Req {
        path: req.url().to_string(),
        device,
        message_id,
        content_type,
        headers,
        body,
        at: Instant::now(),
    };
    let until = Instant::now() + MAX_HANG;
    while shared.hang.load(Ordering::SeqCst)
        && !shared.stop.load(Ordering::SeqCst)
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_micros(shared.delay_us.load(Ordering::SeqCst)));
    let text = format!(r#"{{"status":"ok","seen":"{}"}}"#, rec.message_id);
    // Recorded before answering, so a client that saw the 2xx also finds the record.
    if status / 100 == 2 {
        shared.received.lock().unwrap().push((arrival, rec));
    }
    // Before the answer leaves: a client waiting for it cannot have sent its next request yet.
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut answer = tiny_http::Response::from_string(text).with_status_code(status);
    let retry_after = shared.retry_after_s.load(Ordering::SeqCst);
    if status / 100 != 2 && retry_after > 0 {
        let h = tiny_http::Header::from_bytes("Retry-After", retry_after.to_string())
            .expect("a valid header");
        answer = answer.with_header(h);
    }
    let _ = req.respond(answer);
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.hang.store(false, Ordering::SeqCst);
        // Each unblock wakes one worker blocked in recv.
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn post(port: u16, device: &str, mid: &str, body: &str) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "POST /device/{device}/data HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Device-Id: {device}\r\nX-Message-Id: {mid}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn scripted_statuses_then_200_and_only_2xx_recorded_in_order() {
        let sink = Sink::start();
        sink.script(&[500, 201]);
        assert!(post(sink.port(), "d1", "m1", "{}").starts_with("HTTP/1.1 500"));
        assert!(post(sink.port(), "d1", "m2", r#"{"a":1}"#).starts_with("HTTP/1.1 201"));
        assert!(post(sink.port(), "d2", "m3", "{}").starts_with("HTTP/1.1 200"));
        let got = sink.delivered();
        let seen: Vec<(&str, &str, &[u8])> =
            got.iter().map(|r| (r.device.as_str(), r.message_id.as_str(), &r.body[..])).collect();
        assert_eq!(seen, vec![("d1", "m2", &br#"{"a":1}"#[..]), ("d2", "m3", b"{}")]);
        assert_eq!(got[0].path, "/device/d1/data");
        assert_eq!(got[0].content_type, "application/json");
        assert_eq!(
            sink.url(),
            format!("http://127.0.0.1:{}/device/{{device_id}}/data", sink.port())
        );
    }

    #[test]
    fn start_on_a_reserved_port() {
        let port = crate::Port::reserve();
        // Down: nothing listens on a reserved port.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port.get())).is_err());
        let sink = Sink::start_on(port.get());
        assert!(post(port.get(), "d", "m", "{}").starts_with("HTTP/1.1 200"));
        assert_eq!(sink.count(), 1);
    }
}

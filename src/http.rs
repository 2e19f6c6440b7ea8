//! A minimal HTTP/1.1 client for plain-`http://` backends, used by the forwarding workers.
//!
//! Why not ureq here (ureq still serves `https://`): on the hot path ureq made about ten
//! syscalls per request (a liveness peek with ioctl toggling, headers and body written
//! separately), where one `write` and usually one `read` suffice. Workers were two thirds of the
//! gateway's CPU (BENCHMARKS.md). This client does exactly one thing: POST a small JSON body on a
//! kept-alive connection and read the answer (Content-Length, chunked, or until close).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest response body kept; the rest is read and dropped (or the connection closed).
const KEEP: usize = 64 * 1024;
/// Beyond this much unread body the connection is closed instead of drained.
const DRAIN_MAX: usize = 1 << 20;

/// An answer from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

/// A keep-alive connection to one `host:port`.
pub struct Client {
    host_header: String,
    host: String,
    port: u16,
    timeout: Duration,
    conn: Option<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

/// Header values must be visible ASCII; anything else (a device-chosen message id may hold CR,
/// LF or non-ASCII) is percent-encoded, as is `%` itself, so the value stays reversible.
pub fn header_value(v: &str) -> std::borrow::Cow<'_, str> {
    if v.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'%') {
        return std::borrow::Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for b in v.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Reads from a stream within one overall deadline (a backend that trickles bytes cannot hold a
/// worker past the timeout; shutdown relies on that bound).
struct Deadline<'a> {
    stream: &'a mut TcpStream,
    until: std::time::Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "backend answer timed out"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl Client {
    /// A client for `http://host[:port]` (port 80 by default).
    pub fn new(host: &str, port: Option<u16>, timeout: Duration) -> Client {
        let port_n = port.unwrap_or(80);
        let host_header = match port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        // The URI parser keeps IPv6 brackets: the Host header needs them, the socket address not.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Client {
            host_header,
            host,
            port: port_n,
            timeout,
            conn: None,
            rbuf: Vec::with_capacity(4096),
            wbuf: Vec::with_capacity(1024),
        }
    }

    fn connect(&self) -> io::Result<TcpStream> {
        let mut last =
            io::Error::new(io::ErrorKind::NotFound, format!("{} did not resolve", self.host));
        for addr in (self.host.as_str(), self.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(self.timeout))?;
                    s.set_write_timeout(Some(self.timeout))?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// POSTs `body` to `path` with `headers`. A request on a reused connection that the server
    /// had already closed is retried once on a fresh one (nothing was processed then).
    pub fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        self.wbuf.clear();
        write!(
            self.wbuf,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: secure-iot-gateway/0.1\r\n",
            self.host_header
        )?;
        for (k, v) in headers {
            write!(self.wbuf, "{k}: {}\r\n", header_value(v))?;
        }
        write!(self.wbuf, "Content-Length: {}\r\n\r\n", body.len())?;
        self.wbuf.extend_from_slice(body);
        let reused = self.conn.is_some();
        match self.exchange() {
            Ok(r) => Ok(r),
            Err((e, got_bytes)) if reused && !got_bytes => {
                let _ = e;
                self.conn = None;
                self.exchange().map_err(|(e, _)| e)
            }
            Err((e, _)) => Err(e),
        }
    }

    /// One request/response; the bool says whether any response byte arrived.
    fn exchange(&mut self) -> Result<Response, (io::Error, bool)> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().map_err(|e| (e, false))?);
        }
        let until = std::time::Instant::now() + self.timeout;
        let stream = self.conn.as_mut().expect("connected above");
        if let Err(e) = stream.write_all(&self.wbuf) {
            self.conn = None;
            return Err((e, false));
        }
        self.rbuf.clear();
        let r = read_response(&mut Deadline { stream, until }, &mut self.rbuf);
        match r {
            Ok((resp, keep)) => {
                if !keep {
                    self.conn = None;
                }
                Ok(resp)
            }
            Err(e) => {
                self.conn = None;
                let got = !self.rbuf.is_empty();
                Err((e, got))
            }
        }
    }
}

fn fill(s: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<usize> {
    let len = buf.len();
    buf.resize(len + 8192, 0);
    let n = s.read(&mut buf[len..]);
    buf.truncate(len + *n.as_ref().unwrap_or(&0));
    n
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response from `s` (using `buf`); returns it and whether the connection can be reused.
pub fn read_response(s: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<(Response, bool)> {
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 * 1024 {
            return Err(bad("response headers too large"));
        }
        if fill(s, buf)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
    };
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("response headers are not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status: u16 =
        parts.next().and_then(|c| c.parse().ok()).ok_or_else(|| bad("bad status line"))?;
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1.x response"));
    }
    let (mut length, mut chunked, mut close, mut retry_after) =
        (None, false, version == "HTTP/1.0", None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(v.parse::<usize>().map_err(|_| bad("bad Content-Length"))?)
            }
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            "connection" => {
                let v = v.to_ascii_lowercase();
                if v.contains("close") {
                    close = true;
                } else if v.contains("keep-alive") {
                    close = false;
                }
            }
            "retry-after" => retry_after = Some(v.to_string()),
            _ => {}
        }
    }
    let mut rest = buf.split_off(head_end + 4);
    let no_body = status / 100 == 1 || status == 204 || status == 304;
    let body = if no_body {
        Vec::new()
    } else if chunked {
        read_chunked(s, &mut rest)?
    } else if let Some(n) = length {
        if n > DRAIN_MAX {
            close = true;
        }
        let want = n.min(DRAIN_MAX);
        while rest.len() < want {
            if fill(s, &mut rest)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body shorter than Content-Length",
                ));
            }
        }
        rest.truncate(want);
        rest
    } else {
        // Delimited by close.
        close = true;
        while rest.len() < DRAIN_MAX && fill(s, &mut rest)? > 0 {}
        rest
    };
    let mut body = body;
    body.truncate(KEEP);
    Ok((Response { status, retry_after, body }, !close))
}

fn read_chunked(s: &mut impl Read, rest: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut at = 0usize;
    loop {
        let line_end = loop {
            if let Some(p) = find(&rest[at..], b"\r\n") {
                break at + p;
            }
            if fill(s, rest)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated chunk header"));
            }
        };
        let size_txt =
            std::str::from_utf8(&rest[at..line_end]).map_err(|_| bad("bad chunk header"))?;
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        at = line_end + 2;
        if size == 0 {
            // Trailers (if any) end with an empty line.
            loop {
                if let Some(p) = find(&rest[at..], b"\r\n") {
                    if p == 0 {
                        return Ok(body);
                    }
                    at += p + 2;
                } else if fill(s, rest)? == 0 {
                    return Ok(body);
                }
            }
        }
        // Not `body.len() + size`: a chunk size near usize::MAX (found by fuzzing) overflowed it.
        if size > DRAIN_MAX - body.len() {
            return Err(bad("chunked body too large"));
        }
        while rest.len() < at + size + 2 {
            if fill(s, rest)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated chunk"));
            }
        }
        body.extend_from_slice(&rest[at..at + size]);
        at += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn parse(raw: &[u8]) -> io::Result<(Response, bool)> {
        let mut buf = Vec::new();
        read_response(&mut &raw[..], &mut buf)
    }

    #[test]
    fn content_length_response_keeps_the_connection() {
        let (r, keep) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice(), keep), (200, &b"{}"[..], true));
    }

    #[test]
    fn chunked_response_is_reassembled() {
        let (r, keep) = parse(b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_slice(), keep), (500, &b"abcde"[..], true));
    }

    #[test]
    fn close_delimited_and_connection_close_are_not_reused() {
        let (r, keep) = parse(b"HTTP/1.1 200 OK\r\n\r\nhello").unwrap();
        assert_eq!((r.body.as_slice(), keep), (&b"hello"[..], false));
        let (_, keep) =
            parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(!keep);
        let (_, keep) = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(!keep);
    }

    #[test]
    fn retry_after_and_no_body_statuses() {
        let (r, _) =
            parse(b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.retry_after.as_deref()), (429, Some("7")));
        let (r, keep) = parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.len(), keep), (204, 0, true));
    }

    #[test]
    fn truncated_and_garbage_responses_are_errors() {
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab").is_err());
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }

    #[test]
    fn a_chunk_size_near_usize_max_is_an_error_not_a_panic() {
        // After a first chunk, so `body.len() + size` would overflow.
        let e = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\nab",
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Positive control: the same framing with a small size is read.
        let (r, _) =
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!(r.body, b"ab");
    }

    #[test]
    fn header_values_are_made_safe() {
        assert_eq!(header_value("550e8400-e29b"), "550e8400-e29b");
        assert_eq!(header_value("a\r\nX-Evil: 1"), "a%0D%0AX-Evil:%201");
        assert_eq!(header_value("50%"), "50%25");
        assert_eq!(header_value("é"), "%C3%A9");
    }

    /// A keep-alive server that closes the connection after every `per_conn` requests.
    fn server(per_conn: usize) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c2 = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming().take(50) {
                let s = s.unwrap();
                c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                for _ in 0..per_conn {
                    let mut len = 0;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut b = vec![0; len];
                    r.read_exact(&mut b).unwrap();
                    let _ = w.write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len())
                            .as_bytes(),
                    );
                    let _ = w.write_all(&b);
                }
                // Drop: the server closes an idle kept-alive connection.
            }
        });
        (port, conns)
    }

    #[test]
    fn reuses_the_connection_and_recovers_when_the_server_closed_it() {
        let (port, conns) = server(3);
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(5));
        for i in 0..7 {
            let body = format!("{{\"n\":{i}}}");
            let r = c.post("/x", &[("Content-Type", "application/json")], body.as_bytes()).unwrap();
            assert_eq!((r.status, r.body), (200, body.into_bytes()));
        }
        // 7 requests, 3 per connection: 3 connections, each stale one replaced transparently.
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn a_trickling_backend_cannot_outlast_the_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b);
            // One byte every 100 ms, forever (bounded: 50 bytes).
            for c in b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n0123456789".iter() {
                if s.write_all(&[*c]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_millis(500));
        let t = std::time::Instant::now();
        let e = c.post("/x", &[], b"{}").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < Duration::from_millis(1500), "{:?}", t.elapsed());
    }

    #[test]
    fn refused_connection_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(1));
        assert!(c.post("/x", &[], b"{}").is_err());
    }
}

//! A minimal HTTP/1.1 client for plain-`http://` backends, used by the forwarding workers.
//!
//! Why not ureq here (ureq still serves `https://`): on the hot path ureq made about ten
//! syscalls per request (a liveness peek with ioctl toggling, headers and body written
//! separately), where one `write` and usually one `read` suffice. Workers were two thirds of the
//! gateway's CPU (BENCHMARKS.md). This client does exactly one thing: POST small JSON bodies on a
//! kept-alive connection, one at a time or pipelined, and read the answers (Content-Length,
//! chunked, or until close).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Largest response body kept; the rest is read and dropped (or the connection closed).
const KEEP: usize = 64 * 1024;
/// Beyond this much unread body the connection is closed instead of drained.
const DRAIN_MAX: usize = 1 << 20;

/// An answer from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<String>,
    /// At most the first 64 KiB of the body.
    pub body: Vec<u8>,
    /// The body was longer than what is kept (the status still counts).
    pub truncated: bool,
}

/// One POST of a batch (see [`Client::post_all`]).
pub struct Request<'a> {
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
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
    /// The server closed the last connection after its first answer: send one at a time.
    one_per_conn: bool,
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
    until: Instant,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("backend {what} timed out"))
}

/// Time left before `until`, or a TimedOut error naming what ran out of it.
fn left(until: Instant, what: &str) -> io::Result<Duration> {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out(what));
    }
    Ok(left)
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(left(self.until, "answer")?))?;
        // A socket timeout is reported as EAGAIN (WouldBlock) on Linux: it is our deadline.
        self.stream.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out("answer"),
            _ => e,
        })
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
            one_per_conn: false,
        }
    }

    /// Connects within what is left of the request's deadline (every address tried shares it).
    fn connect(&self, until: Instant) -> io::Result<TcpStream> {
        let mut last =
            io::Error::new(io::ErrorKind::NotFound, format!("{} did not resolve", self.host));
        for addr in (self.host.as_str(), self.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, left(until, "connect")?) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => last = timed_out("connect"),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Appends one request to the write buffer.
    fn write_request(&mut self, r: &Request<'_>) -> io::Result<()> {
        write!(
            self.wbuf,
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: secure-iot-gateway/0.1\r\n",
            r.path, self.host_header
        )?;
        for (k, v) in r.headers {
            write!(self.wbuf, "{k}: {}\r\n", header_value(v))?;
        }
        write!(self.wbuf, "Content-Length: {}\r\n\r\n", r.body.len())?;
        self.wbuf.extend_from_slice(r.body);
        Ok(())
    }

    /// POSTs `body` to `path` with `headers`: [`Client::post_all`] with one request. (The
    /// workers call `post_all` for one request as for many; this is the tests' shorthand.)
    #[cfg(test)]
    pub fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut answers = Vec::with_capacity(1);
        self.post_all(&[Request { path, headers, body }], &mut answers, &|| false)?;
        Ok(answers.pop().expect("one request answered").0)
    }

    /// POSTs `reqs` back to back on one kept-alive connection (HTTP/1.1 pipelining: one
    /// `write`, and the answers read as they come) and appends their answers to `answers`, in
    /// order, each with how long it took from the start of the call. Connecting, writing and the first answer share one deadline of `timeout` from now;
    /// each later answer gets `timeout` from the one before, so no request waits longer for its
    /// answer than it would have alone, and `stop` is asked before each of them (shutdown waits
    /// for one answer at most). When the server closes the connection after an answer
    /// (`Connection: close`, or simply closing where the next answer should start), the
    /// unanswered requests go out again on a new connection (one at a time if the server
    /// answers one per connection); a reused connection the server had already closed gets one
    /// retry on a fresh one when nothing came back at all.
    ///
    /// On Err, the requests from the first unanswered one on got no answer; the backend may have
    /// processed some of them.
    pub fn post_all(
        &mut self,
        reqs: &[Request<'_>],
        answers: &mut Vec<(Response, Duration)>,
        stop: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        let first = answers.len();
        let started = Instant::now();
        let mut until = started + self.timeout;
        let mut stale_retry = true;
        loop {
            let done = answers.len() - first;
            if done == reqs.len() {
                return Ok(());
            }
            let reused = self.conn.is_some();
            let batch = if self.one_per_conn { &reqs[done..=done] } else { &reqs[done..] };
            if let Err((e, got_bytes)) = self.exchange(batch, answers, &mut until, stop, started) {
                // A connection that closed where an answer should start is retried on a new one:
                // after answers on it (RFC 9112 9.3.2: the server stopped there, like a server
                // that says `Connection: close`), or once when it was a reused one that gave
                // nothing at all (it was stale). Never after a timeout, a partial answer or stop.
                let progress = answers.len() - first > done;
                let clean = !got_bytes
                    && !matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::Interrupted);
                if clean && (progress || (reused && stale_retry)) {
                    stale_retry &= progress;
                    continue;
                }
                return Err(e);
            }
        }
    }

    /// Writes `reqs` and reads their answers until all came or the server closed after one
    /// (Ok either way); on Err the bool says whether any byte of the awaited answer arrived.
    /// The connection is dropped on Err, after a closing answer, and when bytes nobody asked
    /// for follow the last answer (they would be taken for the next request's answer).
    fn exchange(
        &mut self,
        reqs: &[Request<'_>],
        answers: &mut Vec<(Response, Duration)>,
        until: &mut Instant,
        stop: &dyn Fn() -> bool,
        started: Instant,
    ) -> Result<(), (io::Error, bool)> {
        self.wbuf.clear();
        for r in reqs {
            self.write_request(r).map_err(|e| (e, false))?;
        }
        if self.conn.is_none() {
            self.conn = Some(self.connect(*until).map_err(|e| (e, false))?);
        }
        let stream = self.conn.as_mut().expect("connected above");
        let written = left(*until, "request")
            .and_then(|l| stream.set_write_timeout(Some(l)))
            .and_then(|()| stream.write_all(&self.wbuf))
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock => timed_out("request"),
                _ => e,
            });
        if let Err(e) = written {
            self.conn = None;
            return Err((e, false));
        }
        self.rbuf.clear();
        for i in 0..reqs.len() {
            if i > 0 && stop() {
                self.conn = None;
                return Err((io::Error::new(io::ErrorKind::Interrupted, "stopping"), false));
            }
            let stream = self.conn.as_mut().expect("kept while answers come");
            match read_response(&mut Deadline { stream, until: *until }, &mut self.rbuf) {
                Ok((resp, keep)) => {
                    answers.push((resp, started.elapsed()));
                    *until = Instant::now() + self.timeout;
                    if !keep {
                        // A server that closes after every answer gets one request at a time.
                        self.one_per_conn = i == 0;
                        self.conn = None;
                        return Ok(());
                    }
                    self.one_per_conn = false;
                }
                Err(e) => {
                    self.conn = None;
                    return Err((e, !self.rbuf.is_empty()));
                }
            }
        }
        if !self.rbuf.is_empty() {
            self.conn = None;
        }
        Ok(())
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

/// Reads one response from `s`, starting with the bytes already in `buf`; returns it and whether
/// the connection can be reused, and leaves in `buf` the bytes read past its end.
pub fn read_response(s: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<(Response, bool)> {
    let (head_end, status, length, chunked, mut close, retry_after) = loop {
        let Some(p) = find(buf, b"\r\n\r\n") else {
            if buf.len() > 64 * 1024 {
                return Err(bad("response headers too large"));
            }
            if fill(s, buf)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                ));
            }
            continue;
        };
        let head =
            std::str::from_utf8(&buf[..p]).map_err(|_| bad("response headers are not text"))?;
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or("").splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status: u16 =
            parts.next().and_then(|c| c.parse().ok()).ok_or_else(|| bad("bad status line"))?;
        if !version.starts_with("HTTP/1.") {
            return Err(bad("not an HTTP/1.x response"));
        }
        // An interim answer (100 Continue, 103 Early Hints) has no body and is followed by the
        // real one: taken as the answer, it would shift every later answer of a pipelined batch
        // onto the wrong request.
        if status == 101 {
            return Err(bad("the backend switched protocols"));
        }
        if (100..200).contains(&status) {
            buf.drain(..p + 4);
            continue;
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
        break (p, status, length, chunked, close, retry_after);
    };
    let mut rest = buf.split_off(head_end + 4);
    // Bytes past this answer (the start of the next one, when pipelining) end up in `buf`; until
    // then `buf` keeps the head, so an error still shows that bytes arrived.
    let mut next = Vec::new();
    let no_body = status == 204 || status == 304;
    let mut longer = false;
    let body = if no_body {
        next = std::mem::take(&mut rest);
        Vec::new()
    } else if chunked {
        let (body, complete, used) = read_chunked(s, &mut rest)?;
        if !complete {
            // The rest is not read: the connection cannot be reused.
            close = true;
            longer = true;
        } else {
            next = rest[used..].to_vec();
        }
        body
    } else if let Some(n) = length {
        if n > DRAIN_MAX {
            close = true;
            longer = true;
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
        next = rest.split_off(want);
        rest
    } else {
        // Delimited by close.
        close = true;
        while rest.len() < DRAIN_MAX && fill(s, &mut rest)? > 0 {}
        longer = rest.len() >= DRAIN_MAX;
        rest
    };
    let mut body = body;
    let truncated = longer || body.len() > KEEP;
    body.truncate(KEEP);
    *buf = next;
    Ok((Response { status, retry_after, body, truncated }, !close))
}

/// Reads a chunked body, up to [`DRAIN_MAX`] bytes; the bool is false when it was longer and
/// the rest was left unread (a large body is no error: the status is the answer). The usize is
/// how many bytes of `rest` the body took.
fn read_chunked(s: &mut impl Read, rest: &mut Vec<u8>) -> io::Result<(Vec<u8>, bool, usize)> {
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
                        return Ok((body, true, at + 2));
                    }
                    at += p + 2;
                } else if fill(s, rest)? == 0 {
                    return Ok((body, true, rest.len()));
                }
            }
        }
        // Not `body.len() + size`: a chunk size near usize::MAX (found by fuzzing) overflowed it.
        if size > DRAIN_MAX - body.len() {
            return Ok((body, false, rest.len()));
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
    fn a_chunk_size_near_usize_max_is_a_cut_body_not_a_panic() {
        // After a first chunk, so `body.len() + size` would overflow. Too long is no error (the
        // status is the answer): the body is cut and marked, and the connection not reused.
        let (r, keep) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\nab",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.truncated, keep), (200, &b"a"[..], true, false));
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

    #[test]
    fn a_large_2xx_body_is_cut_not_an_error_whatever_its_framing() {
        let big = 3 << 20;
        // Chunked: 3 MiB in 64 KiB chunks.
        let chunk = vec![b'x'; 64 << 10];
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..(big / chunk.len()) {
            chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            chunked.extend_from_slice(&chunk);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let mut with_length =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n").into_bytes();
        with_length.resize(with_length.len() + big, b'y');
        let mut close_delimited = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
        close_delimited.resize(close_delimited.len() + big, b'z');
        for raw in [chunked, with_length, close_delimited] {
            let (r, keep) = read_response(&mut &raw[..], &mut Vec::new()).unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len(), KEEP);
            assert!(r.truncated);
            assert!(!keep, "the unread rest makes the connection unusable");
        }
        // Positive control: a small body is whole and not marked.
        let (r, keep) = read_response(
            &mut &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..],
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!((r.body.as_slice(), r.truncated, keep), (&b"ok"[..], false, true));
    }

    type Count = std::sync::Arc<std::sync::atomic::AtomicUsize>;

    fn count(c: &Count) -> usize {
        c.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A loopback server that runs `conn(k, stream)` for each of its first `n` connections in
    /// turn; its port, and how many connections it accepted so far.
    fn serve(n: usize, conn: impl Fn(usize, TcpStream) + Send + 'static) -> (u16, Count) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns = Count::default();
        let c2 = conns.clone();
        std::thread::spawn(move || {
            for (k, s) in l.incoming().take(n).enumerate() {
                c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                conn(k, s.unwrap());
            }
        });
        (port, conns)
    }

    /// A keep-alive server that echoes each body and closes the connection after every
    /// `per_conn` requests.
    fn server(per_conn: usize) -> (u16, Count) {
        serve(50, move |_, s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            for _ in 0..per_conn {
                let Some(b) = read_body(&mut r) else { return };
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len());
                let _ = (&s).write_all(head.as_bytes());
                let _ = (&s).write_all(&b);
            }
            // Drop: the server closes an idle kept-alive connection.
        })
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
        assert_eq!(count(&conns), 3);
    }

    fn batch<'a>(bodies: &'a [String], headers: &'a [(&'a str, &'a str)]) -> Vec<Request<'a>> {
        bodies.iter().map(|b| Request { path: "/x", headers, body: b.as_bytes() }).collect()
    }

    #[test]
    fn a_batch_goes_out_in_one_write_and_its_answers_are_read_in_order() {
        // The server reads all four requests before it answers any: a client that waited for
        // each answer would get none (it times out), so this passes only if it pipelines.
        let (port, _) = serve(1, |_, s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            for _ in 0..4 {
                if !read_request(&mut r) {
                    return;
                }
            }
            // One write holding four answers of every framing: Content-Length, no body (204),
            // chunked with a trailer, and a 503 with Retry-After.
            let _ = (&s).write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none\
                  HTTP/1.1 204 No Content\r\n\r\n\
                  HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nthr\r\n2\r\nee\r\n0\r\nX-T: 1\r\n\r\n\
                  HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nfour",
            );
            std::thread::sleep(Duration::from_secs(2));
        });
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(1));
        let bodies: Vec<String> = (0..4).map(|i| format!("{{\"n\":{i}}}")).collect();
        let mut answers = Vec::new();
        c.post_all(&batch(&bodies, &[]), &mut answers, &|| false).unwrap();
        let got: Vec<(u16, &[u8], Option<&str>)> = answers
            .iter()
            .map(|(a, _)| (a.status, &a.body[..], a.retry_after.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (200, &b"one"[..], None),
                (204, &b""[..], None),
                (201, &b"three"[..], None),
                (503, &b"four"[..], Some("7")),
            ]
        );
    }

    #[test]
    fn a_batch_cut_short_by_the_server_closing_is_finished_on_new_connections() {
        // The server answers 3 requests per connection, then closes without a word (the
        // requests after them on that connection are left unanswered): every request of the
        // batch is still answered once, in order.
        let (port, conns) = server(3);
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(5));
        let bodies: Vec<String> = (0..8).map(|i| format!("{{\"n\":{i}}}")).collect();
        let mut answers = Vec::new();
        c.post_all(&batch(&bodies, &[("Content-Type", "application/json")]), &mut answers, &|| {
            false
        })
        .unwrap();
        let echoed: Vec<Vec<u8>> = answers.into_iter().map(|(a, _)| a.body).collect();
        let sent: Vec<Vec<u8>> = bodies.into_iter().map(String::into_bytes).collect();
        assert_eq!(echoed, sent);
        assert_eq!(count(&conns), 3);
    }

    #[test]
    fn a_batch_whose_answer_breaks_off_mid_way_is_an_error_after_the_whole_answers() {
        // Half an answer is not a clean close: the server may have processed that request, so
        // it is not sent again here (the worker retries it with its backoff).
        let (port, accepted) = serve(3, |_, s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            for _ in 0..3 {
                read_request(&mut r);
            }
            let _ = (&s).write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
                  HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            );
        });
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(5));
        let bodies: Vec<String> = (0..3).map(|i| i.to_string()).collect();
        let mut answers = Vec::new();
        let e = c.post_all(&batch(&bodies, &[]), &mut answers, &|| false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert_eq!(answers.len(), 1);
        assert_eq!(count(&accepted), 1, "not sent again");
    }

    #[test]
    fn interim_answers_are_skipped_and_a_protocol_switch_is_an_error() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (r, keep) = parse(raw).unwrap();
        assert_eq!((r.status, r.body.as_slice(), keep), (200, &b"ok"[..], true));
        assert!(parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n").is_err());
        let (r, _) =
            parse(b"HTTP/1.1 102\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(r.status, 200);
        // Not interim: a status of four digits is read as it is.
        let (r, _) = parse(b"HTTP/1.1 1000 X\r\nContent-Length: 1\r\n\r\nz").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (1000, &b"z"[..]));
    }

    #[test]
    fn a_batch_on_a_connection_the_server_had_closed_is_sent_again_on_a_fresh_one() {
        let (port, conns) = server(3);
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(5));
        for round in 0..2 {
            let bodies: Vec<String> = (0..3).map(|i| format!("{round}-{i}")).collect();
            let mut answers = Vec::new();
            c.post_all(&batch(&bodies, &[]), &mut answers, &|| false).unwrap();
            let echoed: Vec<Vec<u8>> = answers.into_iter().map(|(a, _)| a.body).collect();
            assert_eq!(echoed, bodies.into_iter().map(String::into_bytes).collect::<Vec<_>>());
        }
        // The second batch found the first connection closed and used a second one.
        assert_eq!(count(&conns), 2);
    }

    #[test]
    fn a_server_that_answers_one_request_per_connection_then_gets_one_at_a_time() {
        // Each connection: read whatever requests came, answer the first with
        // `Connection: close`. Without the fallback the rest of the batch would be written
        // again on every new connection (4 + 3 + 2 + 1 requests); with it, 4 + 1 + 1 + 1.
        let read = Count::default();
        let r2 = read.clone();
        let (port, _) = serve(10, move |_, s| {
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut n = 0;
            while read_request(&mut r) {
                n += 1;
            }
            r2.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            let _ = (&s).write_all(
                format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n{n}")
                    .as_bytes(),
            );
        });
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(5));
        let bodies: Vec<String> = (0..4).map(|i| i.to_string()).collect();
        let mut answers = Vec::new();
        c.post_all(&batch(&bodies, &[]), &mut answers, &|| false).unwrap();
        let seen: Vec<Vec<u8>> = answers.into_iter().map(|(a, _)| a.body).collect();
        assert_eq!(seen, vec![b"4".to_vec(), b"1".to_vec(), b"1".to_vec(), b"1".to_vec()]);
        assert_eq!(count(&read), 7);
    }

    #[test]
    fn stop_is_asked_between_answers() {
        let (port, _) = serve(1, |_, s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            read_request(&mut r);
            let _ = (&s).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            // The second answer would come only after the client's 5 s timeout.
            std::thread::sleep(Duration::from_secs(6));
        });
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(5));
        let bodies: Vec<String> = (0..2).map(|i| i.to_string()).collect();
        let mut answers = Vec::new();
        let t = Instant::now();
        // Stopping all along: still the first answer is read (stop is asked only between them).
        let e = c.post_all(&batch(&bodies, &[]), &mut answers, &|| true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        assert_eq!(answers.len(), 1);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn bytes_nobody_asked_for_after_the_last_answer_are_not_taken_for_the_next_one() {
        let (port, _) = serve(2, |k, s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            read_request(&mut r);
            if k == 0 {
                // A second answer to the one request starts in the same write and ends when
                // the next request comes: taken for that request's answer, it would break it.
                let _ = (&s).write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirstHTTP/1.1 200 OK\r\n",
                );
                if read_request(&mut r) {
                    let _ = (&s).write_all(b"Content-Length: 5\r\n\r\nbogus");
                }
            } else {
                let _ = (&s).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond");
                let _ = read_request(&mut r);
            }
        });
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(5));
        assert_eq!(c.post("/x", &[], b"1").unwrap().body, b"first");
        assert_eq!(c.post("/x", &[], b"2").unwrap().body, b"second");
    }

    #[test]
    fn bytes_after_an_answer_are_kept_for_the_next_one() {
        let raw = b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\ny\r\n0\r\n\r\nHTTP/1.1 202";
        let mut src = &raw[..];
        let mut buf = Vec::new();
        let mut bodies = Vec::new();
        for _ in 0..3 {
            bodies.push(read_response(&mut src, &mut buf).unwrap().0.body);
        }
        assert_eq!(bodies, vec![b"".to_vec(), b"x".to_vec(), b"y".to_vec()]);
        assert_eq!(buf, b"HTTP/1.1 202");
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

    /// Reads one request (headers and Content-Length body) from `r`: its body, None at end of
    /// stream.
    fn read_body(r: &mut impl BufRead) -> Option<Vec<u8>> {
        let mut len = 0;
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut b = vec![0; len];
        r.read_exact(&mut b).ok().map(|()| b)
    }

    fn read_request(r: &mut impl BufRead) -> bool {
        read_body(r).is_some()
    }

    const TIMEOUT: Duration = Duration::from_millis(600);
    /// Scheduling slack on a loaded 2-core machine; below the 0.75 x TIMEOUT the stale-connection
    /// retry used to add (and far below a whole second timeout), so the tests still tell.
    const MARGIN: Duration = Duration::from_millis(350);

    fn post_and_time(port: u16) -> (io::Error, Duration) {
        let mut c = Client::new("127.0.0.1", Some(port), TIMEOUT);
        let t = Instant::now();
        let e = c.post("/x", &[], b"{}").unwrap_err();
        (e, t.elapsed())
    }

    #[test]
    fn a_backend_that_accepts_and_never_answers_ends_within_the_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            // Hold the connection open, silent, for longer than the client waits.
            std::thread::sleep(TIMEOUT * 4);
            drop(s);
        });
        let (e, took) = post_and_time(port);
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(took >= TIMEOUT && took < TIMEOUT + MARGIN, "{took:?}");
    }

    /// A listener that never accepts, with its accept queue full: the kernel drops further
    /// SYNs, so a connect hangs until the queue has room (loopback only).
    fn full_listener() -> (std::net::TcpListener, Vec<TcpStream>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut held = Vec::new();
        let full = (0..2000).any(|_| {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                Ok(s) => {
                    held.push(s);
                    false
                }
                Err(_) => true,
            }
        });
        assert!(full, "the accept queue never filled ({} connections)", held.len());
        (l, held)
    }

    #[test]
    fn a_connect_that_hangs_ends_within_the_timeout() {
        let (l, _held) = full_listener();
        let (e, took) = post_and_time(l.local_addr().unwrap().port());
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(took >= TIMEOUT - MARGIN && took < TIMEOUT + MARGIN, "{took:?}");
    }

    #[test]
    fn a_slow_connect_leaves_the_answer_only_the_rest_of_the_timeout() {
        // The connect hangs until the SYN is retransmitted (about 1 s) after room was made,
        // then the request is never answered: the whole request still ends at the deadline.
        let timeout = Duration::from_millis(1500);
        let (l, _held) = full_listener();
        let port = l.local_addr().unwrap().port();
        let make_room = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let one = l.accept().unwrap();
            std::thread::sleep(timeout * 2);
            drop((one, l));
        });
        let mut c = Client::new("127.0.0.1", Some(port), timeout);
        let t = Instant::now();
        let e = c.post("/x", &[], b"{}").unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // Before: a fresh timeout started after connecting, about 2.5 s in all.
        assert!(took >= timeout - MARGIN && took < timeout + MARGIN, "{took:?}");
        make_room.join().unwrap();
    }

    #[test]
    fn the_stale_connection_retry_shares_the_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            // Connection 1: answer one request (keep-alive), then read the second and close
            // without a byte after most of the timeout: the client sees a stale connection.
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            assert!(read_request(&mut r));
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
            if read_request(&mut r) {
                std::thread::sleep(TIMEOUT * 3 / 4);
            }
            drop((r, w));
            // Connection 2 (the retry): accepted and never answered.
            let (s2, _) = l.accept().unwrap();
            std::thread::sleep(TIMEOUT * 4);
            drop(s2);
        });
        let mut c = Client::new("127.0.0.1", Some(port), TIMEOUT);
        assert_eq!(c.post("/x", &[], b"{}").unwrap().status, 200);
        let t = Instant::now();
        let e = c.post("/x", &[], b"{}").unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // Before: the retry got a fresh timeout, about 1.75 x TIMEOUT in all.
        assert!(took >= TIMEOUT && took < TIMEOUT + MARGIN, "{took:?}");
    }

    #[test]
    fn refused_connection_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut c = Client::new("127.0.0.1", Some(port), Duration::from_secs(1));
        assert!(c.post("/x", &[], b"{}").is_err());
    }
}

//! A real `redis-server` (Debian's redis-server package) on a reserved loopback [`Port`], in a
//! temp dir, without persistence, for tests of state shared between nodes.
//!
//! Talks RESP itself (a few dozen lines) rather than through the `redis` crate: the test kit is
//! compiled into the core's unit tests too, and a checker that does not share the client the
//! code under test uses cannot hide a bug in how that client is used.

use crate::Port;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub fn redis_bin() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "/usr/bin/redis-server".into())
}

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    /// A bulk string; `None` is the null bulk string (a missing key).
    Bulk(Option<Vec<u8>>),
    /// `None` is the null array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text: a status, an error, a number or a (non-null) bulk string.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Status(s) | Reply::Error(s) => Some(s.clone()),
            Reply::Int(i) => Some(i.to_string()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The members of an array reply, each as text (e.g. the answer to `KEYS`).
    pub fn strings(&self) -> Vec<String> {
        match self {
            Reply::Array(Some(items)) => items.iter().filter_map(Reply::text).collect(),
            _ => Vec::new(),
        }
    }
}

/// Sends one command (each argument a bulk string) on `stream` and reads its reply.
pub fn resp_command(stream: &mut TcpStream, args: &[&str]) -> std::io::Result<Reply> {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    stream.write_all(&req)?;
    read_reply(&mut BufReader::new(stream))
}

fn bad(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.len().min(1));
    let num = || rest.parse::<i64>().map_err(|_| bad(format!("bad RESP line {line:?}")));
    Ok(match kind {
        "+" => Reply::Status(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(num()?),
        "$" => match num()? {
            n if n < 0 => Reply::Bulk(None),
            n => {
                let mut b = vec![0u8; n as usize + 2];
                r.read_exact(&mut b)?;
                b.truncate(n as usize);
                Reply::Bulk(Some(b))
            }
        },
        "*" => match num()? {
            n if n < 0 => Reply::Array(None),
            n => Reply::Array(Some((0..n).map(|_| read_reply(r)).collect::<Result<_, _>>()?)),
        },
        _ => return Err(bad(format!("bad RESP line {line:?}"))),
    })
}

/// A running `redis-server`; killed on drop. [`Redis::stop`] and [`Redis::start_again`] give an
/// outage and a recovery on the same port, so clients configured with [`Redis::url`] find it.
pub struct Redis {
    child: Option<Child>,
    port: Port,
    pub dir: tempfile::TempDir,
    pub log_path: PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: Port::reserve(),
            dir: tempfile::tempdir().unwrap(),
            log_path: PathBuf::new(),
        };
        r.log_path = r.dir.path().join("redis.log");
        r.start_again();
        r
    }

    pub fn port(&self) -> u16 {
        self.port.get()
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port.get())
    }

    /// Starts the server (again, after [`Redis::stop`]) on the same port, empty (nothing is
    /// persisted), and waits until it answers PING.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        // The log is appended to, so a failure after a restart still shows the first run's log.
        let port = self.port.get().to_string();
        let child = crate::spawn_logged(
            Command::new(redis_bin())
                .args(["--bind", "127.0.0.1", "--port", &port, "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--logfile", ""])
                .arg("--dir")
                .arg(self.dir.path()),
            &self.log_path,
            &format!("{} (`make deps` installs redis-server)", redis_bin()),
        );
        self.child = Some(child);
        crate::Starting {
            what: "redis-server",
            within: Duration::from_secs(10),
            every: Duration::from_millis(20),
            child: |r: &mut Redis| &mut r.child,
            ready: |r| match r.try_cmd(&["PING"]) {
                Ok(Reply::Status(s)) if s == "PONG" => Ok(()),
                other => Err(format!("PING: {other:?}")),
            },
            log: Redis::log,
        }
        .wait(self);
    }

    /// Kills the server (SIGKILL: an outage, not a shutdown) and waits until the port refuses
    /// connections.
    pub fn stop(&mut self) {
        crate::kill_and_reap(&mut self.child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port.get())).is_ok() {
            assert!(Instant::now() < deadline, "port {} still open after kill", self.port.get());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// One command on a fresh connection; I/O errors (e.g. while stopped) are returned.
    pub fn try_cmd(&self, args: &[&str]) -> std::io::Result<Reply> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port.get()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        resp_command(&mut s, args)
    }

    /// One command; panics (with the server's log) if it cannot be run.
    pub fn cmd(&self, args: &[&str]) -> Reply {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}; redis log:\n{}", self.log()))
    }

    /// `DBSIZE`
    pub fn dbsize(&self) -> i64 {
        self.cmd(&["DBSIZE"]).int().expect("DBSIZE answers an integer")
    }

    /// `KEYS pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut k = self.cmd(&["KEYS", pattern]).strings();
        k.sort();
        k
    }

    /// One field of `INFO section`, e.g. `info("memory", "used_memory")`.
    pub fn info(&self, section: &str, field: &str) -> Option<String> {
        let text = self.cmd(&["INFO", section]).text()?;
        text.lines().find_map(|l| Some(l.strip_prefix(field)?.strip_prefix(':')?.to_string()))
    }

    /// `MEMORY USAGE key`: bytes, `None` for a missing key.
    pub fn memory_usage(&self, key: &str) -> Option<i64> {
        self.cmd(&["MEMORY", "USAGE", key]).int()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_replies_parse_including_nulls_and_nesting() {
        let raw = b"*3\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:7\r\n+OK\r\n-ERR no\r\n";
        let mut r = BufReader::new(&raw[..]);
        assert_eq!(
            read_reply(&mut r).unwrap(),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"abc".to_vec())),
                Reply::Bulk(None),
                Reply::Array(Some(vec![Reply::Int(7), Reply::Status("OK".into())])),
            ]))
        );
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Error("ERR no".into()));
        assert!(read_reply(&mut BufReader::new(&b"?x\r\n"[..])).is_err());
    }

    #[test]
    fn redis_serves_commands_and_comes_back_empty_on_the_same_port_after_an_outage() {
        let mut r = Redis::start();
        assert!(r.url().starts_with("redis://127.0.0.1:") && r.url().ends_with('/'));
        assert_eq!(r.cmd(&["SET", "replay:a", "1"]), Reply::Status("OK".into()));
        assert_eq!(r.cmd(&["SET", "replay:b", "12345"]), Reply::Status("OK".into()));
        assert_eq!(r.cmd(&["SET", "other", "x"]), Reply::Status("OK".into()));
        assert_eq!(r.dbsize(), 3);
        assert_eq!(r.keys("replay:*"), ["replay:a", "replay:b"]);
        assert!(r.memory_usage("replay:b").is_some_and(|n| n > 0));
        assert_eq!(r.memory_usage("missing"), None);
        assert!(r.info("memory", "used_memory").and_then(|v| v.parse::<u64>().ok()).is_some());
        assert!(matches!(r.cmd(&["NOSUCHCOMMAND"]), Reply::Error(_)));
        // Not persisted: nothing configured to write to the dir.
        assert_eq!(r.cmd(&["CONFIG", "GET", "appendonly"]).strings(), ["appendonly", "no"]);
        assert_eq!(r.cmd(&["CONFIG", "GET", "save"]).strings(), ["save", ""]);

        let port = r.port();
        r.stop();
        assert!(!r.running());
        assert!(r.try_cmd(&["PING"]).is_err(), "answers while stopped");
        r.start_again();
        assert_eq!(r.port(), port);
        assert_eq!(r.dbsize(), 0, "came back with state; log:\n{}", r.log());
    }
}

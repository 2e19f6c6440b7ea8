//! A real HAProxy (Debian's haproxy package) in front of several brokers: TCP mode with TLS
//! passthrough, so mutual TLS still ends in Mosquitto and the plugin sees the client
//! certificate, and an HTTP health check on each node's `/readyz` (its `metrics_listen` port).
//!
//! Runs in the foreground (`-db`) from a config in a temp dir, killed on drop. The admin socket
//! in the same dir answers `show stat`, so tests wait for servers to be UP or DOWN instead of
//! sleeping, and can put a server in maintenance.

use crate::Port;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub fn haproxy_bin() -> String {
    std::env::var("HAPROXY_BIN").unwrap_or_else(|_| "/usr/sbin/haproxy".into())
}

/// The backend's name in the generated config; servers are `n0`, `n1`, ...
pub const BACKEND: &str = "brokers";

/// One backend server: the broker's TLS port and its node's `metrics_listen` port.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    pub port: u16,
    pub metrics_port: u16,
}

/// A running HAProxy; killed on drop.
pub struct Haproxy {
    child: Option<Child>,
    frontend: Port,
    pub dir: tempfile::TempDir,
    pub conf_path: PathBuf,
    pub log_path: PathBuf,
    pub servers: Vec<Upstream>,
}

impl Haproxy {
    /// `balance roundrobin`: the tests open connections one after another and often close each
    /// before the next, where leastconn would send them all to the first server; round robin
    /// spreads them predictably. (The operator example uses leastconn: long-lived devices.)
    pub fn start(servers: &[Upstream]) -> Haproxy {
        Self::start_with(servers, "balance roundrobin\n")
    }

    /// The same with extra lines for the backend section (e.g. another `balance`, or
    /// `default-server on-marked-down shutdown-sessions`).
    pub fn start_with(servers: &[Upstream], backend_extra: &str) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let frontend = Port::reserve();
        let sock = dir.path().join("admin.sock");
        let mut conf = format!(
            "global\n\
             \x20   stats socket {sock} mode 600 level admin\n\
             \x20   log stderr format raw local0 info\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   log global\n\
             \x20   option tcplog\n\
             \x20   timeout connect 2s\n\
             \x20   # Longer than any MQTT keepalive the tests use (30 s): idle is not dead.\n\
             \x20   timeout client 10m\n\
             \x20   timeout server 10m\n\
             \x20   timeout check 1s\n\
             frontend mqtts\n\
             \x20   bind 127.0.0.1:{fport}\n\
             \x20   default_backend {BACKEND}\n\
             backend {BACKEND}\n\
             \x20   option httpchk GET /readyz\n\
             \x20   http-check expect status 200\n",
            sock = sock.display(),
            fport = frontend.get(),
        );
        for line in backend_extra.lines() {
            conf += &format!("    {line}\n");
        }
        for (i, s) in servers.iter().enumerate() {
            // Fast checks for tests: down after 2 failures 200 ms apart, up after 1 success.
            conf += &format!(
                "    server n{i} 127.0.0.1:{} check port {} inter 200ms fall 2 rise 1\n",
                s.port, s.metrics_port
            );
        }
        let conf_path = dir.path().join("haproxy.cfg");
        std::fs::write(&conf_path, conf).unwrap();
        let log_path = dir.path().join("haproxy.log");
        let child = crate::spawn_logged(
            Command::new(haproxy_bin()).arg("-db").arg("-f").arg(&conf_path),
            &log_path,
            &format!("{} (`make deps` installs haproxy)", haproxy_bin()),
        );
        let mut h = Haproxy {
            child: Some(child),
            frontend,
            dir,
            conf_path,
            log_path,
            servers: servers.to_vec(),
        };
        h.wait_ready();
        h
    }

    fn wait_ready(&mut self) {
        crate::Starting {
            what: "haproxy",
            within: Duration::from_secs(10),
            every: Duration::from_millis(20),
            child: |h: &mut Haproxy| &mut h.child,
            // HAProxy binds every listener before it serves the admin socket, so an answer
            // there means clients can come. (A probe connection to the frontend would be
            // forwarded to a broker and take a turn of the round robin.)
            ready: |h| h.try_admin("show info").map(drop).map_err(|e| e.to_string()),
            log: |h| format!("{}\nconfig:\n{}", h.log(), h.config()),
        }
        .wait(self);
    }

    /// The frontend's port, where devices connect.
    pub fn port(&self) -> u16 {
        self.frontend.get()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn config(&self) -> String {
        std::fs::read_to_string(&self.conf_path).unwrap_or_default()
    }

    fn try_admin(&self, command: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(self.dir.path().join("admin.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        // Without `prompt` mode HAProxy answers one command and closes.
        s.write_all(format!("{command}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// One command on the admin socket (e.g. `show stat`, `disable server brokers/n1`).
    pub fn admin(&self, command: &str) -> String {
        self.try_admin(command)
            .unwrap_or_else(|e| panic!("haproxy admin {command:?}: {e}; log:\n{}", self.log()))
    }

    /// Each server's status from `show stat` (`UP`, `DOWN`, `MAINT`, `UP 1/2`, `no check`...),
    /// in config order.
    pub fn server_status(&self) -> Vec<(String, String)> {
        let csv = self.admin("show stat");
        let mut lines = csv.lines();
        let head: Vec<&str> =
            lines.next().unwrap_or_default().trim_start_matches("# ").split(',').collect();
        let col = |name: &str| head.iter().position(|h| *h == name);
        let (px, sv, st) = match (col("pxname"), col("svname"), col("status")) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => panic!("unexpected `show stat` header: {csv}"),
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st && f[px] == BACKEND && f[sv] != "BACKEND")
            .map(|f| (f[sv].to_string(), f[st].to_string()))
            .collect()
    }

    /// How many servers take new connections: `UP`, or `UP 1/2` (failing checks, not yet
    /// `fall` of them).
    pub fn servers_up(&self) -> usize {
        self.server_status().iter().filter(|(_, s)| s.starts_with("UP")).count()
    }

    /// Waits (bounded) until exactly `n` servers are UP and none is between states (`UP 1/2`,
    /// `DOWN 1/1`), so which servers take connections no longer changes by itself.
    pub fn wait_up(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.server_status();
            let settled = st.iter().all(|(_, s)| !s.contains('/'));
            if settled && st.iter().filter(|(_, s)| s == "UP").count() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not {n} servers UP within {timeout:?}: {st:?}; haproxy log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Puts server `i` in maintenance (no new connections) or back in service.
    pub fn set_maint(&self, i: usize, maint: bool) {
        let verb = if maint { "disable" } else { "enable" };
        let out = self.admin(&format!("{verb} server {BACKEND}/n{i}"));
        assert!(out.trim().is_empty(), "{verb} server n{i}: {out}");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Arc;

    /// A stand-in node: its "MQTT" port writes `name` to each connection, its health port
    /// answers whatever status `health` holds. Threads are left to die with the test process.
    fn fake_node(name: u8) -> (Upstream, Arc<AtomicU16>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let h = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = Upstream {
            port: l.local_addr().unwrap().port(),
            metrics_port: h.local_addr().unwrap().port(),
        };
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(&[name]);
            }
        });
        let health = Arc::new(AtomicU16::new(200));
        let status = health.clone();
        std::thread::spawn(move || {
            for mut c in h.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let code = status.load(Ordering::SeqCst);
                let _ = write!(
                    c,
                    "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        (up, health)
    }

    fn landed(h: &Haproxy, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut c = TcpStream::connect(("127.0.0.1", h.port())).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).unwrap_or_else(|e| panic!("{e}; log:\n{}", h.log()));
                b[0]
            })
            .collect()
    }

    #[test]
    fn haproxy_spreads_connections_and_follows_health_checks_and_maintenance() {
        let (a, _ha) = fake_node(b'A');
        let (b, hb) = fake_node(b'B');
        let h = Haproxy::start(&[a, b]);
        h.wait_up(2, Duration::from_secs(10));
        // Control: round robin uses both.
        let got = landed(&h, 4);
        assert!(got.contains(&b'A') && got.contains(&b'B'), "{got:?}");
        hb.store(503, Ordering::SeqCst);
        h.wait_up(1, Duration::from_secs(10));
        assert_eq!(h.server_status()[1].1, "DOWN", "{:?}", h.server_status());
        assert_eq!(landed(&h, 4), b"AAAA");
        hb.store(200, Ordering::SeqCst);
        h.wait_up(2, Duration::from_secs(10));
        h.set_maint(0, true);
        h.wait_up(1, Duration::from_secs(10));
        assert_eq!(landed(&h, 4), b"BBBB");
        h.set_maint(0, false);
        h.wait_up(2, Duration::from_secs(10));
    }
}

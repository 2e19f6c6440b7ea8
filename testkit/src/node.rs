//! Several brokers of one cluster: one [`Env`] (PKI, registry), and per node its own reserved
//! MQTT and `metrics_listen` ports and its own outbox, so a node can be killed and restarted
//! where devices and HAProxy expect it, with the spool it had.

use crate::{Broker, Env, PluginOpts, Port, Upstream};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One node of a cluster.
pub struct Node {
    pub index: usize,
    pub broker: Broker,
    /// Held for the node's life, so a restart finds both ports free of strangers.
    pub port: Port,
    pub metrics_port: Port,
    /// This node's outbox (`spool_path`).
    pub spool: PathBuf,
    /// The options the node runs with (over [`Env::base_opts`]), reused by [`Node::restart`].
    pub opts: PluginOpts,
}

/// Starts `n` nodes of `env`: node `i` gets `opts_for(i)` over its own `spool_path` (under the
/// env's dir, `outbox-<i>`) and `metrics_listen`; `opts_for` may override either.
pub fn start_nodes(env: &Env, n: usize, opts_for: impl Fn(usize) -> PluginOpts) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let port = Port::reserve();
            let metrics_port = Port::reserve();
            let base = PluginOpts::new()
                .set("spool_path", env.path().join(format!("outbox-{i}")).display())
                .set("metrics_listen", format!("127.0.0.1:{}", metrics_port.get()));
            let opts = base.with(&opts_for(i));
            let spool = PathBuf::from(opts.get("spool_path").unwrap());
            let broker = Broker::start_on(env, &port, &opts);
            Node { index: i, broker, port, metrics_port, spool, opts }
        })
        .collect()
}

/// What HAProxy needs to know about each node.
pub fn upstreams(nodes: &[Node]) -> Vec<Upstream> {
    nodes.iter().map(Node::upstream).collect()
}

/// One HTTP/1.1 GET on loopback with `Connection: close`: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, raw.clone());
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

impl Node {
    /// The broker's MQTT (TLS) port.
    pub fn mqtt_port(&self) -> u16 {
        self.port.get()
    }

    pub fn upstream(&self) -> Upstream {
        Upstream { port: self.port.get(), metrics_port: self.metrics_port.get() }
    }

    /// `/healthz`: (status, body); connection errors (a dead node) as status 0.
    pub fn healthz(&self) -> (u16, String) {
        http_get(self.metrics_port.get(), "/healthz").unwrap_or_else(|e| (0, e.to_string()))
    }

    /// Waits (bounded) until `/healthz` answers `code`; returns the body.
    pub fn wait_health(&self, code: u16, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (c, body) = self.healthz();
            if c == code {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: /healthz stayed {c} ({body:?}), wanted {code}; log:\n{}",
                self.index,
                self.broker.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One `/metrics` scrape as samples by full name (with labels); empty while the exporter
    /// still answers 503 "starting" or the node is down.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        match http_get(self.metrics_port.get(), "/metrics") {
            Ok((200, body)) => body
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(|l| {
                    let (name, value) = l.rsplit_once(' ')?;
                    Some((name.to_string(), value.parse().ok()?))
                })
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    /// Scrapes until `name` equals `want` (the exporter's snapshot lags by up to 250 ms).
    pub fn wait_metric(&self, name: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics();
            if m.get(name) == Some(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: {name} is {:?}, wanted {want}; log:\n{}",
                self.index,
                m.get(name),
                self.broker.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the node again (after [`Broker::kill9`] or [`Broker::stop`]) on the same ports,
    /// spool and options, and waits until it accepts connections.
    pub fn restart(&mut self, env: &Env) {
        self.broker.kill9();
        self.broker = Broker::start_on(env, &self.port, &self.opts);
    }
}

/// Makes a directory immutable (`chattr +i`) for as long as it lives, e.g. a node's outbox to
/// turn its `/healthz` 503. Root ignores permission bits, so a mode change would not make the
/// directory unwritable for a broker running as root; the immutable flag binds root too
/// (creating a file in it fails with EPERM).
pub struct Immutable(PathBuf);

impl Immutable {
    pub fn set(dir: &std::path::Path) -> Immutable {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chattr +i {} failed: the filesystem must support it", dir.display());
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

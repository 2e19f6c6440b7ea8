//! `plugin_opt_*` options: parsed and validated once, in init. Any unknown key, duplicate key,
//! missing required key or bad value is an error that names the key and the value, and the
//! broker refuses to start.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_DATA_TOPIC: &str = "device/+/data";
pub const DEFAULT_RESPONSE_TOPIC: &str = "device/+/response";
pub const DEFAULT_TOLERANCE_S: i64 = 300;
pub const DEFAULT_REPLAY_CACHE_SIZE: usize = 1000;
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 65536;
pub const DEFAULT_BACKEND_URL: &str = "http://localhost:5000/device/{device_id}/data";
pub const DEFAULT_WORKERS: usize = 4;
pub const DEFAULT_SPOOL_PATH: &str = "/var/lib/secure-iot-gateway/outbox";
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_HTTP_TIMEOUT_MS: u64 = 5000;
/// Requests a worker may send back to back before it reads their answers (HTTP/1.1 pipelining).
pub const DEFAULT_BACKEND_PIPELINE: usize = 8;
/// Mosquitto's own default `sys_interval` (the plugin API cannot read the broker's value).
pub const DEFAULT_SYS_INTERVAL_S: u64 = 10;
/// Largest envelope the plugin will parse (Mosquitto's own `message_size_limit` may be lower).
pub const MAX_PAYLOAD_LIMIT: usize = 16 << 20;

/// Every option key the plugin understands, for the error message on a typo.
pub const KEYS: [&str; 22] = [
    "db_path",
    "registry_url",
    "cluster_url",
    "node_id",
    "data_topic",
    "response_topic",
    "timestamp_tolerance",
    "replay_cache_size",
    "max_payload_bytes",
    "service_identities",
    "backend_url",
    "backend_ca_file",
    "workers",
    "backend_pipeline",
    "spool_path",
    "spool_max_bytes",
    "http_timeout_ms",
    "rate_limit",
    "rate_burst",
    "crl_file",
    "metrics_listen",
    "sys_interval",
];

/// A topic pattern with exactly one `+` level standing for the device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<String>,
    device_level: usize,
}

impl TopicPattern {
    pub fn parse(s: &str) -> Option<TopicPattern> {
        let levels: Vec<String> = s.split('/').map(str::to_owned).collect();
        let plus: Vec<usize> =
            levels.iter().enumerate().filter(|(_, l)| *l == "+").map(|(i, _)| i).collect();
        let bad_level = levels.iter().any(|l| l != "+" && (l.contains(['+', '#', '\0'])));
        if plus.len() != 1 || bad_level || s.starts_with('$') {
            return None;
        }
        Some(TopicPattern { levels, device_level: plus[0] })
    }

    /// The device level of `topic`, if `topic` has this pattern's shape.
    pub fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut found = None;
        let mut n = 0;
        let mut start = 0;
        // Split on the byte: `str::split('/')` sets up a char searcher, on every ACL check.
        for (i, part) in topic.as_bytes().split(|&b| b == b'/').enumerate() {
            let want = self.levels.get(i)?;
            if i == self.device_level {
                // Bounded by '/' (ASCII) or the ends: char boundaries, so this cannot fail.
                found = topic.get(start..start + part.len());
            } else if part != want.as_bytes() {
                return None;
            }
            start += part.len() + 1;
            n += 1;
        }
        if n == self.levels.len() {
            found
        } else {
            None
        }
    }

    /// The concrete topic for `device`.
    pub fn topic_for(&self, device: &str) -> String {
        let mut t = String::with_capacity(64);
        for (i, l) in self.levels.iter().enumerate() {
            if i > 0 {
                t.push('/');
            }
            t.push_str(if i == self.device_level { device } else { l });
        }
        t
    }

    /// Is `topic` exactly the topic of `device`? (No allocation: on the ACL hot path.)
    pub fn is_topic_of(&self, topic: &str, device: &str) -> bool {
        self.device_of(topic) == Some(device)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.levels.join("/"))
    }
}

/// Where and how accepted messages are forwarded; `None` in [`Config::backend`] turns forwarding off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub url_template: String,
    pub ca_file: Option<PathBuf>,
    pub workers: usize,
    pub http_timeout: Duration,
    /// Most requests a worker sends back to back on its connection before reading the answers
    /// (1: one at a time). Plain `http://` backends outside cluster mode only.
    pub pipeline: usize,
}

/// Where the device registry lives: exactly one of `db_path` and `registry_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrySource {
    /// The embedded default: a SQLite file.
    Sqlite(PathBuf),
    /// A cluster's shared registry: a `postgresql://` (or `postgres://`) connection URL.
    Postgres(String),
}

impl fmt::Display for RegistrySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistrySource::Sqlite(p) => write!(f, "{}", p.display()),
            RegistrySource::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

/// A URL with its password (if any) replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (auth, host) = match rest.split_once('@') {
        Some((a, h)) if !a.contains('/') => (a, h),
        _ => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Cluster mode: replay state and sessions shared through Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// This node's name in the cluster (default: the host name).
    pub node_id: String,
}

/// The validated plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub registry: RegistrySource,
    pub data_topic: TopicPattern,
    pub response_topic: TopicPattern,
    pub timestamp_tolerance: i64,
    pub replay_cache_size: usize,
    pub max_payload_bytes: usize,
    pub service_identities: Vec<String>,
    pub backend: Option<BackendConfig>,
    pub spool_path: PathBuf,
    pub spool_max_bytes: u64,
    /// Per-device token bucket (off by default).
    pub rate_limit: Option<RateLimit>,
    /// A PEM CRL reloaded on change; clients whose certificate it revokes are disconnected.
    pub crl_file: Option<PathBuf>,
    /// Where the Prometheus exporter listens (None: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds between `$SYS` publications (0: off).
    pub sys_interval: u64,
    /// Cluster mode (None: a single node).
    pub cluster: Option<ClusterConfig>,
}

/// `rate_limit` messages per second per device, with bursts of up to `burst` messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// A configuration problem, naming the option and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub value: Option<String>,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "plugin_opt_{} {:?}: {}", self.key, v, self.problem),
            None => write!(f, "plugin_opt_{}: {}", self.key, self.problem),
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, value: Option<&str>, problem: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), value: value.map(Into::into), problem: problem.into() }
}

fn number<T: std::str::FromStr + PartialOrd + fmt::Display>(
    key: &str,
    v: &str,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let n: T = v.parse().map_err(|_| err(key, Some(v), "not a whole number"))?;
    if n < min || n > max {
        return Err(err(key, Some(v), format!("must be between {min} and {max}")));
    }
    Ok(n)
}

/// What is wrong with a backend URL template (Display: the problem, for an error line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadUrl {
    Scheme,
    NoHost,
    Whitespace,
    Placeholder,
    Invalid(String),
}

impl fmt::Display for BadUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadUrl::Scheme => f.write_str("must start with http:// or https://"),
            BadUrl::NoHost => f.write_str("has no host"),
            BadUrl::Whitespace => f.write_str("contains whitespace or control characters"),
            BadUrl::Placeholder => f.write_str("the only placeholder allowed is {device_id}"),
            BadUrl::Invalid(why) => write!(f, "is not a valid URL ({why})"),
        }
    }
}

impl std::error::Error for BadUrl {}

/// Checks a backend URL template: http or https, a host, and `{device_id}` as the only placeholder.
pub fn check_backend_url(v: &str) -> Result<(), BadUrl> {
    let rest =
        v.strip_prefix("http://").or_else(|| v.strip_prefix("https://")).ok_or(BadUrl::Scheme)?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains('{') {
        return Err(BadUrl::NoHost);
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(BadUrl::Whitespace);
    }
    let stripped = v.replace("{device_id}", "");
    if stripped.contains(['{', '}']) {
        return Err(BadUrl::Placeholder);
    }
    let probe = v.replace("{device_id}", "x");
    probe.parse::<ureq::http::Uri>().map_err(|e| BadUrl::Invalid(e.to_string()))?;
    Ok(())
}

/// `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT` (no name lookup at start-up); port 0 is refused
/// because the operator could not know where to scrape.
pub fn parse_listen(v: &str) -> Option<SocketAddr> {
    let addr = match v.strip_prefix("localhost:") {
        Some(port) => SocketAddr::from((Ipv4Addr::LOCALHOST, port.parse::<u16>().ok()?)),
        None => v.parse().ok()?,
    };
    (addr.port() != 0).then_some(addr)
}

/// The host name, if it is a valid node id.
fn default_node_id() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    crate::envelope::valid_device_id(name).then(|| name.to_string())
}

impl Config {
    /// Builds the configuration from the broker's `(key, value)` option pairs.
    pub fn from_opts<'a>(
        opts: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Config, ConfigError> {
        let mut seen: Vec<&str> = Vec::new();
        let mut db_path = None;
        let mut registry_url = None;
        let mut cluster_url = None;
        let mut node_id = None;
        let mut data_topic = TopicPattern::parse(DEFAULT_DATA_TOPIC).expect("default is valid");
        let mut response_topic =
            TopicPattern::parse(DEFAULT_RESPONSE_TOPIC).expect("default is valid");
        let mut tolerance = DEFAULT_TOLERANCE_S;
        let mut replay_cache_size = DEFAULT_REPLAY_CACHE_SIZE;
        let mut max_payload_bytes = DEFAULT_MAX_PAYLOAD_BYTES;
        let mut service_identities = Vec::new();
        let mut backend_url = Some(DEFAULT_BACKEND_URL.to_string());
        let mut ca_file = None;
        let mut workers = DEFAULT_WORKERS;
        let mut pipeline = DEFAULT_BACKEND_PIPELINE;
        let mut spool_path = PathBuf::from(DEFAULT_SPOOL_PATH);
        let mut spool_max_bytes = DEFAULT_SPOOL_MAX_BYTES;
        let mut http_timeout_ms = DEFAULT_HTTP_TIMEOUT_MS;
        let mut rate_limit: Option<f64> = None;
        let mut rate_burst: Option<u32> = None;
        let mut crl_file = None;
        let mut metrics_listen = None;
        let mut sys_interval = DEFAULT_SYS_INTERVAL_S;

        for (key, raw) in opts {
            // Mosquitto keeps trailing blanks in option values; they are never meaningful here.
            let v = raw.trim();
            if !KEYS.contains(&key) {
                return Err(err(
                    key,
                    Some(raw),
                    format!("unknown option (known: {})", KEYS.join(", ")),
                ));
            }
            if seen.contains(&key) {
                return Err(err(key, Some(raw), "given more than once"));
            }
            seen.push(key);
            if v.is_empty() {
                return Err(err(key, Some(raw), "is empty"));
            }
            match key {
                "db_path" => db_path = Some(PathBuf::from(v)),
                "registry_url" => {
                    if !(v.starts_with("postgresql://") || v.starts_with("postgres://")) {
                        return Err(err(
                            key,
                            Some(&redact_url(v)),
                            "must start with postgresql:// (or postgres://)",
                        ));
                    }
                    registry_url = Some(v.to_string());
                }
                "cluster_url" => {
                    if !(v.starts_with("redis://") || v.starts_with("rediss://")) {
                        return Err(err(
                            key,
                            Some(&redact_url(v)),
                            "must start with redis:// or rediss://",
                        ));
                    }
                    cluster_url = Some(v.to_string());
                }
                "node_id" => {
                    if !crate::envelope::valid_device_id(v) {
                        return Err(err(
                            key,
                            Some(v),
                            "must be 1-64 of A-Z a-z 0-9 _ . - (the device-id grammar)",
                        ));
                    }
                    node_id = Some(v.to_string());
                }
                "data_topic" | "response_topic" => {
                    let p = TopicPattern::parse(v).ok_or_else(|| {
                        err(
                            key,
                            Some(v),
                            "must have exactly one '+' level for the device id, and no '#'",
                        )
                    })?;
                    if key == "data_topic" {
                        data_topic = p;
                    } else {
                        response_topic = p;
                    }
                }
                "timestamp_tolerance" => {
                    let n: i64 = v.parse().map_err(|_| err(key, Some(v), "not a whole number"))?;
                    if n <= 0 {
                        return Err(err(key, Some(v), "must be a positive number of seconds"));
                    }
                    if n > 7 * 86400 {
                        return Err(err(key, Some(v), "must be at most 604800 (7 days)"));
                    }
                    tolerance = n;
                }
                "replay_cache_size" => replay_cache_size = number(key, v, 1, 10_000_000)?,
                "max_payload_bytes" => max_payload_bytes = number(key, v, 64, MAX_PAYLOAD_LIMIT)?,
                "service_identities" => {
                    service_identities = v
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect();
                    if service_identities.is_empty() {
                        return Err(err(key, Some(v), "lists no identity"));
                    }
                }
                "backend_url" => {
                    if v == "none" {
                        backend_url = None;
                    } else {
                        check_backend_url(v).map_err(|p| err(key, Some(v), p.to_string()))?;
                        backend_url = Some(v.to_string());
                    }
                }
                "backend_ca_file" => {
                    let p = PathBuf::from(v);
                    std::fs::read(&p)
                        .map_err(|e| err(key, Some(v), format!("cannot be read ({e})")))?;
                    ca_file = Some(p);
                }
                "workers" => workers = number(key, v, 1, 256)?,
                "backend_pipeline" => pipeline = number(key, v, 1, 64)?,
                "spool_path" => spool_path = PathBuf::from(v),
                "spool_max_bytes" => spool_max_bytes = number(key, v, 1 << 20, u64::MAX)?,
                "http_timeout_ms" => http_timeout_ms = number(key, v, 100, 600_000)?,
                "rate_limit" => {
                    let n: f64 = v.parse().map_err(|_| err(key, Some(v), "not a number"))?;
                    if !(n.is_finite() && (0.001..=1_000_000.0).contains(&n)) {
                        return Err(err(
                            key,
                            Some(v),
                            "must be between 0.001 and 1000000 messages per second",
                        ));
                    }
                    rate_limit = Some(n);
                }
                "rate_burst" => rate_burst = Some(number(key, v, 1, 1_000_000)?),
                "crl_file" => {
                    let p = PathBuf::from(v);
                    crate::crl::load(&p).map_err(|e| err(key, Some(v), e.to_string()))?;
                    crl_file = Some(p);
                }
                "metrics_listen" => {
                    metrics_listen = if v == "none" {
                        None
                    } else {
                        Some(parse_listen(v).ok_or_else(|| {
                            err(key, Some(v), "must be IP:PORT, [IPv6]:PORT or localhost:PORT with a port from 1 to 65535 (or none)")
                        })?)
                    }
                }
                "sys_interval" => sys_interval = number(key, v, 0, 86_400)?,
                _ => unreachable!("every key in KEYS is handled"),
            }
        }
        let registry = match (db_path, registry_url) {
            (Some(p), None) => RegistrySource::Sqlite(p),
            (None, Some(u)) => RegistrySource::Postgres(u),
            (None, None) => return Err(err(
                "db_path",
                None,
                "is required (the SQLite device registry, e.g. /var/lib/secure-iot-gateway/devices.db), or plugin_opt_registry_url for a shared PostgreSQL registry",
            )),
            (Some(_), Some(u)) => {
                return Err(err(
                    "registry_url",
                    Some(&redact_url(&u)),
                    "cannot be given with plugin_opt_db_path: the registry is either SQLite or PostgreSQL",
                ))
            }
        };
        let cluster = match (cluster_url, node_id) {
            (Some(url), node_id) => {
                let node_id = match node_id {
                    Some(n) => n,
                    None => default_node_id().ok_or_else(|| {
                        err("node_id", None, "is required: the host name is not a valid node id (1-64 of A-Z a-z 0-9 _ . -)")
                    })?,
                };
                Some(ClusterConfig { url, node_id })
            }
            (None, Some(n)) => {
                return Err(err("node_id", Some(&n), "needs plugin_opt_cluster_url"));
            }
            (None, None) => None,
        };
        if data_topic == response_topic {
            return Err(err(
                "response_topic",
                Some(&response_topic.to_string()),
                "must differ from data_topic",
            ));
        }
        if let Some(bad) = service_identities.iter().find(|s| !crate::envelope::valid_device_id(s))
        {
            return Err(err(
                "service_identities",
                Some(bad),
                "is not a valid identity (the device-id grammar: 1-64 of A-Z a-z 0-9 _ . -)",
            ));
        }
        let rate_limit = match (rate_limit, rate_burst) {
            (Some(per_second), burst) => Some(RateLimit {
                per_second,
                // By default a device may send one second's worth at once.
                burst: burst.unwrap_or_else(|| per_second.ceil().max(1.0) as u32),
            }),
            (None, Some(b)) => {
                return Err(err("rate_burst", Some(&b.to_string()), "needs plugin_opt_rate_limit"))
            }
            (None, None) => None,
        };
        let backend = backend_url.map(|url_template| BackendConfig {
            url_template,
            ca_file,
            workers,
            http_timeout: Duration::from_millis(http_timeout_ms),
            pipeline,
        });
        Ok(Config {
            registry,
            data_topic,
            response_topic,
            timestamp_tolerance: tolerance,
            replay_cache_size,
            max_payload_bytes,
            service_identities,
            backend,
            spool_path,
            spool_max_bytes,
            rate_limit,
            crl_file,
            metrics_listen,
            sys_interval,
            cluster,
        })
    }

    /// Is `identity` a named service (not a device)?
    pub fn is_service(&self, identity: &str) -> bool {
        self.service_identities.iter().any(|s| s == identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_opts(pairs.iter().copied())
    }

    fn with_db(extra: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let mut v = vec![("db_path", "/tmp/devices.db")];
        v.extend_from_slice(extra);
        parse(&v)
    }

    #[test]
    fn config_minimal_uses_documented_defaults() {
        let c = with_db(&[]).unwrap();
        assert_eq!(c.data_topic.to_string(), "device/+/data");
        assert_eq!(c.response_topic.to_string(), "device/+/response");
        assert_eq!(c.timestamp_tolerance, 300);
        assert_eq!(c.replay_cache_size, 1000);
        assert_eq!(c.max_payload_bytes, 65536);
        assert!(c.service_identities.is_empty());
        let b = c.backend.unwrap();
        assert_eq!(b.url_template, DEFAULT_BACKEND_URL);
        assert_eq!(b.workers, 4);
        assert_eq!(b.http_timeout, Duration::from_millis(5000));
        assert_eq!(b.pipeline, 8);
        assert_eq!(c.spool_max_bytes, 1 << 30);
        assert_eq!(c.rate_limit, None);
    }

    #[test]
    fn rate_limit_and_burst() {
        let c = with_db(&[("rate_limit", "2.5")]).unwrap();
        assert_eq!(c.rate_limit, Some(RateLimit { per_second: 2.5, burst: 3 }));
        let c = with_db(&[("rate_limit", "0.5"), ("rate_burst", "10")]).unwrap();
        assert_eq!(c.rate_limit, Some(RateLimit { per_second: 0.5, burst: 10 }));
        for bad in ["0", "-1", "NaN", "inf", "fast", "2000000"] {
            let e = with_db(&[("rate_limit", bad)]).unwrap_err();
            assert_eq!((e.key.as_str(), e.value.as_deref()), ("rate_limit", Some(bad)));
        }
        let e = with_db(&[("rate_burst", "5")]).unwrap_err();
        assert_eq!(e.key, "rate_burst");
        assert!(e.to_string().contains("needs plugin_opt_rate_limit"), "{e}");
        assert_eq!(
            with_db(&[("rate_limit", "1"), ("rate_burst", "0")]).unwrap_err().key,
            "rate_burst"
        );
    }

    #[test]
    fn config_missing_db_path_names_the_key() {
        let e = parse(&[]).unwrap_err();
        assert_eq!(e.key, "db_path");
        assert!(e.to_string().contains("plugin_opt_db_path"));
    }

    #[test]
    fn the_registry_is_sqlite_or_postgresql_never_both() {
        assert_eq!(
            with_db(&[]).unwrap().registry,
            RegistrySource::Sqlite("/tmp/devices.db".into())
        );
        let url = "postgresql://gw:s3cret@db.example/iot";
        let c = parse(&[("registry_url", url)]).unwrap();
        assert_eq!(c.registry, RegistrySource::Postgres(url.into()));
        // The password never reaches a log line.
        assert_eq!(c.registry.to_string(), "postgresql://gw:***@db.example/iot");
        let e = with_db(&[("registry_url", url)]).unwrap_err();
        assert_eq!(e.key, "registry_url");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = parse(&[("registry_url", "mysql://x/y")]).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_deref()), ("registry_url", Some("mysql://x/y")));
    }

    #[test]
    fn cluster_mode_needs_a_redis_url_and_a_valid_node_id() {
        assert_eq!(with_db(&[]).unwrap().cluster, None);
        let c =
            with_db(&[("cluster_url", "redis://127.0.0.1:6379/0"), ("node_id", "node-a")]).unwrap();
        assert_eq!(
            c.cluster,
            Some(ClusterConfig {
                url: "redis://127.0.0.1:6379/0".into(),
                node_id: "node-a".into()
            })
        );
        // Without node_id the host name is used (when it is a valid id, as on this machine).
        if let Some(host) = default_node_id() {
            let c = with_db(&[("cluster_url", "redis://127.0.0.1")]).unwrap();
            assert_eq!(c.cluster.unwrap().node_id, host);
        }
        let e = with_db(&[("cluster_url", "http://127.0.0.1")]).unwrap_err();
        assert_eq!(e.key, "cluster_url");
        let e = with_db(&[("cluster_url", "redis://x"), ("node_id", "a b")]).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_deref()), ("node_id", Some("a b")));
        let e = with_db(&[("node_id", "a")]).unwrap_err();
        assert!(e.to_string().contains("needs plugin_opt_cluster_url"), "{e}");
    }

    #[test]
    fn config_unknown_key_names_key_and_value() {
        let e = with_db(&[("timestamp_tolerence", "300")]).unwrap_err();
        assert_eq!(e.key, "timestamp_tolerence");
        assert!(e.to_string().contains("\"300\""), "{e}");
        assert!(e.to_string().contains("unknown option"));
    }

    #[test]
    fn config_duplicate_key_is_rejected() {
        let e = with_db(&[("workers", "2"), ("workers", "3")]).unwrap_err();
        assert_eq!(e.key, "workers");
    }

    #[test]
    fn config_non_number_tolerance_is_rejected() {
        let e = with_db(&[("timestamp_tolerance", "5m")]).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_deref()), ("timestamp_tolerance", Some("5m")));
    }

    #[test]
    fn config_zero_tolerance_is_rejected() {
        assert_eq!(
            with_db(&[("timestamp_tolerance", "0")]).unwrap_err().key,
            "timestamp_tolerance"
        );
    }

    #[test]
    fn config_negative_tolerance_is_rejected() {
        assert_eq!(
            with_db(&[("timestamp_tolerance", "-1")]).unwrap_err().key,
            "timestamp_tolerance"
        );
    }

    #[test]
    fn config_zero_replay_cache_is_rejected() {
        assert_eq!(with_db(&[("replay_cache_size", "0")]).unwrap_err().key, "replay_cache_size");
    }

    #[test]
    fn config_oversized_payload_limit_is_rejected() {
        assert_eq!(
            with_db(&[("max_payload_bytes", "999999999")]).unwrap_err().key,
            "max_payload_bytes"
        );
    }

    #[test]
    fn config_trailing_blanks_are_ignored() {
        assert_eq!(with_db(&[("timestamp_tolerance", "60  ")]).unwrap().timestamp_tolerance, 60);
    }

    #[test]
    fn config_empty_value_is_rejected() {
        assert_eq!(with_db(&[("data_topic", "  ")]).unwrap_err().key, "data_topic");
    }

    #[test]
    fn config_topic_needs_exactly_one_plus() {
        for bad in ["device/data", "device/+/+/data", "device/#", "a/b+/+", "$SYS/+/x"] {
            assert_eq!(with_db(&[("data_topic", bad)]).unwrap_err().key, "data_topic", "{bad}");
        }
        let c = with_db(&[("data_topic", "fleet/+/up")]).unwrap();
        assert_eq!(c.data_topic.topic_for("d1"), "fleet/d1/up");
    }

    #[test]
    fn config_same_data_and_response_topic_is_rejected() {
        let e = with_db(&[("response_topic", "device/+/data")]).unwrap_err();
        assert_eq!(e.key, "response_topic");
    }

    #[test]
    fn config_service_identities_are_split_and_trimmed() {
        let c = with_db(&[("service_identities", "dashboard, backend-svc ,")]).unwrap();
        assert_eq!(c.service_identities, ["dashboard", "backend-svc"]);
        assert!(c.is_service("dashboard"));
        assert!(!c.is_service("sensor_001"));
    }

    #[test]
    fn config_backend_url_must_be_http_or_https() {
        for bad in
            ["ftp://x/y", "localhost:5000", "http:///path", "http://h/{device}", "http://h/a b"]
        {
            assert_eq!(with_db(&[("backend_url", bad)]).unwrap_err().key, "backend_url", "{bad}");
        }
        assert!(with_db(&[("backend_url", "https://api.example.com/in/{device_id}")]).is_ok());
    }

    #[test]
    fn config_backend_url_none_turns_forwarding_off() {
        assert!(with_db(&[("backend_url", "none")]).unwrap().backend.is_none());
    }

    #[test]
    fn config_workers_out_of_range_is_rejected() {
        assert_eq!(with_db(&[("workers", "0")]).unwrap_err().key, "workers");
        assert_eq!(with_db(&[("workers", "1000")]).unwrap_err().key, "workers");
    }

    #[test]
    fn config_unreadable_ca_file_is_rejected() {
        let e = with_db(&[("backend_ca_file", "/nonexistent/ca.pem")]).unwrap_err();
        assert_eq!(e.key, "backend_ca_file");
    }

    #[test]
    fn config_tiny_spool_is_rejected() {
        assert_eq!(with_db(&[("spool_max_bytes", "1000")]).unwrap_err().key, "spool_max_bytes");
    }

    #[test]
    fn every_option_is_documented_in_the_example_configuration() {
        let example = include_str!("../mosquitto.conf.example");
        let lines: Vec<&str> = example.lines().map(|l| l.trim_start_matches('#')).collect();
        for key in KEYS {
            let set = format!("plugin_opt_{key} ");
            assert!(lines.iter().any(|l| l.starts_with(&set)), "{key} is not in the example");
        }
        // The positive control: a key that is not an option is not found either.
        assert!(!lines.iter().any(|l| l.starts_with("plugin_opt_no_such_key ")));
    }

    #[test]
    fn config_backend_pipeline_is_1_to_64() {
        assert_eq!(with_db(&[("backend_pipeline", "1")]).unwrap().backend.unwrap().pipeline, 1);
        assert_eq!(with_db(&[("backend_pipeline", "64")]).unwrap().backend.unwrap().pipeline, 64);
        for bad in ["0", "65", "-1", "eight", ""] {
            let e = with_db(&[("backend_pipeline", bad)]).unwrap_err();
            assert_eq!((e.key.as_str(), e.value.as_deref()), ("backend_pipeline", Some(bad)));
        }
    }

    #[test]
    fn config_http_timeout_out_of_range_is_rejected() {
        assert_eq!(with_db(&[("http_timeout_ms", "5")]).unwrap_err().key, "http_timeout_ms");
    }

    #[test]
    fn topic_pattern_matching() {
        let p = TopicPattern::parse("device/+/data").unwrap();
        assert_eq!(p.device_of("device/s1/data"), Some("s1"));
        assert_eq!(p.device_of("device/s1/data/x"), None);
        assert_eq!(p.device_of("device/s1"), None);
        assert_eq!(p.device_of("devices/s1/data"), None);
        assert_eq!(p.device_of("device//data"), Some(""));
        assert!(p.is_topic_of("device/s1/data", "s1"));
        assert!(!p.is_topic_of("device/s2/data", "s1"));
        assert_eq!(p.device_of("device/s1/data/"), None);
        assert_eq!(p.device_of("/device/s1/data"), None);
        // Multi-byte levels on either side of the device's.
        let p = TopicPattern::parse("pré/+/données").unwrap();
        assert_eq!(p.device_of("pré/é/données"), Some("é"));
        assert_eq!(p.device_of("pre/é/données"), None);
        let p = TopicPattern::parse("+/up").unwrap();
        assert_eq!(p.device_of("ü/up"), Some("ü"));
        assert_eq!(p.device_of("/up"), Some(""));
        assert_eq!(p.device_of("ü/up/"), None);
    }

    #[test]
    fn config_metrics_listen_and_sys_interval() {
        let c = with_db(&[]).unwrap();
        assert_eq!(
            (c.metrics_listen, c.sys_interval),
            (None, 10),
            "off by default; Mosquitto's 10 s"
        );
        let c = with_db(&[("metrics_listen", "127.0.0.1:9234"), ("sys_interval", "0")]).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9234".parse().unwrap()));
        assert_eq!(c.sys_interval, 0);
        assert_eq!(
            with_db(&[("metrics_listen", "localhost:9")]).unwrap().metrics_listen,
            Some("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(
            with_db(&[("metrics_listen", "[::1]:9")]).unwrap().metrics_listen,
            Some("[::1]:9".parse().unwrap())
        );
        for bad in
            ["9234", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "example.com:80", "1.2.3:4"]
        {
            let e = with_db(&[("metrics_listen", bad)]).unwrap_err();
            assert_eq!((e.key.as_str(), e.value.as_deref()), ("metrics_listen", Some(bad)));
        }
        assert_eq!(with_db(&[("sys_interval", "-1")]).unwrap_err().key, "sys_interval");
    }
}

//! What the core needs from the broker, as a trait: the plugin shim implements it with the
//! broker API, tests with a recording fake. A leaf module, so every part can name a log level
//! without depending on the gateway.

/// Log levels the host understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Notice,
    Warning,
    Error,
}

/// The broker, as seen from the core; called only on the broker thread.
pub trait Host {
    fn log(&mut self, level: Level, msg: &str);
    /// Publishes `payload` on `topic` (QoS 1, not retained). false if the broker refused.
    fn publish(&mut self, topic: &str, payload: &[u8]) -> bool;
    /// Closes every connection of the client with this username (no will). Called only from the
    /// tick, never while the broker is handling one of that client's packets.
    fn kick(&mut self, username: &str);
}

/// A line for the broker log produced off the broker thread (workers, watchers), logged when
/// the broker thread drains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
}

/// Makes attacker-controlled text safe for one log line: at most 128 characters, control
/// characters and quotes escaped.
pub fn printable(s: &str) -> String {
    let cut: String = s.chars().take(128).collect();
    let q = format!("{cut:?}");
    q[1..q.len() - 1].to_string()
}

/// Current Unix time in seconds.
/// Microseconds since the epoch (0 if the clock is before it).
pub fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the epoch (0 if the clock is before it).
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

//! One builder for the plugin's options, whether they go to `Config::from_opts` (unit tests,
//! benches) or into `mosquitto.conf` as `plugin_opt_*` lines (the real broker).

use std::fmt::Display;

/// Ordered `plugin_opt_*` settings; setting a key again replaces its value in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginOpts {
    pairs: Vec<(String, String)>,
}

impl PluginOpts {
    pub fn new() -> PluginOpts {
        PluginOpts::default()
    }

    /// `key` without the `plugin_opt_` prefix, e.g. `set("http_timeout_ms", 1000)`.
    pub fn set(mut self, key: &str, value: impl Display) -> PluginOpts {
        let value = value.to_string();
        match self.pairs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.pairs.push((key.to_string(), value)),
        }
        self
    }

    /// Without `key` (e.g. `db_path` for a broker whose registry is in PostgreSQL).
    pub fn unset(mut self, key: &str) -> PluginOpts {
        self.pairs.retain(|(k, _)| k != key);
        self
    }

    /// Every setting of `other` applied over these.
    pub fn with(mut self, other: &PluginOpts) -> PluginOpts {
        for (k, v) in &other.pairs {
            self = self.set(k, v);
        }
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The settings as owned pairs (std types only, so a unit test's copy of the core takes them).
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.pairs.clone()
    }

    /// Borrowed pairs, the shape `Config::from_opts` takes.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `plugin_opt_KEY VALUE` lines for `mosquitto.conf`.
    pub fn conf_lines(&self) -> String {
        self.pairs.iter().map(|(k, v)| format!("plugin_opt_{k} {v}\n")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_in_place_and_both_renderings_agree() {
        let o = PluginOpts::new().set("a", 1).set("b", "x y").set("a", 2);
        assert_eq!(o.pairs(), vec![("a".into(), "2".into()), ("b".into(), "x y".into())]);
        assert_eq!(o.conf_lines(), "plugin_opt_a 2\nplugin_opt_b x y\n");
        assert_eq!(o.iter().collect::<Vec<_>>(), vec![("a", "2"), ("b", "x y")]);
        let over = PluginOpts::new().set("b", "z").set("c", 3);
        assert_eq!(o.with(&over).conf_lines(), "plugin_opt_a 2\nplugin_opt_b z\nplugin_opt_c 3\n");
        assert_eq!(over.get("c"), Some("3"));
        assert_eq!(over.get("a"), None);
    }

    #[test]
    fn the_core_accepts_the_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("devices.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(secure_iot_gateway::registry::BASE_SCHEMA).unwrap();
        let o = PluginOpts::new()
            .set("db_path", db.display())
            .set("spool_path", dir.path().join("outbox").display())
            .set("backend_url", "none");
        assert!(secure_iot_gateway::config::Config::from_opts(o.iter()).is_ok());
        // Negative control: the same builder carries a bad value through to the parser.
        let bad = o.set("timestamp_tolerance", "five");
        assert!(secure_iot_gateway::config::Config::from_opts(bad.iter()).is_err());
    }
}

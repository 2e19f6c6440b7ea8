//! `iotgw check-config FILE`: validates this plugin's options in a mosquitto.conf without
//! starting the broker, the same way the plugin does at start-up.

use rusqlite::OptionalExtension;
use secure_iot_gateway::config::{Config, RegistrySource};
use secure_iot_gateway::registry::{pg, Registry};
use std::path::{Path, PathBuf};

/// The plugin path and its `plugin_opt_*` pairs, for the last plugin line that loads this plugin.
pub fn plugin_options(conf: &str) -> Result<(PathBuf, Vec<(String, String)>), String> {
    let mut current: Option<(PathBuf, Vec<(String, String)>)> = None;
    let mut ours = None;
    for (n, raw) in conf.lines().enumerate() {
        let line = raw.trim_start();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let value = value.trim_start();
        if key == "plugin" || key == "auth_plugin" {
            if let Some(c) = current.take() {
                if is_ours(&c.0) {
                    ours = Some(c);
                }
            }
            current = Some((PathBuf::from(value.trim()), Vec::new()));
        } else if let Some(k) =
            key.strip_prefix("plugin_opt_").or_else(|| key.strip_prefix("auth_opt_"))
        {
            match current.as_mut() {
                Some(c) => c.1.push((k.to_string(), value.to_string())),
                None => return Err(format!("line {}: {key} before any plugin line", n + 1)),
            }
        }
    }
    if let Some(c) = current.take() {
        if is_ours(&c.0) {
            ours = Some(c);
        }
    }
    ours.ok_or_else(|| "no `plugin` line loads secure_iot_gateway".to_string())
}

fn is_ours(p: &Path) -> bool {
    p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.contains("secure_iot_gateway"))
}

/// The value of the last global `key` line of a mosquitto.conf (`None` if absent).
pub fn directive(conf: &str, key: &str) -> Option<String> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (k == key).then(|| v.trim().to_string())
        })
        .next_back()
}

/// `plugin_opt_service_identities` of this plugin, split as the plugin splits it.
pub fn service_identities(conf: &str) -> Vec<String> {
    plugin_options(conf)
        .map(|(_, pairs)| pairs)
        .unwrap_or_default()
        .into_iter()
        .rfind(|(k, _)| k == "service_identities")
        .map(|(_, v)| {
            v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
        })
        .unwrap_or_default()
}

/// A configuration that works but is known to hurt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigWarning {
    /// Without `set_tcp_nodelay true`, a response to a device waits ~40 ms for a delayed ACK.
    NoTcpNodelay,
    /// `max_queued_messages 0` on Mosquitto 2.0.11: the broker disconnects every publisher
    /// whose message is refused, plugin or not.
    MaxQueuedZero { version: String },
    /// `per_listener_settings true`: the plugin and acl_file apply per listener, not globally.
    PerListenerSettings,
    /// `plugin_opt_service_identities` without `acl_file`: Mosquitto denies what every
    /// callback defers, so those identities can do nothing.
    ServicesWithoutAcl,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigWarning::NoTcpNodelay => f.write_str(
                "no `set_tcp_nodelay true`: each response to a device waits ~40 ms for a delayed ACK",
            ),
            ConfigWarning::MaxQueuedZero { version } => write!(
                f,
                "`max_queued_messages 0` on Mosquitto {version}: the broker disconnects every \
                 publisher whose message is refused (plugin or not); remove the line or set a \
                 limit above 0"
            ),
            ConfigWarning::PerListenerSettings => f.write_str(
                "`per_listener_settings true`: plugins and acl_file then apply per listener; \
                 this gateway expects `per_listener_settings false`",
            ),
            ConfigWarning::ServicesWithoutAcl => f.write_str(
                "`plugin_opt_service_identities` without `acl_file`: the plugin defers service \
                 identities to the ACL and Mosquitto denies whatever every check defers, so they \
                 can do nothing",
            ),
        }
    }
}

/// The version `mosquitto -h` reports (`$MOSQUITTO_BIN`, else /usr/sbin/mosquitto, else PATH).
pub fn mosquitto_version() -> Option<String> {
    let bin = std::env::var("MOSQUITTO_BIN").ok().unwrap_or_else(|| {
        if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto".into()
        } else {
            "mosquitto".into()
        }
    });
    let out = std::process::Command::new(bin).arg("-h").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("mosquitto version "))
        .map(|v| v.trim().to_string())
}

/// The warnings for a configuration's text, given the broker's version (None: unknown, in which
/// case version-specific hazards are reported as possible).
pub fn warnings(conf: &str, version: Option<&str>) -> Vec<ConfigWarning> {
    let mut out = Vec::new();
    if directive(conf, "set_tcp_nodelay").as_deref() != Some("true") {
        out.push(ConfigWarning::NoTcpNodelay);
    }
    if directive(conf, "max_queued_messages").as_deref() == Some("0")
        && version.is_none_or(|v| v == "2.0.11")
    {
        out.push(ConfigWarning::MaxQueuedZero {
            version: version.unwrap_or("2.0.11 (version unknown here)").to_string(),
        });
    }
    if directive(conf, "per_listener_settings").as_deref() == Some("true") {
        out.push(ConfigWarning::PerListenerSettings);
    }
    if !service_identities(conf).is_empty() && directive(conf, "acl_file").is_none() {
        out.push(ConfigWarning::ServicesWithoutAcl);
    }
    out
}

/// What `check-config` found: a one-line summary and the warnings.
#[derive(Debug, Clone)]
pub struct Report {
    pub summary: String,
    pub warnings: Vec<ConfigWarning>,
}

/// Checks everything init would check, and that no registered device is named like a service
/// identity (it would get the ACL's grants for that identity; the plugin refuses to start).
pub fn check(conf_path: &Path) -> Result<Report, String> {
    let text = std::fs::read_to_string(conf_path)
        .map_err(|e| format!("cannot read {}: {e}", conf_path.display()))?;
    let (plugin, pairs) = plugin_options(&text)?;
    if !plugin.exists() {
        return Err(format!("plugin {}: no such file", plugin.display()));
    }
    let cfg = Config::from_opts(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| e.to_string())?;
    let devices = match &cfg.registry {
        RegistrySource::Sqlite(db_path) => check_sqlite(&cfg, db_path)?,
        RegistrySource::Postgres(url) => check_postgres(&cfg, url)?,
    };
    Ok(Report {
        summary: format!(
            "OK: plugin {}, {} devices, data topic {}, backend {}",
            plugin.display(),
            devices,
            cfg.data_topic,
            cfg.backend.as_ref().map_or("none".to_string(), |b| b.url_template.clone())
        ),
        warnings: warnings(&text, mosquitto_version().as_deref()),
    })
}

/// The named-like-a-service check in the SQLite registry; returns the number of devices.
fn check_sqlite(cfg: &Config, db_path: &Path) -> Result<usize, String> {
    let reg = Registry::open(db_path).map_err(|e| {
        format!(
            "plugin_opt_db_path {:?}: cannot open the device registry: {e}",
            db_path.display().to_string()
        )
    })?;
    let conn = rusqlite::Connection::open_with_flags(
        db_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot read the device registry: {e}"))?;
    for s in &cfg.service_identities {
        let found: Option<i64> = conn
            .query_row("SELECT 1 FROM devices WHERE device_id = ?1", [s], |r| r.get(0))
            .optional()
            .map_err(|e| format!("cannot read the device registry: {e}"))?;
        if found.is_some() {
            return Err(service_named(s, &db_path.display().to_string()));
        }
    }
    Ok(reg.len())
}

/// The same in PostgreSQL (read as the plugin reads it), and whether the NOTIFY trigger is
/// there: without it, changes reach the brokers only at their periodic reload.
fn check_postgres(cfg: &Config, url: &str) -> Result<usize, String> {
    let name = secure_iot_gateway::config::redact_url(url);
    let snap = pg::load_once(url).map_err(|e| {
        format!("plugin_opt_registry_url {name:?}: cannot read the device registry: {e}")
    })?;
    let mut c = pg::connect(url, std::time::Duration::from_secs(10))
        .map_err(|e| format!("plugin_opt_registry_url {name:?}: {e}"))?;
    for s in &cfg.service_identities {
        let found = c
            .query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[s])
            .map_err(|e| format!("cannot read the device registry {name}: {e}"))?;
        if found.is_some() {
            return Err(service_named(s, &name));
        }
    }
    let ready = pg::schema_ready(&mut c).map_err(|e| format!("{name}: {e}"))?;
    if !ready {
        return Err(format!(
            "plugin_opt_registry_url {name:?}: the devices table has no NOTIFY trigger (or lacks \
             the optional columns), so brokers would see changes only every 30 s; run \
             `iotgw registry init --registry-url ...`"
        ));
    }
    Ok(snap.devices.len())
}

fn service_named(s: &str, registry: &str) -> String {
    format!(
        "device {s:?} in the registry {registry} is named like a service identity \
         (plugin_opt_service_identities): it would get that identity's ACL grants; \
         remove the device (iotgw device remove {s}) or the identity"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_attach_to_the_most_recent_plugin_line() {
        let conf = "listener 1883\nplugin /x/other.so\nplugin_opt_a 1\nplugin /usr/lib/secure_iot_gateway.so\nplugin_opt_db_path /d.db\nplugin_opt_workers  2 \n";
        let (p, o) = plugin_options(conf).unwrap();
        assert_eq!(p, PathBuf::from("/usr/lib/secure_iot_gateway.so"));
        assert_eq!(o, vec![("db_path".into(), "/d.db".into()), ("workers".into(), "2 ".into())]);
        assert!(plugin_options("plugin_opt_x 1\n").is_err());
        assert!(plugin_options("plugin /x/other.so\n").is_err());
    }

    const CLEAN: &str = "per_listener_settings false\nset_tcp_nodelay true\nacl_file /a\n\
        plugin /x/secure_iot_gateway.so\nplugin_opt_service_identities dashboard, ops\n";

    #[test]
    fn each_hazard_is_one_warning_and_a_clean_config_has_none() {
        assert_eq!(warnings(CLEAN, Some("2.0.11")), vec![]);
        assert_eq!(service_identities(CLEAN), ["dashboard", "ops"]);
        let nodelay = CLEAN.replace("set_tcp_nodelay true", "set_tcp_nodelay false");
        assert_eq!(warnings(&nodelay, None), vec![ConfigWarning::NoTcpNodelay]);
        let no_line = CLEAN.replace("set_tcp_nodelay true\n", "");
        assert_eq!(warnings(&no_line, None), vec![ConfigWarning::NoTcpNodelay]);
        let mq = format!("{CLEAN}max_queued_messages 0\n");
        let w = vec![ConfigWarning::MaxQueuedZero { version: "2.0.11".into() }];
        assert_eq!(warnings(&mq, Some("2.0.11")), w);
        assert_eq!(warnings(&mq, Some("2.0.18")), vec![], "only 2.0.11 disconnects");
        assert_eq!(warnings(&format!("{CLEAN}max_queued_messages 100\n"), Some("2.0.11")), vec![]);
        let pls = CLEAN.replace("per_listener_settings false", "per_listener_settings true");
        assert_eq!(warnings(&pls, None), vec![ConfigWarning::PerListenerSettings]);
        let noacl = CLEAN.replace("acl_file /a\n", "");
        assert_eq!(warnings(&noacl, None), vec![ConfigWarning::ServicesWithoutAcl]);
        let neither = noacl.replace("plugin_opt_service_identities dashboard, ops\n", "");
        assert_eq!(warnings(&neither, None), vec![]);
        // A commented-out line is not a setting.
        assert_eq!(
            warnings(&CLEAN.replace("set_tcp", "#set_tcp"), None),
            vec![ConfigWarning::NoTcpNodelay]
        );
    }
}

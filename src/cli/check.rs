//! `iotgw check-config FILE`: validates this plugin's options in a mosquitto.conf without
//! starting the broker, the same way the plugin does at start-up.

use crate::config::Config;
use crate::registry::Registry;
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

/// Checks everything init would check; returns a one-line summary.
pub fn check(conf_path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(conf_path)
        .map_err(|e| format!("cannot read {}: {e}", conf_path.display()))?;
    let (plugin, pairs) = plugin_options(&text)?;
    if !plugin.exists() {
        return Err(format!("plugin {}: no such file", plugin.display()));
    }
    let cfg = Config::from_opts(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| e.to_string())?;
    let reg = Registry::open(&cfg.db_path).map_err(|e| {
        format!(
            "plugin_opt_db_path {:?}: cannot open the device registry: {e}",
            cfg.db_path.display().to_string()
        )
    })?;
    let mut summary = format!(
        "OK: plugin {}, {} devices, data topic {}, backend {}",
        plugin.display(),
        reg.len(),
        cfg.data_topic,
        cfg.backend.as_ref().map_or("none".to_string(), |b| b.url_template.clone())
    );
    let bin = std::env::var("MOSQUITTO_BIN").unwrap_or_else(|_| "/usr/sbin/mosquitto".into());
    if let Some(w) = queue_warning(&text, broker_version(&bin)) {
        summary.push_str("\nwarning: ");
        summary.push_str(&w);
    }
    Ok(summary)
}

/// `(major, minor)` from `mosquitto -h`'s first line ("mosquitto version 2.0.11").
fn broker_version(bin: &str) -> Option<(u32, u32)> {
    let out = std::process::Command::new(bin).arg("-h").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.lines().next()?.strip_prefix("mosquitto version ")?;
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Mosquitto 2.0.x with `max_queued_messages 0` disconnects every client whose publish is
/// refused (by this plugin or an acl_file), so a device with one bad message loses its
/// connection. 2.1 does not. Warns when the broker is 2.0 or its version is unknown.
fn queue_warning(conf: &str, version: Option<(u32, u32)>) -> Option<String> {
    let zero = conf.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("max_queued_messages") && w.next() == Some("0")
    });
    match version {
        _ if !zero => None,
        Some((2, 0)) => Some(
            "max_queued_messages 0: Mosquitto 2.0 disconnects every client whose publish is refused; leave it at its default (1000)".into(),
        ),
        Some(_) => None,
        None => Some(
            "max_queued_messages 0: if the broker is Mosquitto 2.0, it disconnects every client whose publish is refused; leave it at its default (1000)".into(),
        ),
    }
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

    #[test]
    fn max_queued_messages_0_is_flagged_on_2_0_only() {
        let conf = "listener 1883\nmax_queued_messages 0\n";
        assert!(queue_warning(conf, Some((2, 0))).is_some_and(|w| w.contains("2.0 disconnects")));
        assert!(queue_warning(conf, None).is_some());
        assert_eq!(queue_warning(conf, Some((2, 1))), None);
        assert_eq!(queue_warning("max_queued_messages 10\n", Some((2, 0))), None);
        assert_eq!(queue_warning("#max_queued_messages 0\n", Some((2, 0))), None);
    }

    #[test]
    fn the_system_broker_reports_its_version() {
        // Debian 12's mosquitto (installed by `make deps`) says "mosquitto version 2.0.11".
        assert_eq!(broker_version("/usr/sbin/mosquitto"), Some((2, 0)));
        assert_eq!(broker_version("/nonexistent/mosquitto"), None);
    }
}

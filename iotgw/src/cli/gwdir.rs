//! A gateway directory made by `iotgw init`: PKI, registry, state, broker configuration.
//!
//! ```text
//! DIR/ca.pem ca.key            the CA (key 0600, never readable by the broker)
//! DIR/broker.pem broker.key    the broker's TLS identity (key 0600, owned by the broker user)
//! DIR/devices.db               the registry (0600, owned by the broker user: it holds secrets)
//! DIR/devices/ID.pem ID.key    each device's certificate and key (0600)
//! DIR/state/outbox/            the plugin's outbox log and replay state (dir 0700, broker user)
//! DIR/acl                      acl_file for service identities and certificate-less clients
//! DIR/mosquitto.conf           a complete mutual-TLS configuration with absolute paths
//! ```

use rusqlite::Connection;
use secure_iot_gateway::pki::{self, Issued, Role};
use secure_iot_gateway::registry;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The paths of a gateway directory.
#[derive(Debug, Clone)]
pub struct GwDir {
    pub root: PathBuf,
}

/// Options for `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub hosts: Vec<String>,
    pub port: u16,
    pub bind: String,
    pub plugin: PathBuf,
    pub backend_url: String,
    pub force: bool,
    pub days: u32,
}

pub type Result<T> = std::result::Result<T, String>;

impl GwDir {
    pub fn new(root: &Path) -> GwDir {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir().map(|d| d.join(root)).unwrap_or_else(|_| root.to_path_buf())
        };
        GwDir { root }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("devices.db")
    }
    pub fn conf(&self) -> PathBuf {
        self.root.join("mosquitto.conf")
    }
    pub fn device_cert(&self, id: &str) -> PathBuf {
        self.root.join("devices").join(format!("{id}.pem"))
    }
    pub fn device_key(&self, id: &str) -> PathBuf {
        self.root.join("devices").join(format!("{id}.key"))
    }

    /// Loads the CA, with an error that says what is wrong.
    pub fn load_ca(&self) -> Result<Issued> {
        let cert = fs::read(self.ca_cert()).map_err(|e| {
            format!("cannot read the CA certificate {}: {e}", self.ca_cert().display())
        })?;
        let key = fs::read(self.ca_key())
            .map_err(|e| format!("cannot read the CA key {}: {e}", self.ca_key().display()))?;
        Issued::from_pem(&cert, &key)
            .map_err(|e| format!("the CA in {} is unreadable: {e}", self.root.display()))
    }

    /// Opens the registry read-write, adding our optional columns if missing.
    pub fn open_db(&self) -> Result<Connection> {
        if !self.db().exists() {
            return Err(format!(
                "no device registry at {} (run `iotgw init {}` first)",
                self.db().display(),
                self.root.display()
            ));
        }
        let c = Connection::open(self.db())
            .map_err(|e| format!("cannot open {}: {e}", self.db().display()))?;
        c.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| e.to_string())?;
        registry::migrate(&c)
            .map_err(|e| format!("cannot migrate {}: {e}", self.db().display()))?;
        Ok(c)
    }

    /// Creates the whole directory. Refuses to overwrite an existing CA unless `force`.
    pub fn init(&self, o: &InitOptions) -> Result<Vec<String>> {
        if self.ca_cert().exists() && !o.force {
            return Err(format!("{} already has a CA; use --force to replace it (every issued certificate stops working)", self.root.display()));
        }
        fs::create_dir_all(self.root.join("devices"))
            .map_err(|e| format!("cannot create {}: {e}", self.root.display()))?;
        fs::create_dir_all(self.root.join("state")).map_err(|e| e.to_string())?;
        let mut notes = Vec::new();
        let ca = pki::new_ca("secure-iot-gateway CA", o.days.max(1)).map_err(|e| e.to_string())?;
        write(&self.ca_cert(), &ca.cert_pem(), 0o644)?;
        write(&self.ca_key(), &ca.key_pem(), 0o600)?;
        let mut hosts: Vec<&str> = vec!["localhost", "127.0.0.1"];
        hosts.extend(o.hosts.iter().map(String::as_str));
        let broker = pki::issue(
            &ca,
            hosts.first().copied().unwrap_or("localhost"),
            Role::Server,
            &hosts,
            o.days.max(1),
        )
        .map_err(|e| e.to_string())?;
        write(&self.root.join("broker.pem"), &broker.cert_pem(), 0o644)?;
        write(&self.root.join("broker.key"), &broker.key_pem(), 0o600)?;
        if self.db().exists() {
            notes.push(format!("kept the existing registry {}", self.db().display()));
            registry::migrate(&Connection::open(self.db()).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        } else {
            let c = Connection::open(self.db()).map_err(|e| e.to_string())?;
            registry::create(&c).map_err(|e| e.to_string())?;
        }
        set_mode(&self.db(), 0o600)?;
        write(&self.root.join("acl"), ACL.as_bytes(), 0o644)?;
        write(&self.conf(), self.render_conf(o).as_bytes(), 0o644)?;
        fs::set_permissions(self.root.join("state"), fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        // The broker reads these after dropping to the `mosquitto` user (when started as root).
        if let Some(note) = give_to_broker_user(&[
            self.root.join("broker.key"),
            self.root.join("broker.pem"),
            self.db(),
            self.root.join("state"),
        ]) {
            notes.push(note);
        }
        Ok(notes)
    }

    fn render_conf(&self, o: &InitOptions) -> String {
        let r = |p: &str| self.root.join(p).display().to_string();
        format!(
            "# Generated by `iotgw init` for secure-iot-gateway. See mosquitto.conf.example for every option.\n\
             per_listener_settings false\n\
             # Responses to devices are small writes: do not hold them back (Nagle) behind an unacked PUBACK.\n\
             set_tcp_nodelay true\n\
             persistence false\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\n\
             listener {port} {bind}\n\
             cafile {ca}\n\
             certfile {crt}\n\
             keyfile {key}\n\
             require_certificate true\n\
             use_identity_as_username true\n\
             acl_file {acl}\n\n\
             plugin {plugin}\n\
             plugin_opt_db_path {db}\n\
             plugin_opt_spool_path {spool}\n\
             plugin_opt_backend_url {backend}\n\
             plugin_opt_service_identities dashboard\n",
            port = o.port,
            bind = o.bind,
            ca = r("ca.pem"),
            crt = r("broker.pem"),
            key = r("broker.key"),
            acl = r("acl"),
            plugin = o.plugin.display(),
            db = r("devices.db"),
            spool = r("state/outbox"),
            backend = o.backend_url,
        )
    }
}

const ACL: &str =
    "# Devices are decided by the secure-iot-gateway plugin. This file decides for service\n\
# identities (plugin_opt_service_identities) and clients without a certificate.\n\
user dashboard\ntopic read device/+/data\ntopic read device/+/response\n";

/// Writes a file with `mode`, creating or replacing it.
pub fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    fs::write(path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

/// When run as root, hands `paths` to the `mosquitto` user (the broker drops to it).
fn give_to_broker_user(paths: &[PathBuf]) -> Option<String> {
    if !is_root() {
        return None;
    }
    let out = std::process::Command::new("id").args(["-u", "mosquitto"]).output().ok()?;
    if !out.status.success() {
        return Some("no `mosquitto` user: files stay owned by root".into());
    }
    for p in paths {
        let _ = std::process::Command::new("chown").arg("mosquitto:mosquitto").arg(p).status();
    }
    Some("broker key, registry and state handed to the mosquitto user".into())
}

pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

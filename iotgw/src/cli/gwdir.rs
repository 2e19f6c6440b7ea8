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

use rusqlite::{Connection, OpenFlags};
use secure_iot_gateway::pki::{self, Issued, Role};
use secure_iot_gateway::registry;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The paths of a gateway directory.
#[derive(Debug, Clone)]
pub struct GwDir {
    pub root: PathBuf,
    /// `--registry-url`: the registry is this PostgreSQL database instead of `devices.db`
    /// (the CA and the certificates stay in `root`).
    pub registry_url: Option<String>,
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
        GwDir { root, registry_url: None }
    }

    /// The same directory with its registry in PostgreSQL at `url`.
    pub fn with_registry_url(mut self, url: Option<String>) -> GwDir {
        self.registry_url = url;
        self
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// The CRL `iotgw device revoke` maintains and the plugin watches (`plugin_opt_crl_file`).
    pub fn crl(&self) -> PathBuf {
        self.root.join("crl.pem")
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

    /// Opens the registry read-write, adding our optional columns if missing. Never through a
    /// symlink planted in the gateway directory.
    pub fn open_db(&self) -> Result<Connection> {
        let db = self.db();
        if refuse_symlink(&db)?.is_none() {
            return Err(format!(
                "no device registry at {} (run `iotgw init {}` first)",
                db.display(),
                self.root.display()
            ));
        }
        let c = self.connect_db()?;
        c.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| e.to_string())?;
        registry::migrate(&c).map_err(|e| format!("cannot migrate {}: {e}", db.display()))?;
        Ok(c)
    }

    /// The registry and SQLite's files beside it, none of which may be a symlink.
    fn connect_db(&self) -> Result<Connection> {
        let db = self.db();
        for side in ["-journal", "-wal", "-shm"] {
            let mut p = db.clone().into_os_string();
            p.push(side);
            refuse_symlink(Path::new(&p))?;
        }
        Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(|e| format!("cannot open {}: {e}", db.display()))
    }

    /// The service identities the gateway's mosquitto.conf gives the plugin
    /// (`plugin_opt_service_identities`, split like the plugin splits it). Fails closed: a
    /// configuration that cannot be read is an error, not an empty list.
    pub fn service_identities(&self) -> Result<Vec<String>> {
        let text = fs::read_to_string(self.conf()).map_err(|e| {
            format!("cannot read {} to check the service identities: {e}", self.conf().display())
        })?;
        Ok(super::check::service_identities(&text))
    }

    /// The user the broker reads the registry as: the configuration's `user`, else `mosquitto`
    /// when this runs as root (the broker started as root drops to it), else whoever runs this
    /// (a broker started by a normal user stays that user). None: that user does not exist.
    pub fn broker_user(&self) -> Option<BrokerUser> {
        let conf = fs::read_to_string(self.conf()).unwrap_or_default();
        let configured = super::check::directive(&conf, "user");
        let name = match configured {
            Some(u) => u,
            None if is_root() => "mosquitto".to_string(),
            None => return BrokerUser::current(),
        };
        BrokerUser::lookup(&name)
    }

    /// Refuses a registry change that the running broker could not see: the registry (and every
    /// directory above it) must be readable by the broker's user. Checked before any change, so
    /// a refusal changes nothing.
    pub fn check_broker_can_read(&self) -> Result<()> {
        // A PostgreSQL registry is no file of ours: the database grants access.
        if self.registry_url.is_some() {
            return Ok(());
        }
        let Some(user) = self.broker_user() else { return Ok(()) };
        if user.uid == 0 {
            return Ok(());
        }
        let db = self.db();
        let m = fs::metadata(&db).map_err(|e| format!("cannot inspect {}: {e}", db.display()))?;
        let mut problem = None;
        if !user.may(&m, 4) {
            problem = Some(format!(
                "cannot read {} (owner uid {}, gid {}, mode {:04o})",
                db.display(),
                m.uid(),
                m.gid(),
                m.mode() & 0o7777
            ));
        }
        for dir in db.ancestors().skip(1) {
            if problem.is_some() {
                break;
            }
            if let Ok(d) = fs::metadata(dir) {
                if !user.may(&d, 1) {
                    problem = Some(format!(
                        "cannot enter {} (owner uid {}, gid {}, mode {:04o})",
                        dir.display(),
                        d.uid(),
                        d.gid(),
                        d.mode() & 0o7777
                    ));
                }
            }
        }
        match problem {
            None => Ok(()),
            Some(p) => Err(format!(
                "the broker runs as `{}` (uid {}), which {p}: the running broker would not see \
                 this change, so nothing was changed. Give the registry back to the broker's \
                 user (e.g. chown {}: {}) and run the command again",
                user.name,
                user.uid,
                user.name,
                db.display()
            )),
        }
    }

    /// Creates the whole directory. Refuses to overwrite an existing CA unless `force`. Never
    /// follows a symlink inside the directory (a planted `broker.key -> /elsewhere` or
    /// `state -> /elsewhere` is an error, and the link's target is left untouched): files are
    /// written to a new temporary file (O_EXCL, O_NOFOLLOW) renamed into place, and modes and
    /// owners are set on opened descriptors.
    pub fn init(&self, o: &InitOptions) -> Result<Vec<String>> {
        if refuse_symlink(&self.ca_cert())?.is_some() && !o.force {
            return Err(format!("{} already has a CA; use --force to replace it (every issued certificate stops working)", self.root.display()));
        }
        fs::create_dir_all(&self.root)
            .map_err(|e| format!("cannot create {}: {e}", self.root.display()))?;
        // Everything is checked before anything is written.
        let files = [
            "ca.pem",
            "ca.key",
            "broker.pem",
            "broker.key",
            "acl",
            "crl.pem",
            "mosquitto.conf",
            "devices.db",
            "devices.db-journal",
            "devices.db-wal",
            "devices.db-shm",
        ];
        for f in files {
            if let Some(m) = refuse_symlink(&self.root.join(f))? {
                if !m.is_file() {
                    return Err(format!(
                        "{} exists and is not a file",
                        self.root.join(f).display()
                    ));
                }
            }
        }
        for d in ["devices", "state"] {
            if let Some(m) = refuse_symlink(&self.root.join(d))? {
                if !m.is_dir() {
                    return Err(format!(
                        "{} exists and is not a directory",
                        self.root.join(d).display()
                    ));
                }
            }
        }
        ensure_dir(&self.root.join("devices"), 0o755)?;
        let state = ensure_dir(&self.root.join("state"), 0o700)?;
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
        let broker_pem = write(&self.root.join("broker.pem"), &broker.cert_pem(), 0o644)?;
        let broker_key = write(&self.root.join("broker.key"), &broker.key_pem(), 0o600)?;
        let db = match refuse_symlink(&self.db())? {
            Some(_) => {
                notes.push(format!("kept the existing registry {}", self.db().display()));
                let c = self.connect_db()?;
                registry::migrate(&c).map_err(|e| e.to_string())?;
                open_nofollow(&self.db())?
            }
            None => {
                // Created here, exclusively, so that SQLite only ever opens our own file.
                let f = create_new(&self.db(), 0o600)?;
                let c = self.connect_db()?;
                registry::create(&c).map_err(|e| e.to_string())?;
                f
            }
        };
        db.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod {}: {e}", self.db().display()))?;
        // Not world-readable, and the broker's: Mosquitto 2.0.21 warns about both and says later
        // versions will refuse such an acl_file.
        let acl = write(&self.root.join("acl"), ACL.as_bytes(), 0o640)?;
        // An empty CRL the plugin watches: `iotgw device revoke` adds to it, live.
        let crl = pki::crl(&ca, &[], CRL_DAYS).map_err(|e| e.to_string())?;
        write(&self.crl(), &crl, 0o644)?;
        write(&self.conf(), self.render_conf(o).as_bytes(), 0o644)?;
        // The broker reads these after dropping to the `mosquitto` user (when started as root).
        if let Some(note) = give_to_broker_user(&[
            (&broker_key, self.root.join("broker.key")),
            (&broker_pem, self.root.join("broker.pem")),
            (&db, self.db()),
            (&acl, self.root.join("acl")),
            (&state, self.root.join("state")),
        ])? {
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
             plugin_opt_crl_file {crl}\n\
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
            crl = r("crl.pem"),
            backend = o.backend_url,
        )
    }
}

/// How long a CRL written here is valid (its nextUpdate); `iotgw device revoke` renews it.
pub const CRL_DAYS: u32 = 3650;

const ACL: &str =
    "# Devices are decided by the secure-iot-gateway plugin. This file decides for service\n\
# identities (plugin_opt_service_identities) and clients without a certificate.\n\
user dashboard\ntopic read device/+/data\ntopic read device/+/response\n";

/// The user a broker runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

fn id_of(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("id").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl BrokerUser {
    pub fn lookup(name: &str) -> Option<BrokerUser> {
        let uid = id_of(&["-u", name])?.parse().ok()?;
        let gid = id_of(&["-g", name])?.parse().ok()?;
        let groups = id_of(&["-G", name])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect();
        Some(BrokerUser { name: name.to_string(), uid, gid, groups })
    }

    fn current() -> Option<BrokerUser> {
        let name = id_of(&["-un"])?;
        BrokerUser::lookup(&name)
    }

    /// May this user do `bits` (4 read, 1 search) on a file with this metadata?
    fn may(&self, m: &fs::Metadata, bits: u32) -> bool {
        let mode = m.mode();
        if m.uid() == self.uid {
            mode & (bits << 6) != 0
        } else if m.gid() == self.gid || self.groups.contains(&m.gid()) {
            mode & (bits << 3) != 0
        } else {
            mode & bits != 0
        }
    }
}

/// `Ok(None)` if `path` does not exist, its metadata if it does, and an error if it is a
/// symbolic link: nothing inside a gateway directory is ever reached through one.
pub fn refuse_symlink(path: &Path) -> Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "refusing to use {}: it is a symbolic link (to {}); iotgw never writes through links \
             in the gateway directory. Remove it and run the command again",
            path.display(),
            fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default()
        )),
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
    }
}

/// Opens an existing file or directory without following a symlink (and without blocking on a
/// planted FIFO), for fchmod/fchown.
fn open_nofollow(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {} (without following links): {e}", path.display()))
}

/// Creates a new file exclusively (O_CREAT|O_EXCL, which never follows a symlink), mode exact.
fn create_new(path: &Path, mode: u32) -> Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    // The umask may have narrowed `mode`; set it exactly, on the descriptor.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    Ok(f)
}

/// Makes `path` a directory with exactly `mode` unless it is one; never through a symlink.
/// Returns it opened (for fchown).
pub fn ensure_dir(path: &Path, mode: u32) -> Result<File> {
    match refuse_symlink(path)? {
        Some(m) if !m.is_dir() => {
            return Err(format!("{} exists and is not a directory", path.display()))
        }
        Some(_) => {}
        None => match fs::DirBuilder::new().mode(mode).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        },
    }
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open {} (without following links): {e}", path.display()))?;
    d.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    Ok(d)
}

/// Writes a file with `mode`, creating or replacing it: the data goes to a new temporary file
/// beside it (exclusive, no-follow) that is renamed over `path`. A symlink at `path` is refused
/// (rename would only replace the link, but a planted link means someone is at work). Returns
/// the new file, open.
pub fn write(path: &Path, data: &[u8], mode: u32) -> Result<File> {
    if let Some(m) = refuse_symlink(path)? {
        if !m.is_file() {
            return Err(format!("{} exists and is not a file", path.display()));
        }
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut rnd = [0u8; 6];
    openssl::rand::rand_bytes(&mut rnd).map_err(|e| e.to_string())?;
    let tmp =
        path.with_file_name(format!(".{name}.{}.tmp", secure_iot_gateway::envelope::hex(&rnd)));
    let mut f = create_new(&tmp, mode)?;
    let done = f
        .write_all(data)
        .and_then(|_| f.sync_all())
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()));
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done.map(|_| f)
}

/// When run as root, hands these (already opened, no-follow) to the `mosquitto` user, with
/// fchown on the descriptors: a link swapped in after the checks is never followed.
fn give_to_broker_user(items: &[(&File, PathBuf)]) -> Result<Option<String>> {
    if !is_root() {
        return Ok(None);
    }
    let Some(user) = BrokerUser::lookup("mosquitto") else {
        return Ok(Some("no `mosquitto` user: files stay owned by root".into()));
    };
    for (f, p) in items {
        std::os::unix::fs::fchown(f, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("cannot hand {} to the mosquitto user: {e}", p.display()))?;
    }
    Ok(Some("broker key, registry and state handed to the mosquitto user".into()))
}

pub fn is_root() -> bool {
    id_of(&["-u"]).is_some_and(|u| u == "0")
}

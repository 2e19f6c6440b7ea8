//! Live certificate revocation (`plugin_opt_crl_file`). Mosquitto reads its own `crlfile` only
//! at start; this CRL is reloaded whenever the file changes, and a client whose certificate
//! serial it lists is refused and disconnected without a broker restart.
//!
//! The file is trusted configuration (like Mosquitto's `crlfile`): its signature is not checked
//! here, so it must be writable only by the operator. `iotgw device revoke` writes it, signed by
//! the gateway's CA, for brokers and tools that do check.

use crate::background::Background;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, SystemTime};

/// How often the watcher looks at the file.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The serial numbers a CRL revokes (big-endian magnitude bytes, as OpenSSL's BIGNUM prints).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revoked(HashSet<Vec<u8>>);

impl Revoked {
    pub fn contains(&self, serial: &[u8]) -> bool {
        self.0.contains(serial)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The revoked serials, in no particular order.
    pub fn serials(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.0.iter()
    }
}

/// Why a CRL file could not be used.
#[derive(Debug)]
pub enum CrlError {
    Read(PathBuf, std::io::Error),
    /// Not one or more PEM CRLs.
    Parse(PathBuf, openssl::error::ErrorStack),
    Empty(PathBuf),
}

impl fmt::Display for CrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrlError::Read(p, e) => write!(f, "{}: cannot be read ({e})", p.display()),
            CrlError::Parse(p, e) => write!(f, "{}: not a PEM CRL ({e})", p.display()),
            CrlError::Empty(p) => write!(f, "{}: holds no CRL", p.display()),
        }
    }
}

impl std::error::Error for CrlError {}

const BEGIN: &[u8] = b"-----BEGIN X509 CRL-----";

/// Reads every CRL in a PEM file (a CA chain may have one each).
pub fn load(path: &Path) -> Result<Revoked, CrlError> {
    let pem = std::fs::read(path).map_err(|e| CrlError::Read(path.to_owned(), e))?;
    let starts: Vec<usize> =
        pem.windows(BEGIN.len()).enumerate().filter(|(_, w)| *w == BEGIN).map(|(i, _)| i).collect();
    if starts.is_empty() {
        return Err(CrlError::Empty(path.to_owned()));
    }
    let mut set = HashSet::new();
    for (n, start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(pem.len());
        let crl = openssl::x509::X509Crl::from_pem(&pem[*start..end])
            .map_err(|e| CrlError::Parse(path.to_owned(), e))?;
        for r in crl.get_revoked().into_iter().flatten() {
            let bn = r.serial_number().to_bn().map_err(|e| CrlError::Parse(path.to_owned(), e))?;
            set.insert(bn.to_vec());
        }
    }
    Ok(Revoked(set))
}

/// What the watcher hands the broker thread: a new CRL, or why a changed file was not used.
pub type Update = Result<Revoked, CrlError>;

/// Background poller of the CRL file (stopped and joined when dropped).
pub struct Watcher {
    _thread: Background,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino()))
}

impl Watcher {
    /// Watches `path` (already loaded once by the caller) and sends an [`Update`] per change.
    pub fn start(path: PathBuf) -> std::io::Result<(Watcher, Receiver<Update>)> {
        let (tx, rx): (Sender<Update>, Receiver<Update>) = std::sync::mpsc::channel();
        let thread = Background::spawn("iotgw-crl", move |stop| {
            let mut seen = stamp(&path);
            while !stop.is_set() {
                std::thread::park_timeout(POLL_INTERVAL);
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                if tx.send(load(&path)).is_err() {
                    break;
                }
            }
        })?;
        Ok((Watcher { _thread: thread }, rx))
    }
}

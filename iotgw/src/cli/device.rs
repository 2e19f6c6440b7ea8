//! `iotgw device ...`: the fleet registry. Every command validates all of its input before it
//! changes anything, and a failure leaves the registry and the certificate files as they were.

use super::gwdir::{self, GwDir, Result};
use super::store::Store;
use secure_iot_gateway::envelope::{hex, valid_device_id, MAX_DEVICE_ID_CHARS};
use secure_iot_gateway::host::unix_now;
use secure_iot_gateway::pki::{self, Role};
use std::fs;

/// A fresh random secret: 32 bytes, hex-encoded.
pub fn random_secret() -> String {
    let mut b = [0u8; 32];
    openssl::rand::rand_bytes(&mut b).expect("the OS random source is available");
    hex(&b)
}

fn check_id(id: &str) -> Result<()> {
    if valid_device_id(id) {
        Ok(())
    } else {
        Err(format!(
            "invalid device id {id:?}: use 1-{MAX_DEVICE_ID_CHARS} of A-Z a-z 0-9 _ . - (not . or ..)"
        ))
    }
}

/// A device named like a service identity would get what the ACL grants that identity (the
/// plugin defers service identities to acl_file), e.g. every device's traffic.
fn check_not_service(ids: &[String], id: &str) -> Result<()> {
    if ids.iter().any(|s| s == id) {
        return Err(format!(
            "{id:?} is a service identity of this gateway (plugin_opt_service_identities in \
             mosquitto.conf); a device cannot have that name"
        ));
    }
    Ok(())
}

fn check_secret(s: &str) -> Result<()> {
    if s.is_empty() {
        return Err("the secret is empty".into());
    }
    if s.len() < 16 {
        return Err(
            "the secret is shorter than 16 characters; use the default random secret".into()
        );
    }
    Ok(())
}

/// Issues and writes a device's certificate; returns the paths written.
fn issue_cert(dir: &GwDir, ca: &pki::Issued, id: &str, days: u32) -> Result<()> {
    let cert = pki::issue(ca, id, Role::Client, &[], days).map_err(|e| e.to_string())?;
    gwdir::ensure_dir(&dir.root.join("devices"), 0o755)?;
    gwdir::write(&dir.device_key(id), &cert.key_pem(), 0o600)?;
    gwdir::write(&dir.device_cert(id), &cert.cert_pem(), 0o644)?;
    Ok(())
}

fn remove_cert(dir: &GwDir, id: &str) {
    let _ = fs::remove_file(dir.device_cert(id));
    let _ = fs::remove_file(dir.device_key(id));
}

/// `device add`: registers `id`, issues its certificate, returns its secret (shown once).
pub fn add(dir: &GwDir, id: &str, secret: Option<&str>, days: u32) -> Result<String> {
    check_id(id)?;
    if let Some(s) = secret {
        check_secret(s)?;
    }
    check_not_service(&dir.service_identities()?, id)?;
    let mut c = Store::open(dir)?;
    dir.check_broker_can_read()?;
    if c.exists(id)? {
        return Err(format!("device {id:?} already exists"));
    }
    let ca = dir.load_ca()?;
    let secret = secret.map(str::to_owned).unwrap_or_else(random_secret);
    issue_cert(dir, &ca, id, days)?;
    if let Err(e) = c.insert(&[(id.to_owned(), secret.clone())], unix_now()) {
        remove_cert(dir, id);
        return Err(format!("cannot add {id:?}: {e}"));
    }
    Ok(secret)
}

/// One registry row, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: String,
    pub enabled: bool,
    pub created_at: i64,
    pub previous_until: Option<i64>,
    pub has_cert: bool,
}

fn info(dir: &GwDir, r: super::store::Row) -> DeviceInfo {
    DeviceInfo {
        has_cert: dir.device_cert(&r.id).exists(),
        id: r.id,
        enabled: r.enabled,
        created_at: r.created_at,
        previous_until: r.previous_until,
    }
}

pub fn list(dir: &GwDir) -> Result<Vec<DeviceInfo>> {
    Ok(Store::open(dir)?.list()?.into_iter().map(|r| info(dir, r)).collect())
}

/// `device show`: the row, and the secret only when asked.
pub fn show(dir: &GwDir, id: &str, with_secret: bool) -> Result<(DeviceInfo, Option<String>)> {
    check_id(id)?;
    let (row, secret) =
        Store::open(dir)?.get(id)?.ok_or_else(|| format!("no device {id:?} in the registry"))?;
    Ok((info(dir, row), with_secret.then_some(secret)))
}

/// The current secret of `id` (for `sign` and the simulator).
pub fn secret_of(dir: &GwDir, id: &str) -> Result<String> {
    Ok(show(dir, id, true)?.1.unwrap_or_default())
}

pub fn set_enabled(dir: &GwDir, id: &str, enabled: bool) -> Result<()> {
    check_id(id)?;
    let mut c = Store::open(dir)?;
    c.must_exist(id)?;
    dir.check_broker_can_read()?;
    c.set_enabled(id, enabled)
}

pub fn remove(dir: &GwDir, id: &str) -> Result<()> {
    check_id(id)?;
    let mut c = Store::open(dir)?;
    c.must_exist(id)?;
    dir.check_broker_can_read()?;
    c.remove(id)?;
    remove_cert(dir, id);
    Ok(())
}

/// `device revoke`: adds the device's certificate to the gateway's CRL (signed by its CA, written
/// atomically, so a running plugin with `plugin_opt_crl_file` disconnects it within a second)
/// and disables the device. Returns the revoked serial (hex) and how many the CRL now lists.
pub fn revoke(dir: &GwDir, id: &str) -> Result<(String, usize)> {
    check_id(id)?;
    let mut c = Store::open(dir)?;
    c.must_exist(id)?;
    dir.check_broker_can_read()?;
    let pem = fs::read(dir.device_cert(id)).map_err(|e| {
        format!("cannot read {} (the certificate to revoke): {e}", dir.device_cert(id).display())
    })?;
    let cert = openssl::x509::X509::from_pem(&pem)
        .map_err(|e| format!("{}: not a certificate ({e})", dir.device_cert(id).display()))?;
    let serial = pki::serial_of(&cert).map_err(|e| e.to_string())?;
    let ca = dir.load_ca()?;
    let mut serials: Vec<Vec<u8>> = match gwdir::refuse_symlink(&dir.crl())? {
        Some(_) => secure_iot_gateway::crl::load(&dir.crl())
            .map_err(|e| format!("the existing CRL cannot be extended: {e}"))?
            .serials()
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    if !serials.contains(&serial) {
        serials.push(serial.clone());
    }
    serials.sort();
    let crl = pki::crl(&ca, &serials, gwdir::CRL_DAYS).map_err(|e| e.to_string())?;
    gwdir::write(&dir.crl(), &crl, 0o644)?;
    c.set_enabled(id, false)?;
    Ok((hex(&serial), serials.len()))
}

/// `device rotate-secret`: a new current secret; the old one keeps working for `grace_s`.
pub fn rotate(
    dir: &GwDir,
    id: &str,
    new_secret: Option<&str>,
    grace_s: i64,
) -> Result<(String, i64)> {
    check_id(id)?;
    if let Some(s) = new_secret {
        check_secret(s)?;
    }
    if grace_s < 0 {
        return Err("the grace period cannot be negative".into());
    }
    let mut c = Store::open(dir)?;
    c.must_exist(id)?;
    dir.check_broker_can_read()?;
    let secret = new_secret.map(str::to_owned).unwrap_or_else(random_secret);
    let until = unix_now() + grace_s;
    c.rotate(id, until, &secret)?;
    Ok((secret, until))
}

/// `device import FILE`: lines of `device_id[,secret]` (blank lines and `#` comments ignored).
/// All or nothing: every line is checked before anything is written.
pub fn import(dir: &GwDir, text: &str, days: u32) -> Result<Vec<(String, String)>> {
    let mut wanted: Vec<(String, Option<String>)> = Vec::new();
    let services = dir.service_identities()?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, secret) = match line.split_once(',') {
            Some((i, s)) => (i.trim(), Some(s.trim().to_string())),
            None => (line, None),
        };
        check_id(id)
            .and_then(|_| check_not_service(&services, id))
            .map_err(|e| format!("line {}: {e}", n + 1))?;
        if let Some(s) = &secret {
            check_secret(s).map_err(|e| format!("line {}: {e}", n + 1))?;
        }
        if wanted.iter().any(|(w, _)| w == id) {
            return Err(format!("line {}: device {id:?} appears twice in the file", n + 1));
        }
        wanted.push((id.to_string(), secret));
    }
    if wanted.is_empty() {
        return Err("the file lists no device".into());
    }
    let mut c = Store::open(dir)?;
    dir.check_broker_can_read()?;
    for (id, _) in &wanted {
        if c.exists(id)? {
            return Err(format!("device {id:?} already exists; nothing was imported"));
        }
    }
    let ca = dir.load_ca()?;
    // Certificates first, then every row in one transaction: a failure anywhere removes the
    // certificates written and leaves the registry as it was.
    let mut done: Vec<(String, String)> = Vec::new();
    for (id, secret) in wanted {
        let secret = secret.unwrap_or_else(random_secret);
        if let Err(e) = issue_cert(dir, &ca, &id, days) {
            remove_cert(dir, &id);
            for (d, _) in &done {
                remove_cert(dir, d);
            }
            return Err(format!("cannot import {id:?}: {e}; nothing was imported"));
        }
        done.push((id, secret));
    }
    if let Err(e) = c.insert(&done, unix_now()) {
        for (d, _) in &done {
            remove_cert(dir, d);
        }
        return Err(format!("cannot import: {e}; nothing was imported"));
    }
    Ok(done)
}

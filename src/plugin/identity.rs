//! What a client's certificate says (CN, serial), read once per connection instead of on every
//! ACL check: the publisher's WRITE and each subscriber's READ used to parse the subject name
//! per message.
//!
//! Never trusting a stale entry: an entry is keyed by the client pointer, but it is used only
//! when the connection still presents the very same certificate object and username. The entry
//! holds a reference to that `X509`, so the object cannot be freed and its address cannot be
//! handed to another certificate while the entry exists; a reused client pointer (a new
//! connection) has another certificate object and simply replaces the entry. The check costs one
//! `SSL_get_peer_certificate` (a reference count, no parsing) and a short byte comparison.
//! `MOSQ_EVT_DISCONNECT` drops the entry, which bounds memory by the connected clients.

use super::sys;
use foreign_types::ForeignType;
use openssl::nid::Nid;
use openssl::x509::X509;
use std::cell::RefCell;
use std::rc::Rc;

/// What the gateway reads from a client's verified certificate.
pub struct ClientCert {
    /// The first CN (empty if none).
    pub cn: Box<[u8]>,
    /// The serial number (big-endian), when asked for.
    pub serial: Option<Box<[u8]>>,
    /// Who the connection is ([`crate::acl::classify`] with the entry's username), once asked.
    pub class: std::cell::Cell<Option<crate::acl::Class>>,
}

struct Entry {
    /// Our reference to the certificate the entry was read from (see the module comment).
    cert: X509,
    username: Box<[u8]>,
    with_serial: bool,
    info: Rc<ClientCert>,
}

/// Beyond this many entries (disconnects missed, which Mosquitto does not do) start afresh.
const MAX_ENTRIES: usize = 1 << 20;

/// Per-instance cache; broker thread only (not `Send`: holds `Rc`).
#[derive(Default)]
pub struct Identities {
    map: RefCell<crate::fasthash::Map<usize, Entry>>,
}

impl Identities {
    /// The client's certificate data, if it presented a certificate, and whether this is the
    /// first time this connection is seen (a new session).
    ///
    /// # Safety
    /// `client` is the valid client pointer of the current callback, on the broker thread.
    pub unsafe fn get(
        &self,
        client: *const sys::mosquitto,
        username: &[u8],
        with_serial: bool,
    ) -> Option<(Rc<ClientCert>, bool)> {
        // SAFETY: returns a new reference (or NULL) that we own and must free.
        let raw = unsafe { sys::mosquitto_client_certificate(client) };
        if raw.is_null() {
            return None;
        }
        // SAFETY: a valid X509* from the same libcrypto; X509 takes ownership and frees it on drop.
        let cert = unsafe { X509::from_ptr(raw as *mut openssl_sys::X509) };
        // No callback into the broker happens while the map is borrowed, so no re-entry.
        let mut map = self.map.borrow_mut();
        let key = client as usize;
        if let Some(e) = map.get(&key) {
            if e.cert.as_ptr() == cert.as_ptr()
                && *e.username == *username
                && (e.with_serial || !with_serial)
            {
                return Some((e.info.clone(), false));
            }
        }
        // Re-read for a serial on a connection already seen is not a new session.
        let new = map.get(&key).is_none_or(|e| e.cert.as_ptr() != cert.as_ptr());
        let info = Rc::new(read(&cert, with_serial));
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(key, Entry { cert, username: username.into(), with_serial, info: info.clone() });
        Some((info, new))
    }

    /// The connection of `client` ended.
    pub fn forget(&self, client: *const sys::mosquitto) {
        if let Ok(mut map) = self.map.try_borrow_mut() {
            map.remove(&(client as usize));
        }
    }
}

fn read(x509: &X509, with_serial: bool) -> ClientCert {
    let cn = x509.subject_name().entries_by_nid(Nid::COMMONNAME).next();
    let serial = if with_serial {
        // A serial that cannot be read is treated as an unknown one: the empty serial, which no
        // CRL lists, so only the rest of the policy applies.
        Some(x509.serial_number().to_bn().map(|b| b.to_vec()).unwrap_or_default().into())
    } else {
        None
    };
    ClientCert {
        cn: cn.map(|e| e.data().as_slice().into()).unwrap_or_default(),
        serial,
        class: Default::default(),
    }
}

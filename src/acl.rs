//! Who a client is and what it may read or subscribe to. Pure policy over the configuration:
//! safe to call re-entrantly (a broker log line sent to a topic triggers READ checks while the
//! gateway is logging), and shared by the validator (WRITE) and the shim (READ/SUBSCRIBE).

use crate::config::Config;

/// Who a client is, as far as this plugin is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// A client whose verified certificate CN is its username: a device, registered or not.
    Device(&'a str),
    /// A certificate holder named in `service_identities`.
    Service(&'a str),
    /// No certificate-backed identity (plain listener, or a TLS listener without
    /// `use_identity_as_username`). The broker's own acl_file decides for it.
    None,
    /// A certificate identity outside the device-id grammar (MQTT wildcards, `/`, not UTF-8,
    /// too long...): denied everything, whatever the broker would let through, since a
    /// device's topics are built from its identity.
    Invalid,
}

impl Identity<'_> {
    /// The name for a log line ("-" when there is none).
    pub fn name(&self) -> &str {
        match self {
            Identity::Device(d) | Identity::Service(d) => d,
            Identity::None => "-",
            Identity::Invalid => "(invalid identity)",
        }
    }
}

/// Classifies a client from its username and its certificate's first CN (None: no certificate).
pub fn identity<'a>(
    cfg: &Config,
    username: Option<&'a [u8]>,
    cert_cn: Option<&[u8]>,
) -> Identity<'a> {
    classify(cfg, username, cert_cn).of(username)
}

/// What [`identity`] decides, without the name: the shim keeps it with a connection's
/// certificate, so the grammar and the service list are not consulted on every ACL check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Device,
    Service,
    Invalid,
    None,
}

impl Class {
    /// The identity of a client of this class with this username (the one it was classified
    /// with).
    pub fn of(self, username: Option<&[u8]>) -> Identity<'_> {
        let name = || username.and_then(|u| std::str::from_utf8(u).ok());
        match (self, name()) {
            (Class::Device, Some(s)) => Identity::Device(s),
            (Class::Service, Some(s)) => Identity::Service(s),
            (Class::None, _) => Identity::None,
            _ => Identity::Invalid,
        }
    }
}

/// See [`identity`].
pub fn classify(cfg: &Config, username: Option<&[u8]>, cert_cn: Option<&[u8]>) -> Class {
    match (username, cert_cn) {
        (Some(u), Some(cn)) if u == cn => match std::str::from_utf8(u) {
            // Service names obey the same grammar (checked in the configuration).
            Ok(s) if cfg.is_service(s) => Class::Service,
            Ok(s) if crate::envelope::valid_device_id(s) => Class::Device,
            _ => Class::Invalid,
        },
        _ => Class::None,
    }
}

/// The plugin's answer to an ACL question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Not ours to decide: the broker's acl_file (or the next plugin) decides.
    Defer,
}

/// The kinds of ACL question besides WRITE (which the gateway answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Subscribe,
    Unsubscribe,
}

/// ACL READ / SUBSCRIBE / UNSUBSCRIBE: devices get exactly their own response topic; everyone
/// else is left to the broker's acl_file.
pub fn acl_verdict(cfg: &Config, who: Identity<'_>, access: Access, topic: &[u8]) -> Verdict {
    let dev = match who {
        Identity::Device(d) => d,
        Identity::Invalid => return Verdict::Deny,
        Identity::Service(_) | Identity::None => return Verdict::Defer,
    };
    if access == Access::Unsubscribe {
        return Verdict::Allow;
    }
    let own = !dev.is_empty()
        && std::str::from_utf8(topic).is_ok_and(|t| cfg.response_topic.is_topic_of(t, dev));
    if own {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

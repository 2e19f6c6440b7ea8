//! A small PKI for the gateway: a CA, a broker certificate and device certificates whose CN is
//! the device id. Keys are ECDSA P-256 (fast to make, supported by Mosquitto's OpenSSL and by
//! rustls clients). Used by `iotgw init` / `iotgw device add` and by the integration tests.

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Name, X509};

/// A certificate and its private key.
pub struct Issued {
    pub cert: X509,
    pub key: PKey<Private>,
}

impl Issued {
    pub fn cert_pem(&self) -> Vec<u8> {
        self.cert.to_pem().expect("encode certificate")
    }
    /// PKCS#8 PEM ("BEGIN PRIVATE KEY"), readable by OpenSSL and rustls alike.
    pub fn key_pem(&self) -> Vec<u8> {
        self.key.private_key_to_pem_pkcs8().expect("encode key")
    }
    /// Loads a certificate and key from PEM.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Issued, ErrorStack> {
        Ok(Issued { cert: X509::from_pem(cert)?, key: PKey::private_key_from_pem(key)? })
    }
}

fn new_key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn serial() -> Result<Asn1Integer, ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(127, openssl::bn::MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

fn name(cn: &str) -> Result<X509Name, ErrorStack> {
    let mut n = X509Name::builder()?;
    n.append_entry_by_nid(Nid::ORGANIZATIONNAME, "secure-iot-gateway")?;
    n.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    Ok(n.build())
}

/// A self-signed CA valid for `days`.
pub fn new_ca(cn: &str, days: u32) -> Result<Issued, ErrorStack> {
    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let sn = serial()?;
    b.set_serial_number(&sn)?;
    let n = name(cn)?;
    b.set_subject_name(&n)?;
    b.set_issuer_name(&n)?;
    b.set_pubkey(&key)?;
    let (from, until) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(days)?);
    b.set_not_before(&from)?;
    b.set_not_after(&until)?;
    b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build()?)?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(Issued { cert: b.build(), key })
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The broker: serverAuth, with subjectAltNames.
    Server,
    /// A device or service: clientAuth; the CN is its identity.
    Client,
}

/// Issues a leaf certificate signed by `ca`. `hosts` become DNS or IP subjectAltNames.
pub fn issue(
    ca: &Issued,
    cn: &str,
    role: Role,
    hosts: &[&str],
    days: u32,
) -> Result<Issued, ErrorStack> {
    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let sn = serial()?;
    b.set_serial_number(&sn)?;
    let subject = name(cn)?;
    b.set_subject_name(&subject)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    b.set_pubkey(&key)?;
    let (from, until) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(days)?);
    b.set_not_before(&from)?;
    b.set_not_after(&until)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    b.append_extension(KeyUsage::new().critical().digital_signature().key_agreement().build()?)?;
    let eku = match role {
        Role::Server => ExtendedKeyUsage::new().server_auth().build()?,
        Role::Client => ExtendedKeyUsage::new().client_auth().build()?,
    };
    b.append_extension(eku)?;
    if !hosts.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for h in hosts {
            if h.parse::<std::net::IpAddr>().is_ok() {
                san.ip(h);
            } else {
                san.dns(h);
            }
        }
        let ext = san.build(&b.x509v3_context(Some(&ca.cert), None))?;
        b.append_extension(ext)?;
    }
    let aki = AuthorityKeyIdentifier::new()
        .keyid(false)
        .build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(aki)?;
    b.sign(&ca.key, MessageDigest::sha256())?;
    Ok(Issued { cert: b.build(), key })
}

/// The first CN of a certificate, as Mosquitto's `use_identity_as_username` reads it.
#[cfg(test)]
fn common_name(cert: &X509) -> Option<String> {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| String::from_utf8(e.data().as_slice().to_vec()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_client_cert_verifies_against_its_ca_and_carries_the_cn() {
        let ca = new_ca("test ca", 10).unwrap();
        let dev = issue(&ca, "sensor_001", Role::Client, &[], 10).unwrap();
        assert!(dev.cert.verify(&ca.key).unwrap());
        assert_eq!(common_name(&dev.cert).as_deref(), Some("sensor_001"));
        let other = new_ca("other ca", 10).unwrap();
        assert!(!dev.cert.verify(&other.key).unwrap());
        let again = Issued::from_pem(&dev.cert_pem(), &dev.key_pem()).unwrap();
        assert_eq!(again.cert.to_der().unwrap(), dev.cert.to_der().unwrap());
    }

    #[test]
    fn server_cert_has_dns_and_ip_names() {
        let ca = new_ca("test ca", 10).unwrap();
        let s = issue(&ca, "broker", Role::Server, &["localhost", "127.0.0.1"], 10).unwrap();
        let names = s.cert.subject_alt_names().unwrap();
        assert_eq!(names.len(), 2);
        assert_eq!(names.get(0).unwrap().dnsname(), Some("localhost"));
        assert_eq!(names.get(1).unwrap().ipaddress(), Some(&[127, 0, 0, 1][..]));
    }
}

/// A CRL signed by `ca` that revokes `serials` (as [`serial_of`] gives them), valid for `days`.
pub fn crl(ca: &Issued, serials: &[Vec<u8>], days: u32) -> Result<Vec<u8>, ErrorStack> {
    use openssl::asn1::{Asn1Object, Asn1OctetString};
    use openssl::x509::{X509CrlBuilder, X509Extension, X509RevokedBuilder};
    let ext = |oid: &str, der: Vec<u8>| -> Result<X509Extension, ErrorStack> {
        let oid = Asn1Object::from_str(oid)?;
        let contents = Asn1OctetString::new_from_bytes(&der)?;
        X509Extension::new_from_der(&oid, false, &contents)
    };
    let mut b = X509CrlBuilder::new()?;
    // RFC 5280 requires both: the issuer's key id and a CRL number (here the issue time, so a
    // newer CRL always has a larger one).
    let keyid = ca.cert.subject_key_id().map(|k| k.as_slice().to_vec()).unwrap_or_default();
    let mut aki = vec![0x30, (keyid.len() + 2) as u8, 0x80, keyid.len() as u8];
    aki.extend_from_slice(&keyid);
    b.append_extension(ext("2.5.29.35", aki)?)?;
    let number = BigNum::from_u32(crate::host::unix_now().clamp(0, i64::from(u32::MAX)) as u32)?;
    let mut n = number.to_vec();
    if n.first().is_some_and(|b| b & 0x80 != 0) {
        n.insert(0, 0); // a positive INTEGER
    }
    let mut crl_number = vec![0x02, n.len() as u8];
    crl_number.extend_from_slice(&n);
    b.append_extension(ext("2.5.29.20", crl_number)?)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    let now = Asn1Time::days_from_now(0)?;
    b.set_last_update(&now)?;
    let next = Asn1Time::days_from_now(days)?;
    b.set_next_update(&next)?;
    for s in serials {
        let mut r = X509RevokedBuilder::new()?;
        let serial = BigNum::from_slice(s)?.to_asn1_integer()?;
        r.set_serial_number(&serial)?;
        r.set_revocation_date(&now)?;
        b.add_revoked(r.build())?;
    }
    b.sign(&ca.key, MessageDigest::sha256())?;
    b.build()?.to_pem()
}

/// A certificate's serial number as big-endian bytes (the form CRLs are matched on).
pub fn serial_of(cert: &X509) -> Result<Vec<u8>, ErrorStack> {
    Ok(cert.serial_number().to_bn()?.to_vec())
}

#[cfg(test)]
mod crl_tests {
    use super::*;

    #[test]
    fn a_crl_verifies_against_its_ca_and_lists_the_serials() {
        let ca = new_ca("test ca", 2).unwrap();
        let dev = issue(&ca, "sensor_001", Role::Client, &[], 2).unwrap();
        let s = serial_of(&dev.cert).unwrap();
        let pem = crl(&ca, std::slice::from_ref(&s), 30).unwrap();
        let parsed = openssl::x509::X509Crl::from_pem(&pem).unwrap();
        assert!(parsed.verify(&ca.cert.public_key().unwrap()).unwrap(), "signed by the CA");
        let other = new_ca("other ca", 2).unwrap();
        assert!(!parsed.verify(&other.cert.public_key().unwrap()).unwrap(), "not by another");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crl.pem");
        std::fs::write(&p, &pem).unwrap();
        let revoked = crate::crl::load(&p).unwrap();
        assert!(revoked.contains(&s));
        assert!(!revoked.contains(&serial_of(&ca.cert).unwrap()));
        assert_eq!(revoked.len(), 1);
    }
}

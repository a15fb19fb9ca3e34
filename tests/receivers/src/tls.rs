//! TLS for the receivers: a throwaway PKI made at test time (rcgen), and the server side of a
//! connection (tokio-rustls with ring, the provider the daemon uses too).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    },
    TlsAcceptor,
};

/// A certificate authority and a server certificate it signed for `localhost` and
/// `127.0.0.1`, in PEM. Made fresh, keys included, each time: no key is checked in, and a
/// client trusts the server only when told to trust this CA.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA's certificate: what a client must trust (`notifications.smtp_ca_file`).
    pub ca_pem: String,
    /// The server's certificate (the leaf alone: the CA is the trust anchor).
    pub cert_pem: String,
    /// The server's private key (PKCS#8).
    pub key_pem: String,
}

impl TestPki {
    /// A CA named `selfheal-receivers test CA` and a leaf for `localhost` and `127.0.0.1`.
    pub fn localhost() -> Result<Self, rcgen::Error> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "selfheal-receivers test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut leaf =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.use_authority_key_identifier_extension = true;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate()?;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            cert_pem: leaf_cert.pem(),
            key_pem: leaf_key.serialize_pem(),
        })
    }
}

fn invalid(what: &str, error: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {error}"))
}

/// The server side of TLS with `cert_pem` (the chain, leaf first) and `key_pem`: TLS 1.2 and
/// 1.3, ring, no client certificates.
pub(crate) fn acceptor(cert_pem: &str, key_pem: &str) -> std::io::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("the certificate PEM", e))?;
    if chain.is_empty() {
        return Err(invalid("the certificate PEM", "no CERTIFICATE section"));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid("the key PEM", e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid("the TLS versions", e))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| invalid("the certificate and key", e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

//! The TLS identities the mocks serve with: a CA of their own, and a leaf for the names a client may use.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Parameters of a CA certificate named `name`.
pub(crate) fn ca_params(name: &str) -> anyhow::Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// A server certificate for a mock, signed by a CA of its own that tests trust.
pub(crate) struct ServerIdentity {
    /// The CA's certificate, PEM: what a client adds to its roots.
    pub ca_pem: String,
    /// The leaf, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// A fresh CA named `ca_name` and a leaf for localhost, the loopback addresses, `ip` (when it is
    /// neither unspecified nor loopback) and `extra_names`.
    pub(crate) fn generate(
        ca_name: &str,
        ip: IpAddr,
        extra_names: &[String],
    ) -> anyhow::Result<ServerIdentity> {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ca = ca_params(ca_name)?.self_signed(&ca_key)?;

        let mut names = vec![
            "localhost".to_string(),
            Ipv4Addr::LOCALHOST.to_string(),
            Ipv6Addr::LOCALHOST.to_string(),
        ];
        if !ip.is_unspecified() && !ip.is_loopback() {
            names.push(ip.to_string());
        }
        names.extend(extra_names.iter().cloned());
        let mut params = rcgen::CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        params.is_ca = rcgen::IsCa::NoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&leaf_key, &ca, &ca_key)?;

        Ok(ServerIdentity {
            ca_pem: ca.pem(),
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        })
    }
}

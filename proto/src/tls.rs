//! TLS for every connection of a run (rustls through tonic): the coordinator's server, the
//! workers' peer servers, and the clients that dial them. One identity (certificate chain and
//! key, PEM) and one CA serve both ends, as cert-manager issues them (`tls.crt`, `tls.key`,
//! `ca.crt`). A server with TLS speaks nothing else: a plaintext client fails its handshake.
//! With `mutual`, servers also demand a client certificate signed by the CA.

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// A run's TLS material, checked when it is built.
#[derive(Clone)]
pub struct Tls {
    identity: Identity,
    ca: Certificate,
    mutual: bool,
    server_name: Option<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mutual", &self.mutual)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Whether `pem` holds a PEM block of `label` (`CERTIFICATE`, or any `… PRIVATE KEY`).
fn has_block(pem: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.lines().any(|line| {
        line.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    })
}

impl Tls {
    /// TLS from PEM: this end's certificate chain and private key, the CA that signs every
    /// end's certificate, whether servers demand client certificates (`mutual`), and the name
    /// every server's certificate is checked against (`None`: the host dialled). Errors say
    /// which part is wrong.
    pub fn from_pem(
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
        mutual: bool,
        server_name: Option<String>,
    ) -> Result<Tls, String> {
        if !has_block(cert, "CERTIFICATE") {
            return Err("the certificate holds no PEM CERTIFICATE block".into());
        }
        if !has_block(key, "PRIVATE KEY") {
            return Err("the key holds no PEM PRIVATE KEY block".into());
        }
        if !has_block(ca, "CERTIFICATE") {
            return Err("the CA holds no PEM CERTIFICATE block".into());
        }
        let tls = Tls {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
            mutual,
            server_name,
        };
        Server::builder()
            .tls_config(tls.server())
            .map_err(|e| format!("the certificate and key do not make a TLS identity: {e:?}"))?;
        let trust = ClientTlsConfig::new().ca_certificate(tls.ca.clone());
        Endpoint::from_static("https://localhost")
            .tls_config(trust.domain_name("localhost"))
            .map_err(|e| format!("the CA does not make a TLS trust root: {e:?}"))?;
        if let Some(name) = &tls.server_name {
            Endpoint::from_static("https://localhost")
                .tls_config(ClientTlsConfig::new().domain_name(name))
                .map_err(|_| format!("server name {name:?} is not a DNS name or IP address"))?;
        }
        Ok(tls)
    }

    /// A server's TLS: this identity, and with `mutual` the CA for client certificates.
    pub fn server(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        if self.mutual {
            config.client_ca_root(self.ca.clone())
        } else {
            config
        }
    }

    /// A client's TLS to `host`: trusts the CA only, checks the server's certificate against
    /// the configured server name (or `host`), and presents this identity.
    pub fn client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(self.server_name.as_deref().unwrap_or(host))
            .identity(self.identity.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh CA and a certificate it signs for 127.0.0.1, as PEM: (CA, certificate, key).
    fn certificates() -> (String, String, String) {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    #[test]
    fn each_bad_part_is_named() {
        let (ca, cert, key) = certificates();
        let build = |cert: &str, key: &str, ca: &str, name: Option<&str>| {
            Tls::from_pem(
                cert.as_bytes(),
                key.as_bytes(),
                ca.as_bytes(),
                true,
                name.map(str::to_string),
            )
            .map(|_| ())
        };
        assert_eq!(build(&cert, &key, &ca, None), Ok(()));
        assert_eq!(build(&cert, &key, &ca, Some("elbo")), Ok(()));
        for (what, got) in [
            ("certificate", build("x", &key, &ca, None)),
            ("key", build(&cert, "x", &ca, None)),
            ("CA", build(&cert, &key, "x", None)),
            ("server name", build(&cert, &key, &ca, Some("a b"))),
        ] {
            let err = got.unwrap_err();
            assert!(err.contains(what), "{what}: {err}");
        }
    }
}

//! TLS material from the PEM files a config (`[cluster.tls]`) or a worker's flags name.

use elbo_proto::tls::Tls;
use elbo_settings::TlsConfig;

use crate::error::{EngineError, Result};

/// The names of `cert`, `key` and `ca` where they were given, for errors.
pub(crate) const CONFIG_KEYS: [&str; 3] = ["cluster.tls.cert", "cluster.tls.key", "cluster.tls.ca"];

/// How a worker's (or a benchmark rank's) flags name them.
pub(crate) const FLAGS: [&str; 3] = ["--tls-cert", "--tls-key", "--tls-ca"];

/// The TLS `cfg` describes (`None` when it is off), its files read and checked; errors name the
/// setting (`names`: how `cert`, `key` and `ca` were given) and the file.
pub(crate) fn load(cfg: &TlsConfig, names: [&str; 3]) -> Result<Option<Tls>> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let paths = [&cfg.cert, &cfg.key, &cfg.ca];
    let mut pems = Vec::new();
    for (name, path) in names.iter().zip(paths) {
        if path.is_empty() {
            return Err(EngineError::Invalid(format!(
                "{name} is empty: TLS needs a certificate, its key and the CA (PEM files)"
            )));
        }
        let pem = std::fs::read(path)
            .map_err(|e| EngineError::Invalid(format!("{name} {path:?}: cannot read it: {e}")))?;
        pems.push(pem);
    }
    let server_name = (!cfg.server_name.is_empty()).then(|| cfg.server_name.clone());
    Tls::from_pem(&pems[0], &pems[1], &pems[2], cfg.mutual, server_name)
        .map(Some)
        .map_err(|e| {
            EngineError::Invalid(format!(
                "TLS from {} {:?}, {} {:?}, {} {:?}: {e}",
                names[0], cfg.cert, names[1], cfg.key, names[2], cfg.ca
            ))
        })
}

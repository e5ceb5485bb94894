//! The config loader on arbitrary text: no panic, and a config that loads writes out
//! (`Config::to_toml`, what the coordinator sends its workers) as text that loads back to the
//! same config. Input: a TOML file, then NUL-separated overrides: `ELBO__…=value` as an
//! environment variable, anything else as a `--set` flag.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use elbo_models::Registry;
use elbo_settings::{load, load_toml, Config, Layers};
use libfuzzer_sys::fuzz_target;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::builtin)
}

/// A loaded config survives its trip through the text a worker receives.
fn round_trip(config: &Config) {
    let text = config.to_toml();
    let again = load_toml(&text, Path::new("sent.toml"), registry())
        .unwrap_or_else(|e| panic!("a loaded config does not load back: {e}\n{text}"));
    assert_eq!(
        again.to_toml(),
        text,
        "a config changed on its way to a worker"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let toml = parts.next().unwrap_or_default();
    if let Ok(config) = load_toml(toml, Path::new("fuzz.toml"), registry()) {
        round_trip(&config);
    }
    let mut layers = Layers::default();
    for part in parts {
        match part.split_once('=') {
            Some((key, value)) if key.starts_with("ELBO__") => {
                layers.env.push((key.to_string(), value.to_string()));
            }
            _ => layers.flags.push(part.to_string()),
        }
    }
    if let Ok(config) = load(&layers, registry()) {
        round_trip(&config);
    }
});

//! The typed, layered configuration of an elbo run.
//!
//! Layers, in increasing priority: built-in defaults, a TOML file, `ELBO__SECTION__KEY`
//! environment variables, and `--set section.key=value` flags. An unknown key or a value of the
//! wrong type is an error that names the key and the layer it came from; nothing falls back to a
//! default silently.
//!
//! The model's section `[model.<kind>]` belongs to the variant `model.kind` selects: its keys,
//! defaults and checks come from the model registry, so a new variant needs no change here.

mod load;
mod schema;
mod validate;

pub use load::{
    known_keys, load, load_toml, Layers, Origin, SettingsError, ENV_PREFIX, ENV_SEPARATOR,
};
pub use schema::{
    ClusterConfig, Config, DataConfig, EvalConfig, LrSchedule, ModelConfig, OptimizerKind,
    RunConfig, SpritesConfig, TlsConfig, TrainConfig,
};

//! Layered loading: defaults ← TOML file ← environment ← `--set` flags.
//!
//! Every layer is checked on its own against the set of known keys before the layers are merged,
//! so an unknown key is reported with the layer that introduced it; a value of the wrong type is
//! reported with the layer that set it last (the one that won the merge).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use config::{ConfigError, Environment, File, FileFormat, Map, Source, Value, ValueKind};
use elbo_models::Registry;

use crate::schema::Config;
use crate::validate::validate;

/// Prefix of environment variables read as config (`ELBO__TRAIN__BATCH_SIZE`).
pub const ENV_PREFIX: &str = "ELBO";
/// Separator between the prefix and key path segments in environment variable names.
pub const ENV_SEPARATOR: &str = "__";

/// The inputs of one config resolution, in increasing priority.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// A TOML file (`--config FILE`).
    pub file: Option<PathBuf>,
    /// The process environment (only `ELBO__*` variables are read).
    pub env: Vec<(String, String)>,
    /// `--set KEY=VALUE` flags, in command-line order (a later one wins).
    pub flags: Vec<String>,
}

/// Where a config value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in defaults.
    Default,
    /// A TOML file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A `--set` flag.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "built-in defaults"),
            Origin::File(p) => write!(f, "config file {}", p.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag --set {flag}"),
        }
    }
}

/// Errors of config resolution. Each names the key and the source.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A key that the schema does not have.
    #[error("unknown config key `{key}` (from {origin}){hint}")]
    UnknownKey {
        /// The dotted key.
        key: String,
        /// The layer that set it.
        origin: Origin,
        /// A suggestion (`; did you mean …?`) or the list of keys of the section.
        hint: String,
    },
    /// A value that does not have the expected type or is out of range.
    #[error("invalid value for config key `{key}` (from {origin}): {message}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// The layer that set it.
        origin: Origin,
        /// What was found and what was expected.
        message: String,
    },
    /// A `--set` flag that is not `KEY=VALUE`.
    #[error("malformed flag --set {0:?}: expected KEY=VALUE, e.g. --set train.batch_size=256")]
    BadFlag(String),
    /// The config file is missing, unreadable or not valid TOML.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A `--set` flag layer as a `config` source.
#[derive(Debug, Clone)]
struct Flags(Vec<(String, String)>);

impl Source for Flags {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, ConfigError> {
        let mut root = Map::new();
        for (key, raw) in &self.0 {
            let origin = format!("--set {key}");
            insert_dotted(&mut root, key, Value::new(Some(&origin), typed(raw)));
        }
        Ok(root)
    }
}

/// A flag value as TOML would read it (`[400, 300]` is a list, `true` a bool), or else the
/// raw string (`adam`, `runs/x`): numbers stay strings and are parsed by the target type.
fn typed(raw: &str) -> ValueKind {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v @ (toml::Value::Array(_) | toml::Value::Boolean(_))) => from_toml(v),
        _ => ValueKind::String(raw.to_string()),
    }
}

fn from_toml(v: toml::Value) -> ValueKind {
    match v {
        toml::Value::String(s) => ValueKind::String(s),
        toml::Value::Integer(i) => ValueKind::I64(i),
        toml::Value::Float(f) => ValueKind::Float(f),
        toml::Value::Boolean(b) => ValueKind::Boolean(b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => ValueKind::Array(
            a.into_iter()
                .map(|v| Value::new(None, from_toml(v)))
                .collect(),
        ),
        toml::Value::Table(t) => ValueKind::Table(
            t.into_iter()
                .map(|(k, v)| (k, Value::new(None, from_toml(v))))
                .collect(),
        ),
    }
}

fn insert_dotted(table: &mut Map<String, Value>, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = table
                .entry(head.to_string())
                .or_insert_with(|| Value::new(None, Map::<String, Value>::new()));
            if !matches!(entry.kind, ValueKind::Table(_)) {
                *entry = Value::new(None, Map::<String, Value>::new());
            }
            if let ValueKind::Table(sub) = &mut entry.kind {
                insert_dotted(sub, rest, value);
            }
        }
    }
}

fn flatten(prefix: &str, table: &Map<String, Value>, out: &mut Vec<String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match &v.kind {
            ValueKind::Table(sub) if !sub.is_empty() => flatten(&key, sub, out),
            _ => out.push(key),
        }
    }
}

fn flat_keys(source: &dyn Source) -> Result<Vec<String>, ConfigError> {
    let mut keys = Vec::new();
    flatten("", &source.collect()?, &mut keys);
    Ok(keys)
}

/// All leaf keys of the schema, dotted, sorted: the common ones and every registered model
/// variant's section keys (`model.<kind>.<key>`).
pub fn known_keys(registry: &Registry) -> Vec<String> {
    let defaults = config::Config::try_from(&Config::default())
        .expect("the default config serialises to a table");
    let mut keys = flat_keys(&defaults).expect("the default config collects");
    for kind in registry.kinds() {
        let section = registry.defaults(kind).unwrap_or_default();
        keys.extend(section_keys(&format!("model.{kind}"), &section));
    }
    keys.sort();
    keys
}

/// The schema a layer is checked against: the leaf keys, and the variants' sections
/// (`model.<kind>`), which may appear as empty tables.
struct Schema {
    keys: Vec<String>,
    sections: Vec<String>,
}

impl Schema {
    fn of(registry: &Registry) -> Self {
        Schema {
            keys: known_keys(registry),
            sections: registry
                .kinds()
                .iter()
                .map(|k| format!("model.{k}"))
                .collect(),
        }
    }
}

fn section_keys(prefix: &str, table: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in table {
        let key = format!("{prefix}.{k}");
        match v {
            toml::Value::Table(sub) if !sub.is_empty() => out.extend(section_keys(&key, sub)),
            _ => out.push(key),
        }
    }
    out
}

fn parse_flags(flags: &[String]) -> Result<Vec<(String, String)>, SettingsError> {
    flags
        .iter()
        .map(|flag| match flag.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(SettingsError::BadFlag(flag.clone())),
        })
        .collect()
}

fn env_var_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}",
        key.replace('.', ENV_SEPARATOR).to_uppercase()
    )
}

/// Checks one layer's keys against the schema and records which layer set each key (an empty
/// variant section is allowed and sets nothing).
fn check_layer(
    keys: Vec<String>,
    origin_of: impl Fn(&str) -> Origin,
    schema: &Schema,
    winners: &mut BTreeMap<String, Origin>,
) -> Result<(), SettingsError> {
    for key in keys {
        if schema.sections.contains(&key) {
            continue;
        }
        let origin = origin_of(&key);
        if schema.keys.binary_search(&key).is_err() {
            return Err(SettingsError::UnknownKey {
                hint: hint_for(&key, schema),
                key,
                origin,
            });
        }
        winners.insert(key, origin);
    }
    Ok(())
}

fn hint_for(key: &str, schema: &Schema) -> String {
    let known = &schema.keys;
    if let Some(section) = schema
        .sections
        .iter()
        .find(|s| key.starts_with(&format!("{s}.")))
    {
        let keys: Vec<&str> = known
            .iter()
            .filter(|k| k.starts_with(&format!("{section}.")))
            .map(String::as_str)
            .collect();
        if keys.is_empty() {
            return format!(
                "; [{section}] has no keys: that model kind takes only the [model] keys"
            );
        }
        let best = keys
            .iter()
            .map(|k| (edit_distance(key, k), *k))
            .min()
            .filter(|(d, _)| *d <= 3);
        return match best {
            Some((_, k)) => format!("; did you mean `{k}`?"),
            None => format!("; the keys of [{section}] are {}", keys.join(", ")),
        };
    }
    let section = format!("{key}.");
    let children: Vec<&str> = known
        .iter()
        .filter(|k| k.starts_with(&section))
        .map(String::as_str)
        .collect();
    if !children.is_empty() {
        return format!(
            "; `{key}` is a section, expected a table with keys {}",
            children.join(", ")
        );
    }
    let best = known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .min()
        .filter(|(d, _)| *d <= 3);
    match best {
        Some((_, k)) => format!("; did you mean `{k}`?"),
        None => format!("; known keys: {}", known.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Splits a `config` deserialisation error into the key it concerns and a message.
fn describe(err: &ConfigError) -> (Option<String>, String) {
    match err {
        ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (
            key.clone(),
            format!("found {unexpected}, expected {expected}"),
        ),
        ConfigError::At { error, key, .. } => {
            let (inner_key, message) = describe(error);
            (key.clone().or(inner_key), message)
        }
        other => (None, other.to_string()),
    }
}

/// Resolves the config from all layers, validates it (the model's section against `registry`)
/// and fills derived defaults.
pub fn load(layers: &Layers, registry: &Registry) -> Result<Config, SettingsError> {
    let file = match &layers.file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| SettingsError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            Some((path.clone(), text))
        }
        None => None,
    };
    resolve(file, layers, registry)
}

/// Resolves a config from TOML text alone (no environment, no flags), as a worker does with the
/// config its coordinator sends; `label` names the text in errors.
pub fn load_toml(text: &str, label: &Path, registry: &Registry) -> Result<Config, SettingsError> {
    resolve(
        Some((label.to_path_buf(), text.to_string())),
        &Layers::default(),
        registry,
    )
}

fn resolve(
    file: Option<(PathBuf, String)>,
    layers: &Layers,
    registry: &Registry,
) -> Result<Config, SettingsError> {
    let schema = Schema::of(registry);
    let mut winners: BTreeMap<String, Origin> = schema
        .keys
        .iter()
        .map(|k| (k.clone(), Origin::Default))
        .collect();
    let defaults = config::Config::try_from(&Config::default())
        .expect("the default config serialises to a table");
    let mut builder = config::Config::builder().add_source(defaults);

    if let Some((path, text)) = &file {
        let file_err = |message: String| SettingsError::File {
            path: path.clone(),
            message,
        };
        let source = File::from_str(text, FileFormat::Toml);
        let keys = flat_keys(&source).map_err(|e| file_err(e.to_string()))?;
        check_layer(keys, |_| Origin::File(path.clone()), &schema, &mut winners)?;
        builder = builder.add_source(source);
    }

    let env_map: Map<String, String> = layers
        .env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
        .cloned()
        .collect();
    let env = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("model.hidden")
        .source(Some(env_map));
    let keys = flat_keys(&env).map_err(|e| SettingsError::Invalid {
        key: String::new(),
        origin: Origin::Env(ENV_PREFIX.into()),
        message: e.to_string(),
    })?;
    check_layer(
        keys,
        |k| Origin::Env(env_var_name(k)),
        &schema,
        &mut winners,
    )?;
    builder = builder.add_source(env);

    let flags = Flags(parse_flags(&layers.flags)?);
    let flag_origin = |k: &str| {
        let raw = flags
            .0
            .iter()
            .rev()
            .find(|(fk, _)| fk == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        Origin::Flag(format!("{k}={raw}"))
    };
    let keys = flat_keys(&flags).expect("flags collect infallibly");
    check_layer(keys, flag_origin, &schema, &mut winners)?;
    builder = builder.add_source(flags.clone());

    let origin_of = |key: &str| winners.get(key).cloned().unwrap_or(Origin::Default);
    let with_choices = |key: &str, message: String| match choices(key) {
        Some(choices) => format!("{message}; expected one of: {choices}"),
        None => message,
    };
    let merged = builder.build().map_err(|e| {
        let (key, message) = describe(&e);
        let key = key.unwrap_or_default();
        SettingsError::Invalid {
            origin: origin_of(&key),
            message: with_choices(&key, message),
            key,
        }
    })?;
    let mut cfg: Config = merged.clone().try_deserialize().map_err(|e| {
        let (key, message) = describe(&e);
        let key = key.unwrap_or_default();
        SettingsError::Invalid {
            origin: origin_of(&key),
            message: with_choices(&key, message),
            key,
        }
    })?;
    validate(&cfg).map_err(|(key, message)| SettingsError::Invalid {
        origin: origin_of(key),
        key: key.to_string(),
        message,
    })?;
    cfg.model.section = model_section(&cfg.model.kind, &merged, registry, &winners)?;
    if cfg.run.dir.is_empty() {
        cfg.run.dir = Path::new("runs")
            .join(&cfg.run.name)
            .to_string_lossy()
            .into_owned();
    }
    Ok(cfg)
}

impl Config {
    /// The config as a TOML table, the model's section `[model.<kind>]` included.
    pub fn to_value(&self) -> toml::Table {
        let mut table = match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => t,
            _ => unreachable!("the config serialises to a table"),
        };
        if let (Some(section), Some(toml::Value::Table(model))) =
            (&self.model.section, table.get_mut("model"))
        {
            model.insert(self.model.kind.clone(), toml::Value::Table(section.clone()));
        }
        table
    }

    /// The config as TOML, as `elbo config show` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.to_value()).expect("the config serialises to TOML")
    }
}

/// The accepted values of an enum-typed key, as its type's serde derive lists them: found by
/// setting the key to a value no variant has in the defaults and reading the error.
fn choices(key: &str) -> Option<String> {
    let mut tree = toml::Value::try_from(Config::default()).ok()?;
    let mut slot = &mut tree;
    for part in key.split('.') {
        slot = slot.get_mut(part)?;
    }
    if !slot.is_str() {
        return None;
    }
    *slot = toml::Value::String("\u{1}".into());
    let err = tree.try_into::<Config>().err()?.message().to_string();
    let list = err.split_once("expected one of ")?.1;
    Some(list.replace('`', ""))
}

/// The selected variant's section: its defaults overlaid with what the layers set (each value
/// typed like its default), then checked by the variant. Keys of other variants' sections are
/// refused: they would be silently ignored.
fn model_section(
    kind: &str,
    merged: &config::Config,
    registry: &Registry,
    winners: &BTreeMap<String, Origin>,
) -> Result<Option<toml::Table>, SettingsError> {
    let origin_of = |key: &str| winners.get(key).cloned().unwrap_or(Origin::Default);
    let Some(mut section) = registry.defaults(kind) else {
        return Err(SettingsError::Invalid {
            key: "model.kind".into(),
            origin: origin_of("model.kind"),
            message: format!(
                "found {kind:?}, expected one of: {}",
                registry.kinds().join(", ")
            ),
        });
    };
    for (key, origin) in winners {
        let other = key
            .strip_prefix("model.")
            .and_then(|rest| rest.split('.').next())
            .filter(|k| *k != kind && registry.contains(k));
        if let (Some(other), false) = (other, *origin == Origin::Default) {
            return Err(SettingsError::Invalid {
                key: key.clone(),
                origin: origin.clone(),
                message: format!(
                    "configures model kind {other:?}, but model.kind = {kind:?}: set model.kind = {other:?}, or drop the key"
                ),
            });
        }
    }
    let prefix = format!("model.{kind}");
    if let Ok(set) = merged.get_table(&prefix) {
        overlay(&prefix, &mut section, &set, &origin_of)?;
    }
    registry.check(kind, &section).map_err(|e| {
        let key = if e.key.is_empty() {
            prefix.clone()
        } else {
            format!("{prefix}.{}", e.key)
        };
        SettingsError::Invalid {
            origin: origin_of(&key),
            key,
            message: e.message,
        }
    })?;
    Ok((!section.is_empty()).then_some(section))
}

/// Writes the values a layer set over a section's defaults, each typed like its default.
fn overlay(
    prefix: &str,
    section: &mut toml::Table,
    set: &Map<String, Value>,
    origin_of: &dyn Fn(&str) -> Origin,
) -> Result<(), SettingsError> {
    for (k, value) in set {
        let key = format!("{prefix}.{k}");
        let Some(default) = section.get_mut(k) else {
            continue;
        };
        if let (toml::Value::Table(sub), ValueKind::Table(inner)) = (&mut *default, &value.kind) {
            overlay(&key, sub, inner, origin_of)?;
            continue;
        }
        *default = typed_like(default, value).map_err(|message| SettingsError::Invalid {
            origin: origin_of(&key),
            key: key.clone(),
            message,
        })?;
    }
    Ok(())
}

/// `value` as the type of `default` (strings from flags and the environment are parsed).
fn typed_like(default: &toml::Value, value: &Value) -> Result<toml::Value, String> {
    use toml::Value as T;
    let text = match &value.kind {
        ValueKind::String(s) => Some(s.trim()),
        _ => None,
    };
    let found = || format!("found {}", describe_value(value));
    match default {
        T::Integer(_) => match (&value.kind, text) {
            (ValueKind::I64(i), _) => Ok(T::Integer(*i)),
            (ValueKind::U64(u), _) => i64::try_from(*u).map(T::Integer).map_err(|_| found()),
            (_, Some(t)) => t.parse().map(T::Integer).map_err(|_| found()),
            _ => Err(found()),
        }
        .map_err(|f| format!("{f}, expected an integer")),
        T::Float(_) => match (&value.kind, text) {
            (ValueKind::Float(f), _) => Ok(T::Float(*f)),
            (ValueKind::I64(i), _) => Ok(T::Float(*i as f64)),
            (ValueKind::U64(u), _) => Ok(T::Float(*u as f64)),
            (_, Some(t)) => t.parse().map(T::Float).map_err(|_| found()),
            _ => Err(found()),
        }
        .map_err(|f| format!("{f}, expected a number")),
        T::Boolean(_) => match (&value.kind, text) {
            (ValueKind::Boolean(b), _) => Ok(T::Boolean(*b)),
            (_, Some(t)) => t.parse().map(T::Boolean).map_err(|_| found()),
            _ => Err(found()),
        }
        .map_err(|f| format!("{f}, expected true or false")),
        T::String(_) => match text {
            Some(_) => Ok(T::String(value.to_string())),
            None => Err(format!("{}, expected a string", found())),
        },
        T::Array(items) => {
            let parts: Vec<Value> = match (&value.kind, text) {
                (ValueKind::Array(a), _) => a.clone(),
                (_, Some("")) => Vec::new(),
                (_, Some(t)) => t
                    .split(',')
                    .map(|p| Value::new(None, ValueKind::String(p.trim().to_string())))
                    .collect(),
                _ => return Err(format!("{}, expected a list", found())),
            };
            // An empty default says nothing of its items' type: they are read as written (the
            // variant's own deserialisation then checks them).
            parts
                .iter()
                .map(|p| match items.first() {
                    Some(like) => typed_like(like, p),
                    None => Ok(as_written(p)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(T::Array)
        }
        T::Table(_) | T::Datetime(_) => Err(format!(
            "{}, expected a value of the section's own form",
            found()
        )),
    }
}

/// A value with no default to type it by: numbers and booleans as such, text as a number or a
/// boolean when it reads as one (values from flags and the environment arrive as text).
fn as_written(value: &Value) -> toml::Value {
    use toml::Value as T;
    match &value.kind {
        ValueKind::I64(i) => T::Integer(*i),
        ValueKind::U64(u) => i64::try_from(*u).map_or(T::Float(*u as f64), T::Integer),
        ValueKind::Float(f) => T::Float(*f),
        ValueKind::Boolean(b) => T::Boolean(*b),
        ValueKind::String(s) => {
            let s = s.trim();
            s.parse::<i64>()
                .map(T::Integer)
                .or_else(|_| s.parse::<f64>().map(T::Float))
                .or_else(|_| s.parse::<bool>().map(T::Boolean))
                .unwrap_or_else(|_| T::String(s.to_string()))
        }
        ValueKind::Array(items) => T::Array(items.iter().map(as_written).collect()),
        other => T::String(other.to_string()),
    }
}

fn describe_value(value: &Value) -> String {
    match &value.kind {
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Table(_) => "a table".into(),
        ValueKind::Array(_) => "a list".into(),
        other => other.to_string(),
    }
}

//! The model registry: `model.kind` selects a variant, and the variant owns its config section
//! `[model.<kind>]`.
//!
//! A variant is one module that implements [`Variant`] (its kind, its section's type with
//! defaults and range checks, and a constructor) plus one line in `builtin.rs`. The
//! settings loader learns every section's keys, defaults and types from the registry, so a new
//! variant needs no edit anywhere else; a program (or a test) can register its own variants
//! beside the built-in ones.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::spec::{BuildContext, ModelSpec};

/// A bad value in a variant's section: the key within the section and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionError {
    /// The key inside `[model.<kind>]` (empty: the section as a whole).
    pub key: String,
    /// What was found and what was expected.
    pub message: String,
}

impl SectionError {
    /// An error about `key`.
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        SectionError {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for SectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// A variant's config section: serde with defaults for every key (the loader types the keys
/// from the defaults) and range checks.
pub trait Section: Serialize + DeserializeOwned + Default + 'static {
    /// Range checks that types cannot express.
    fn validate(&self) -> Result<(), SectionError> {
        Ok(())
    }

    /// The directory of a trained run this model builds on (a prior over a VQ-VAE's codes
    /// names the VQ-VAE's run), loaded by the program into [`BuildContext::base`]; `None` by
    /// default.
    fn base_run(&self) -> Option<&str> {
        None
    }
}

/// The section of a variant without keys of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSection {}

impl Section for NoSection {}

/// A model variant selectable by `model.kind`.
pub trait Variant: 'static {
    /// The `model.kind` that selects it (snake_case).
    const KIND: &'static str;
    /// One line on what it is.
    const ABOUT: &'static str;
    /// Its `[model.<kind>]` section.
    type Config: Section;
    /// Builds the model, parameters drawn from the context's seed.
    fn build(spec: &ModelSpec, config: &Self::Config, ctx: &BuildContext)
        -> Result<Box<dyn Model>>;
}

struct Entry {
    about: &'static str,
    defaults: fn() -> toml::Table,
    check: fn(&toml::Table) -> Result<(), SectionError>,
    base_run: fn(&toml::Table) -> Result<Option<String>, SectionError>,
    build: fn(&ModelSpec, &toml::Table, &BuildContext) -> Result<Box<dyn Model>>,
}

fn defaults<C: Section>() -> toml::Table {
    match toml::Value::try_from(C::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => panic!("a model section's defaults must serialise to a TOML table"),
    }
}

fn parse<C: Section>(section: &toml::Table) -> Result<C, SectionError> {
    let config: C =
        toml::Value::Table(section.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                SectionError::new(&culprit::<C>(section), e.message().to_string())
            })?;
    config.validate()?;
    Ok(config)
}

/// The first key of a section that does not deserialise (an unknown choice of an enumerated
/// key) over the defaults, so that the error names it; "" if no single key is to blame.
fn culprit<C: Section>(section: &toml::Table) -> String {
    let defaults = defaults::<C>();
    section
        .iter()
        .find(|(key, value)| {
            let mut one = defaults.clone();
            one.insert((*key).clone(), (*value).clone());
            toml::Value::Table(one).try_into::<C>().is_err()
        })
        .map(|(key, _)| key.clone())
        .unwrap_or_default()
}

fn check<C: Section>(section: &toml::Table) -> Result<(), SectionError> {
    parse::<C>(section).map(|_| ())
}

fn base_run<C: Section>(section: &toml::Table) -> Result<Option<String>, SectionError> {
    parse::<C>(section).map(|c| c.base_run().map(str::to_owned))
}

fn build<V: Variant>(
    spec: &ModelSpec,
    section: &toml::Table,
    ctx: &BuildContext,
) -> Result<Box<dyn Model>> {
    let config = parse::<V::Config>(section)
        .map_err(|e| ModelError::Spec(format!("[model.{}] {e}", V::KIND)))?;
    V::build(spec, &config, ctx)
}

/// The variants a program knows, by kind.
#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.keys()).finish()
    }
}

impl Registry {
    /// Adds a variant. Two variants of one kind are a programming error.
    pub fn register<V: Variant>(&mut self) -> &mut Self {
        let fresh = self
            .entries
            .insert(
                V::KIND,
                Entry {
                    about: V::ABOUT,
                    defaults: defaults::<V::Config>,
                    check: check::<V::Config>,
                    base_run: base_run::<V::Config>,
                    build: build::<V>,
                },
            )
            .is_none();
        assert!(fresh, "model kind {:?} registered twice", V::KIND);
        self
    }

    /// The kinds, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.entries.keys().copied().collect()
    }

    /// Whether `kind` is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.entries.contains_key(kind)
    }

    /// One line on what `kind` is.
    pub fn about(&self, kind: &str) -> Option<&'static str> {
        self.entries.get(kind).map(|e| e.about)
    }

    /// The defaults of `kind`'s section.
    pub fn defaults(&self, kind: &str) -> Option<toml::Table> {
        self.entries.get(kind).map(|e| (e.defaults)())
    }

    /// Checks a section of `kind` (its keys already typed like the defaults): types and ranges.
    pub fn check(&self, kind: &str, section: &toml::Table) -> Result<(), SectionError> {
        match self.entries.get(kind) {
            Some(e) => (e.check)(section),
            None => Err(SectionError::new("", self.unknown(kind))),
        }
    }

    /// The trained run a model of `kind` with this section builds on, if any
    /// ([`Section::base_run`]).
    pub fn base_run(&self, kind: &str, section: &toml::Table) -> Result<Option<String>> {
        let entry = self
            .entries
            .get(kind)
            .ok_or_else(|| ModelError::Spec(self.unknown(kind)))?;
        (entry.base_run)(section).map_err(|e| ModelError::Spec(format!("[model.{kind}] {e}")))
    }

    /// Builds a model of `kind` from the common spec and its section.
    pub fn build(
        &self,
        kind: &str,
        spec: &ModelSpec,
        section: &toml::Table,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Model>> {
        let entry = self
            .entries
            .get(kind)
            .ok_or_else(|| ModelError::Spec(self.unknown(kind)))?;
        (entry.build)(spec, section, ctx)
    }

    fn unknown(&self, kind: &str) -> String {
        format!(
            "model kind {kind:?} is not registered; available: {}",
            self.kinds().join(", ")
        )
    }
}

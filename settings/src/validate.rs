//! Range checks that types alone cannot express.

use crate::schema::Config;

/// Returns the first offending key and what was expected of it.
pub(crate) fn validate(cfg: &Config) -> Result<(), (&'static str, String)> {
    let name = &cfg.run.name;
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err((
            "run.name",
            format!("{name:?} is not usable as a directory name: expected a non-empty name without path separators"),
        ));
    }
    let positive = [
        ("train.epochs", cfg.train.epochs),
        ("train.batch_size", cfg.train.batch_size),
        ("data.shuffle_window", cfg.data.shuffle_window),
        ("data.sprites.n", cfg.data.sprites.n),
        ("model.latent_dim", u64::from(cfg.model.latent_dim)),
        ("cluster.workers", u64::from(cfg.cluster.workers)),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err((key, "found 0, expected a positive integer".into()));
        }
    }
    if !(cfg.train.lr.is_finite() && cfg.train.lr > 0.0) {
        return Err((
            "train.lr",
            format!("found {}, expected a finite positive number", cfg.train.lr),
        ));
    }
    if ![32, 64].contains(&cfg.data.sprites.size) {
        return Err((
            "data.sprites.size",
            format!("found {}, expected 32 or 64", cfg.data.sprites.size),
        ));
    }
    for (key, value) in [
        ("data.train", &cfg.data.train),
        ("data.test", &cfg.data.test),
    ] {
        if value.trim().is_empty() {
            return Err((
                key,
                "found an empty string, expected a path, a glob or builtin:sprites".into(),
            ));
        }
    }
    Ok(())
}

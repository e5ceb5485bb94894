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
        ("cluster.min_workers", u64::from(cfg.cluster.min_workers)),
        ("cluster.ring_chunk_kib", cfg.cluster.ring_chunk_kib),
        ("cluster.ring_depth", cfg.cluster.ring_depth),
        (
            "train.keep_checkpoints",
            u64::from(cfg.train.keep_checkpoints),
        ),
        ("train.max_nonfinite", u64::from(cfg.train.max_nonfinite)),
        ("train.log_every", cfg.train.log_every),
        ("eval.iw_samples", u64::from(cfg.eval.iw_samples)),
        ("eval.batch_size", cfg.eval.batch_size),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err((key, "found 0, expected a positive integer".into()));
        }
    }
    if cfg.model.hidden.contains(&0) {
        return Err((
            "model.hidden",
            format!(
                "{:?} holds a 0, expected positive layer sizes",
                cfg.model.hidden
            ),
        ));
    }
    let non_negative = [
        ("train.weight_decay", cfg.train.weight_decay),
        ("train.clip_norm", cfg.train.clip_norm),
        ("model.beta", cfg.model.beta),
        ("model.free_bits", cfg.model.free_bits),
    ];
    for (key, value) in non_negative {
        if !(value.is_finite() && value >= 0.0) {
            return Err((key, format!("found {value}, expected a finite number ≥ 0")));
        }
    }
    let positive = [
        ("model.variance", cfg.model.variance),
        ("model.log_var_clamp", cfg.model.log_var_clamp),
    ];
    for (key, value) in positive {
        if !(value.is_finite() && value > 0.0) {
            return Err((key, format!("found {value}, expected a finite number > 0")));
        }
    }
    if !(0.0..1.0).contains(&cfg.train.momentum) {
        return Err((
            "train.momentum",
            format!("found {}, expected a number in [0, 1)", cfg.train.momentum),
        ));
    }
    if !(cfg.train.lr.is_finite() && cfg.train.lr > 0.0) {
        return Err((
            "train.lr",
            format!("found {}, expected a finite positive number", cfg.train.lr),
        ));
    }
    for (key, value) in [
        (
            "cluster.rendezvous_timeout_s",
            cfg.cluster.rendezvous_timeout_s,
        ),
        (
            "cluster.heartbeat_timeout_s",
            cfg.cluster.heartbeat_timeout_s,
        ),
        ("cluster.step_timeout_s", cfg.cluster.step_timeout_s),
        (
            "cluster.reconnect_timeout_s",
            cfg.cluster.reconnect_timeout_s,
        ),
    ] {
        if !(value.is_finite() && (0.1..=86_400.0).contains(&value)) {
            return Err((
                key,
                format!("found {value}, expected seconds in [0.1, 86400]"),
            ));
        }
    }
    if cfg.cluster.min_workers > cfg.cluster.workers {
        return Err((
            "cluster.min_workers",
            format!(
                "found {}, expected at most cluster.workers = {}",
                cfg.cluster.min_workers, cfg.cluster.workers
            ),
        ));
    }
    if cfg.cluster.ring_chunk_kib > 16 * 1024 {
        return Err((
            "cluster.ring_chunk_kib",
            format!(
                "found {}, expected at most 16384 (16 MiB chunks)",
                cfg.cluster.ring_chunk_kib
            ),
        ));
    }
    let tls = &cfg.cluster.tls;
    if tls.enabled() {
        for (key, path) in [
            ("cluster.tls.cert", &tls.cert),
            ("cluster.tls.key", &tls.key),
            ("cluster.tls.ca", &tls.ca),
        ] {
            if path.is_empty() {
                return Err((
                    key,
                    "empty: TLS needs cluster.tls.cert, .key and .ca together (PEM files)".into(),
                ));
            }
        }
    } else if tls.mutual || !tls.server_name.is_empty() {
        return Err((
            if tls.mutual {
                "cluster.tls.mutual"
            } else {
                "cluster.tls.server_name"
            },
            "set without TLS: also set cluster.tls.cert, .key and .ca".into(),
        ));
    }
    let dns = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.');
    if tls.server_name.len() > 253 || !tls.server_name.chars().all(dns) {
        return Err((
            "cluster.tls.server_name",
            format!(
                "{:?}: expected a DNS name (A–Z, a–z, 0–9, '-', '.')",
                tls.server_name
            ),
        ));
    }
    if cfg.cluster.ring_depth > 64 {
        return Err((
            "cluster.ring_depth",
            format!(
                "found {}, expected at most 64 chunks in flight",
                cfg.cluster.ring_depth
            ),
        ));
    }
    if cfg.data.labeled_per_batch >= cfg.train.batch_size {
        return Err((
            "data.labeled_per_batch",
            format!(
                "found {}, expected fewer than train.batch_size = {} (a batch needs unlabeled rows too)",
                cfg.data.labeled_per_batch, cfg.train.batch_size
            ),
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

//! The `elbo` command line: parses, wires the crates together and reports.

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keep_freed_memory();
    pin_thread_count();
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ELBO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs())
        .init();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // What was done is reported; the exit code says it is not finished.
        Err(err) if err.is::<cli::Interrupted>() => ExitCode::from(cli::exit_code(&err)),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
}

/// Whether log lines carry ANSI colours: only on a terminal, and not with `NO_COLOR` set
/// (no-color.org); a file or a pipe gets plain text.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// mimalloc's `purge_delay` option (its index in mimalloc's `mi_option_e`; the crate exports
/// no name for it) and its default in the mimalloc it builds (v3), 1,000 ms.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const PURGE_DELAY_DEFAULT: std::ffi::c_long = 1000;

/// Keeps freed memory in the process instead of handing it back to the OS, as mimalloc does
/// by default after a delay: a training step frees and reallocates the same large buffers
/// every few milliseconds, and each of M2's steps took ~260 page faults, the kernel
/// zero-filling fresh huge pages (8 % of its CPU time); none with this. PyTorch's caching allocator keeps memory the same
/// way. The option is set only if it reads as the purge delay's default, so a mimalloc whose
/// options are numbered otherwise is left alone.
fn keep_freed_memory() {
    // SAFETY: reading and setting a process-wide mimalloc option takes any option index and
    // value; the index is checked against the option's default before it is set.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DELAY) == PURGE_DELAY_DEFAULT {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}

/// Thread setup. The large matrix products (our fused layers) run on rayon's pool, one thread
/// per core. candle's own pool — which spin-waits between ops and so competes with the matrix
/// products for the same cores — gets half the cores (1 on 2 cores: measured 1.15× faster for
/// the MLP VAE and no slower for the conv VAE there). candle reads `RAYON_NUM_THREADS` and,
/// without it, re-counts the CPUs by reading /proc/cpuinfo on every op. A user's
/// `RAYON_NUM_THREADS` is left alone and then sizes both pools.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        std::env::set_var("RAYON_NUM_THREADS", (n / 2).max(1).to_string());
    }
}

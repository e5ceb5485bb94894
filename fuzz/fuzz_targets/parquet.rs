//! The dataset reader on arbitrary (mostly mutated) Parquet files: opening (footer, schema,
//! shape metadata), `elbo data inspect`, and reading every row group's pixels, labels and ids.
//! No panic, and a row group that reads has the rows its footer declares, each with the
//! schema's number of values.
//!
//! The Parquet decoder has panicked on corrupt files (apache/arrow-rs#9839, a capacity overflow;
//! found here with parquet 57), and the reader's guard (`guard_decoder`) turns such a panic into
//! an error; this target leaves the panics raised under that guard, outside elbo's own code, to
//! it. Any other panic (in `elbo_datasets`, or one the guard misses) is a finding, and so is an
//! allocation over 2 GiB, which no guard can catch (apache/arrow-rs#10920, also found here).
#![no_main]

mod scratch;

use std::backtrace::Backtrace;
use std::sync::Once;

use elbo_datasets::{inspect, read_chunk, Dataset, Pixels};
use libfuzzer_sys::fuzz_target;

/// Leaves panics of the Parquet decoder to the reader's guard; every other panic goes to
/// libFuzzer's hook, which reports it.
fn leave_decoder_panics_to_the_guard() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = info
                .location()
                .is_some_and(|l| l.file().contains("datasets/src/"));
            let guarded = !ours
                && Backtrace::force_capture()
                    .to_string()
                    .contains("guard_decoder");
            if !guarded {
                report(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    leave_decoder_panics_to_the_guard();
    let path = scratch::write("data.parquet", data);
    let Ok(ds) = Dataset::open(path.to_str().expect("a UTF-8 path")) else {
        return;
    };
    let _ = inspect(&ds);
    let dim = ds.schema().dim;
    for chunk in ds.chunks() {
        let Ok(read) = read_chunk(&ds, chunk) else {
            continue;
        };
        let rows = usize::try_from(chunk.rows).expect("rows fit usize");
        assert_eq!(
            read.rows(),
            rows,
            "a row group read other rows than declared"
        );
        assert_eq!(read.labels.len(), rows);
        let values = match &read.pixels {
            Pixels::Uint8(v) => v.len(),
            Pixels::Float32(v) => v.len(),
        };
        assert_eq!(values, rows * dim, "rows of the wrong size");
    }
});

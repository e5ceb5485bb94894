//! What every converter target checks of a conversion's output.

use std::path::{Path, PathBuf};

use elbo_datasets::convert::ConvertSummary;
use elbo_datasets::Dataset;

/// The path a converter writes to, cleared of the last input's output.
pub fn output() -> PathBuf {
    let out = crate::scratch::dir().join("out.parquet");
    let _ = std::fs::remove_file(&out);
    out
}

/// A conversion that succeeded wrote a dataset that opens with the rows and shape it
/// reported; one that failed left nothing at `out`.
pub fn check_output(out: &Path, summary: elbo_datasets::Result<ConvertSummary>) {
    match summary {
        Ok(summary) => {
            let ds = Dataset::open(out.to_str().expect("a UTF-8 path"))
                .unwrap_or_else(|e| panic!("a converted dataset does not open: {e}"));
            assert_eq!(ds.rows(), summary.rows, "rows other than reported");
            assert_eq!(
                ds.schema().shape,
                summary.shape,
                "a shape other than reported"
            );
        }
        Err(_) => assert!(!out.exists(), "a failed conversion left its output behind"),
    }
}

//! A folder of the fuzzing process's own for the files a target writes (tmpfs where there is
//! one), removed when the process ends normally.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The process's scratch folder.
pub fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm } else { Path::new("/tmp") };
        tempfile::Builder::new()
            .prefix("elbo-fuzz-")
            .tempdir_in(base)
            .expect("a scratch folder")
    })
    .path()
}

/// `bytes` written to the scratch file `name`; the path.
pub fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir().join(name);
    std::fs::write(&path, bytes).expect("a scratch file");
    path
}

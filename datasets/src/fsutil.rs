//! File-system helpers for atomic writes: the permissions of files created through temporary
//! names (what `File::create` would give: 0666 and 0777 less the umask, not the owner-only mode
//! of temporary files), and making a rename durable.

use std::fs::Permissions;
use std::path::Path;

use crate::error::{DataError, Result};

/// Fsyncs the directory holding `path`, so that a rename into it survives a crash.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DataError::io(dir, e))?;
    Ok(())
}

#[cfg(unix)]
pub(crate) fn shared_file_permissions() -> Permissions {
    std::os::unix::fs::PermissionsExt::from_mode(0o666)
}

#[cfg(unix)]
pub(crate) fn shared_dir_permissions() -> Permissions {
    std::os::unix::fs::PermissionsExt::from_mode(0o777)
}

#[cfg(not(unix))]
pub(crate) fn shared_file_permissions() -> Permissions {
    std::fs::metadata(".")
        .expect("the working directory exists")
        .permissions()
}

#[cfg(not(unix))]
pub(crate) fn shared_dir_permissions() -> Permissions {
    shared_file_permissions()
}

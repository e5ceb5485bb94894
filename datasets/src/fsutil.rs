//! Permissions of files created through temporary names: what `File::create` would give
//! (0666 and 0777 less the umask), not the owner-only mode of temporary files.

use std::fs::Permissions;

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

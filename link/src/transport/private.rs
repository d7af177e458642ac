//! Credential files only this user may read: the key directory (0700), the private key (0600),
//! and the check that a token file is not readable by others.
//!
//! On unix these are file modes. On Windows a file's access is its ACL, inherited from its
//! directory: a key made under the user's profile (`%APPDATA%`, `%LOCALAPPDATA%`) is readable by
//! that user, SYSTEM and administrators only, and nothing more is done here; keep credentials
//! there.

use std::fs;
use std::path::Path;

#[cfg(unix)]
mod imp {
    use std::fs;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

    pub(super) fn dir_builder() -> fs::DirBuilder {
        let mut b = fs::DirBuilder::new();
        b.mode(0o700);
        b
    }

    pub(super) fn open_options() -> fs::OpenOptions {
        let mut o = fs::OpenOptions::new();
        o.mode(0o600);
        o
    }

    pub(super) fn readable_by_others(meta: &fs::Metadata) -> bool {
        meta.permissions().mode() & 0o077 != 0
    }
}

#[cfg(windows)]
mod imp {
    use std::fs;

    pub(super) fn dir_builder() -> fs::DirBuilder {
        fs::DirBuilder::new()
    }

    pub(super) fn open_options() -> fs::OpenOptions {
        fs::OpenOptions::new()
    }

    pub(super) fn readable_by_others(_meta: &fs::Metadata) -> bool {
        false
    }
}

/// Creates `dir` and its parents; on unix the directories made are mode 0700.
pub(crate) fn create_dir(dir: &Path) -> std::io::Result<()> {
    imp::dir_builder().recursive(true).create(dir)
}

/// Creates `path`, which must not exist, for writing; on unix mode 0600.
pub(crate) fn create_new_file(path: &Path) -> std::io::Result<fs::File> {
    imp::open_options().write(true).create_new(true).open(path)
}

/// Whether the file's mode lets group or others read it (never on Windows: see the module docs).
pub(crate) fn readable_by_others(meta: &fs::Metadata) -> bool {
    imp::readable_by_others(meta)
}

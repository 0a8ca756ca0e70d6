//! Where a user's caches go.

use std::path::PathBuf;

/// The user's cache directory: `$XDG_CACHE_HOME` when set, else
/// `~/.cache` on Unix and `%LOCALAPPDATA%` on Windows; `None` when the
/// environment names none.
pub fn user_cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Some(dir.into());
    }
    #[cfg(windows)]
    return var("LOCALAPPDATA").map(PathBuf::from);
    #[cfg(not(windows))]
    return var("HOME").map(|home| PathBuf::from(home).join(".cache"));
}

//! Advisory file locks (flock) that several executor processes on one host agree on: the image
//! store, the git object cache, uid ranges, and janitor passes against sandbox boots.

use anyhow::{Context, Result};
use std::fs::File;
use std::path::Path;

/// A held lock; released when dropped (or when the process dies).
pub(crate) type Held = nix::fcntl::Flock<File>;

/// Takes the lock on `path` (created if missing, with its directory), exclusive or shared,
/// waiting as long as another holder keeps it.
pub(crate) fn lock(path: &Path, exclusive: bool) -> Result<Held> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let how = if exclusive { nix::fcntl::FlockArg::LockExclusive } else { nix::fcntl::FlockArg::LockShared };
    nix::fcntl::Flock::lock(f, how).map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
}

/// Takes the exclusive lock on `path` (created if missing) if nobody holds it: `None` when
/// another open file description holds it, shared or exclusive.
pub(crate) fn try_lock(path: &Path) -> Result<Option<Held>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(Some(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(anyhow::anyhow!("locking {}: {e}", path.display())),
    }
}

//! What this process read of the snapshots it restores from (their checked stream, their sealed
//! RAM), each read once: by snapshot id and checksum, a whole, checked value or why it was
//! corrupted. The table is held while one is read, so that VMs restored from one snapshot at
//! once wait for one read and all see its outcome: one of them that found the snapshot corrupted
//! removes it, and the others must not then fail for a file gone instead of saying why.

use anyhow::Result;
use std::sync::Mutex;

/// A snapshot's stream or RAM is not what was saved.
#[derive(Debug, thiserror::Error)]
#[error("snapshot {id} is corrupted: {what}")]
pub(crate) struct Corrupt {
    pub id: String,
    pub what: String,
}

/// How many entries are kept: the values of [`super::KEEP`] snapshots and as many verdicts.
const ENTRIES: usize = 2 * super::KEEP;

struct Entry<T> {
    id: String,
    sum: String,
    /// The value, or what was corrupted.
    value: Result<T, String>,
}

pub(crate) struct Loaded<T>(Mutex<Vec<Entry<T>>>);

impl<T: Clone> Loaded<T> {
    pub(crate) const fn new() -> Self {
        Loaded(Mutex::new(Vec::new()))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Vec<Entry<T>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of snapshot `id` with checksum `sum`: read by `read` the first time, its
    /// outcome kept when it is a value or a [`Corrupt`] verdict (not when the file could not be
    /// read: that may pass).
    pub(crate) fn get(&self, id: &str, sum: &str, read: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut table = self.table();
        if let Some(e) = table.iter().find(|e| e.id == id && e.sum == sum) {
            return e.value.clone().map_err(|what| Corrupt { id: id.into(), what }.into());
        }
        let value = match read() {
            Ok(v) => Ok(v),
            Err(e) => match e.downcast::<Corrupt>() {
                Ok(c) => Err(c.what),
                Err(e) => return Err(e),
            },
        };
        put(&mut table, Entry { id: id.into(), sum: sum.into(), value: value.clone() });
        value.map_err(|what| Corrupt { id: id.into(), what }.into())
    }

    /// Keeps `value` as snapshot `id`'s (with checksum `sum`), replacing what was kept of `id`.
    pub(crate) fn remember(&self, id: &str, sum: &str, value: T) {
        let mut table = self.table();
        table.retain(|e| e.id != id);
        put(&mut table, Entry { id: id.into(), sum: sum.into(), value: Ok(value) });
    }

    /// Drops the value kept of snapshot `id` (removed); a verdict stays, for restores of it
    /// still on their way.
    pub(crate) fn forget(&self, id: &str) {
        self.table().retain(|e| e.id != id || e.value.is_err());
    }
}

fn put<T>(table: &mut Vec<Entry<T>>, e: Entry<T>) {
    if table.len() >= ENTRIES {
        table.remove(0);
    }
    table.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn restores_at_once_read_once_and_share_a_corrupt_verdict_after_the_files_went() {
        let loaded: Arc<Loaded<u32>> = Arc::new(Loaded::new());
        let reads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (loaded, reads) = (loaded.clone(), reads.clone());
                std::thread::spawn(move || {
                    loaded.get("s", "x", || {
                        reads.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Err(Corrupt { id: "s".into(), what: "flipped".into() }.into())
                    })
                })
            })
            .collect();
        for t in threads {
            let e = t.join().unwrap().unwrap_err();
            assert!(e.downcast_ref::<Corrupt>().is_some(), "{e:#}");
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // Removed by the first to fail: the verdict stays for the others.
        loaded.forget("s");
        let e = loaded.get("s", "x", || anyhow::bail!("opening state: No such file")).unwrap_err();
        assert!(format!("{e:#}").contains("flipped"), "{e:#}");
        // A read that failed otherwise is not kept; a value is, until forgotten.
        assert!(loaded.get("t", "y", || anyhow::bail!("EIO")).is_err());
        assert_eq!(loaded.get("t", "y", || Ok(7)).unwrap(), 7);
        assert_eq!(loaded.get("t", "y", || Ok(8)).unwrap(), 7);
        loaded.forget("t");
        assert_eq!(loaded.get("t", "y", || Ok(9)).unwrap(), 9);
        // Another save under the same id (another checksum) is read again.
        assert_eq!(loaded.get("s", "z", || Ok(1)).unwrap(), 1);
    }
}

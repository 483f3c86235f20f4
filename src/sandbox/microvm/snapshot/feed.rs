//! A snapshot's stream (the devices' state) for the restoring QEMU (`-incoming fd:N`): read
//! once per process with its size and SHA-256 checked (loaded.rs), before QEMU starts, and
//! written from memory into the pipe: QEMU never starts a guest from a corrupted file, and a
//! file changed after the check is never read.

use anyhow::{Context, Result};
use sha2::Digest;
use std::io::{Read, Write};
use std::sync::Arc;

use super::loaded::{Corrupt, Loaded};
use super::Snapshot;

/// The checked streams (and corrupted verdicts) by snapshot id and stream checksum.
static STREAMS: Loaded<Arc<Vec<u8>>> = Loaded::new();

/// The stream of `snap`, read and checked the first time.
pub(crate) fn stream(snap: &Snapshot) -> Result<Arc<Vec<u8>>> {
    STREAMS.get(&snap.id, &snap.meta.sha256, || {
        let path = snap.state_path();
        let from = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        checked(&snap.id, from, &snap.meta.sha256, snap.meta.bytes).map(Arc::new)
    })
}

/// Drops the stream kept of snapshot `id` (removed).
pub(crate) fn forget(id: &str) {
    STREAMS.forget(id);
}

/// Writes a checked stream into `to` (the pipe to QEMU). Returns the bytes written.
pub(crate) fn feed(stream: &[u8], mut to: impl Write) -> Result<u64> {
    to.write_all(stream).context("writing the snapshot to QEMU")?;
    to.flush().context("writing the snapshot to QEMU")?;
    Ok(stream.len() as u64)
}

/// Reads the whole stream of `from`, no more than one byte past the `bytes` saved, and checks its
/// size and checksum.
fn checked(id: &str, from: impl Read, sha256: &str, bytes: u64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.min(64 << 20) as usize);
    from.take(bytes.saturating_add(1))
        .read_to_end(&mut out)
        .with_context(|| format!("reading snapshot {id}"))?;
    if out.len() as u64 != bytes {
        let what = match out.len() as u64 > bytes {
            true => format!("more than the {bytes} bytes saved"),
            false => format!("{} bytes where {bytes} were saved", out.len()),
        };
        return Err(Corrupt { id: id.into(), what }.into());
    }
    let sum = super::hex(&sha2::Sha256::digest(&out));
    if sum != sha256 {
        return Err(Corrupt { id: id.into(), what: format!("SHA-256 {sum} where {sha256} was saved") }.into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> String {
        super::super::hex(&sha2::Sha256::digest(b))
    }

    #[test]
    fn a_whole_stream_is_read_and_a_changed_or_cut_or_longer_one_is_corrupted() {
        let stream: Vec<u8> = (0..(3 * (1 << 20) + 123)).map(|i| (i % 251) as u8).collect();
        let n = stream.len() as u64;
        assert_eq!(checked("k", &stream[..], &sum(&stream), n).unwrap(), stream);
        let mut bad = stream.clone();
        bad[10] ^= 1;
        let e = checked("k", &bad[..], &sum(&stream), n).unwrap_err();
        assert!(format!("{e:#}").contains("SHA-256"), "{e:#}");
        let e = checked("k", &stream[..1000], &sum(&stream), n).unwrap_err();
        assert!(
            e.downcast_ref::<Corrupt>().is_some() && format!("{e:#}").contains("1000 bytes where"),
            "{e:#}"
        );
        let e = checked("k", &stream[..], &sum(&stream), n - 1).unwrap_err();
        assert!(format!("{e:#}").contains("more than the"), "{e:#}");
        let mut out = Vec::new();
        assert_eq!(feed(&stream, &mut out).unwrap(), n);
        assert_eq!(out, stream);
    }
}

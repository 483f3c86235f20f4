//! Feeding a snapshot's stream to the restoring QEMU through a pipe (`-incoming fd:N`),
//! checking its size and SHA-256 on the way: the last bytes are held back until both matched,
//! so that QEMU, which starts the guest only once the stream's end is read, never starts one
//! from a corrupted file; on a mismatch the pipe closes early and QEMU's load fails.

use anyhow::{Context, Result};
use sha2::Digest;
use std::io::{Read, Write};

use super::Snapshot;

/// The snapshot's stream is not what was saved.
#[derive(Debug, thiserror::Error)]
#[error("snapshot {id} is corrupted: {what}")]
pub(crate) struct Corrupt {
    pub id: String,
    pub what: String,
}

/// How much is read at a time, and held back at the end.
const CHUNK: usize = 1 << 20;

/// Writes the stream of `snap` into `to` (the pipe to QEMU), all but its last chunk, then that
/// chunk only if size and checksum are the saved ones. Returns the bytes written.
pub(crate) fn feed(snap: &Snapshot, to: impl Write) -> Result<u64> {
    let path = snap.state_path();
    let from = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    feed_from(&snap.id, from, &snap.meta.sha256, snap.meta.bytes, to)
}

fn feed_from(id: &str, mut from: impl Read, sha256: &str, bytes: u64, mut to: impl Write) -> Result<u64> {
    let mut hash = sha2::Sha256::new();
    let mut held: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("reading snapshot {id}")),
        };
        hash.update(&buf[..n]);
        total += n as u64;
        if !held.is_empty() {
            to.write_all(&held).context("writing the snapshot to QEMU")?;
        }
        held.clear();
        held.extend_from_slice(&buf[..n]);
    }
    let sum = super::hex(&hash.finalize());
    if total != bytes {
        return Err(Corrupt { id: id.into(), what: format!("{total} bytes where {bytes} were saved") }.into());
    }
    if sum != sha256 {
        return Err(Corrupt { id: id.into(), what: format!("SHA-256 {sum} where {sha256} was saved") }.into());
    }
    to.write_all(&held).context("writing the snapshot to QEMU")?;
    to.flush().context("writing the snapshot to QEMU")?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> String {
        super::super::hex(&sha2::Sha256::digest(b))
    }

    #[test]
    fn a_whole_stream_goes_through_and_a_corrupted_one_never_ends() {
        let stream: Vec<u8> = (0..(3 * CHUNK + 123)).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        assert_eq!(
            feed_from("k", &stream[..], &sum(&stream), stream.len() as u64, &mut out).unwrap(),
            stream.len() as u64
        );
        assert_eq!(out, stream);
        // One flipped byte: the last chunk is never written, so QEMU never reads the stream's end.
        let mut bad = stream.clone();
        bad[10] ^= 1;
        let mut out = Vec::new();
        let e = feed_from("k", &bad[..], &sum(&stream), stream.len() as u64, &mut out).unwrap_err();
        assert!(e.downcast_ref::<Corrupt>().is_some(), "{e:#}");
        assert!(out.len() < stream.len() - 123 + 1 && out.len() <= 3 * CHUNK, "{}", out.len());
        // Cut short.
        let mut out = Vec::new();
        let e = feed_from("k", &stream[..CHUNK], &sum(&stream), stream.len() as u64, &mut out).unwrap_err();
        assert!(format!("{e:#}").contains("bytes where"), "{e:#}");
        assert!(out.is_empty());
    }
}

//! Bytes of a log entry held in memory up to a threshold and past it in an unlinked temporary
//! file (the executor's `TMPDIR`), so that a step printing a 100 MiB line, or an entry resent
//! whole, costs disk rather than the executor's memory. Nothing is lost when the disk refuses:
//! the bytes then stay in memory.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// Bytes appended in order: `file[..file_len]` then `mem`.
pub(crate) struct Spool {
    spill_at: usize,
    file: Option<File>,
    file_len: u64,
    mem: Vec<u8>,
    /// The disk refused once: everything after stays in memory (the order must hold).
    refused: bool,
}

/// Read back from a spilled spool this much at a time.
const CHUNK: usize = 1 << 20;

impl Spool {
    pub(crate) fn new(spill_at: usize) -> Self {
        Spool { spill_at, file: None, file_len: 0, mem: Vec::new(), refused: false }
    }

    pub(crate) fn len(&self) -> usize {
        self.file_len as usize + self.mem.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether some of the bytes are on disk.
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> bool {
        self.file.is_some()
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.file.is_none() && !self.refused && self.mem.len() + data.len() > self.spill_at {
            match tempfile::tempfile() {
                Ok(f) => self.file = Some(f),
                Err(e) => self.refuse(&e),
            }
            if self.file.is_some() {
                let mem = std::mem::take(&mut self.mem);
                self.write_file(&mem);
            }
        }
        if self.file.is_some() && !self.refused && self.mem.is_empty() {
            self.write_file(data);
        } else {
            self.mem.extend_from_slice(data);
        }
    }

    /// Writes `data` after the file's bytes, or keeps it in memory when the disk refuses.
    fn write_file(&mut self, data: &[u8]) {
        let Some(f) = &mut self.file else {
            self.mem.extend_from_slice(data);
            return;
        };
        match f.write_all(data) {
            Ok(()) => self.file_len += data.len() as u64,
            Err(e) => {
                // What reached the file before the error is not counted: rewrite from where it was.
                let _ = f.set_len(self.file_len);
                self.refuse(&e);
                self.mem.extend_from_slice(data);
            }
        }
    }

    fn refuse(&mut self, e: &std::io::Error) {
        if !self.refused {
            tracing::warn!("a big log entry stays in memory: its spill file refused it: {e}");
        }
        self.refused = true;
    }

    /// Moves `other`'s bytes to the end of this one.
    pub(crate) fn append(&mut self, other: &mut Spool) {
        if let Some(f) = &other.file {
            let mut buf = vec![0u8; CHUNK.min(other.file_len as usize)];
            let mut at = 0u64;
            while at < other.file_len {
                let n = ((other.file_len - at) as usize).min(buf.len());
                if let Err(e) = f.read_exact_at(&mut buf[..n], at) {
                    // The file was written by this process and is unlinked: an error here is the
                    // disk's; say so in the entry rather than lose it silently.
                    tracing::warn!("reading back a spilled log line: {e}");
                    self.push(
                        format!(
                            "[executor: {} bytes of this line were lost on disk: {e}]",
                            other.file_len - at
                        )
                        .as_bytes(),
                    );
                    break;
                }
                self.push(&buf[..n]);
                at += n as u64;
            }
        }
        self.push(&other.mem);
        other.clear();
    }

    /// All the bytes, in one buffer (for a request's body).
    pub(crate) fn read_all(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len());
        if let Some(f) = &self.file {
            out.resize(self.file_len as usize, 0);
            f.read_exact_at(&mut out, 0)?;
        }
        out.extend_from_slice(&self.mem);
        Ok(out)
    }

    /// Empties it; a spill file goes with it.
    pub(crate) fn clear(&mut self) {
        self.file = None;
        self.file_len = 0;
        self.refused = false;
        if self.mem.capacity() > 256 << 10 {
            self.mem = Vec::new();
        } else {
            self.mem.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_past_the_threshold_and_reads_back_in_order() {
        let mut s = Spool::new(10);
        s.push(b"hello ");
        assert!(!s.spilled());
        s.push(b"world, ");
        assert!(s.spilled(), "13 bytes are past 10");
        s.push(b"again");
        assert_eq!(s.read_all().unwrap(), b"hello world, again");
        assert_eq!(s.len(), 18);
        let mut t = Spool::new(4);
        t.push(b">");
        t.append(&mut s);
        assert!(s.is_empty() && !s.spilled());
        assert_eq!(t.read_all().unwrap(), b">hello world, again");
        t.clear();
        assert!(t.is_empty() && !t.spilled());
        t.push(b"ab");
        assert_eq!(t.read_all().unwrap(), b"ab");
    }
}

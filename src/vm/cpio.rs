//! A minimal writer of the `newc` cpio format, the format of a Linux initramfs.

use std::io::{self, Write};

/// Writes cpio `newc` entries to `W`.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        CpioWriter { out, ino: 1, written: 0 }
    }

    fn header(&mut self, name: &str, mode: u32, size: usize) -> io::Result<()> {
        let namesize = name.len() + 1;
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, namesize, 0
        );
        self.ino += 1;
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    pub(crate) fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, 0o040755, 0)
    }

    pub(crate) fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, 0o100000 | (mode & 0o7777), data.len())?;
        self.put(data)?;
        self.pad()
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, 0o120777, target.len())?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// Writes the trailer and returns the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin").unwrap();
        w.file("bin/x", 0o755, b"abcde").unwrap();
        w.symlink("sh", "bin/x").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("abcde"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file header carries mode 0100755 and size 5.
        assert!(text.contains("000081ed"));
    }
}

//! A QMP connection to a VM's QEMU (a template being saved, a VM being restored).

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A QMP connection: one command at a time, events skipped.
pub(crate) struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub(crate) fn connect(sock: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(sock).context("connecting to QEMU's monitor")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp { r: BufReader::new(s.try_clone()?), w: s };
        q.read()?;
        q.cmd("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line).context("reading QEMU's monitor")? == 0 {
            bail!("QEMU's monitor closed");
        }
        serde_json::from_str(&line).context("QEMU's monitor said something that is not JSON")
    }

    pub(crate) fn cmd(&mut self, execute: &str, arguments: serde_json::Value) -> Result<serde_json::Value> {
        let mut line = serde_json::to_vec(&serde_json::json!({"execute": execute, "arguments": arguments}))?;
        line.push(b'\n');
        self.w.write_all(&line).context("writing to QEMU's monitor")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QEMU refused {execute}: {}", e.get("desc").and_then(|d| d.as_str()).unwrap_or("?"));
            }
        }
    }
}

/// `migrate-set-capabilities`' arguments that leave shared RAM out of the stream, on both ends.
pub(crate) fn ignore_shared() -> serde_json::Value {
    serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})
}

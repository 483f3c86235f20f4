//! The host <-> guest agent protocol, version 2: length-prefixed frames over the virtio-serial
//! port `executor.agent`. Shared by both ends so they cannot disagree; documented in
//! docs/sandbox-microvm.md.
//!
//! A frame is `u32 big-endian length || u8 kind || body`, where `length` counts the kind byte and
//! the body and never exceeds [`MAX_FRAME`]. Control frames carry a JSON body; data frames carry
//! a `u32 big-endian request id` followed by raw bytes.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{ErrorKind, Read, Write};

/// The protocol version both ends speak; a hello with another version is refused.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest frame either end accepts (kind byte plus body).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk put into one frame.
pub const MAX_CHUNK: usize = 64 << 10;
/// The virtio-serial port name the agent listens on.
pub const PORT_NAME: &str = "executor.agent";

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host -> guest and back: [`Hello`].
    Hello = 1,
    /// Host -> guest: [`RunRequest`].
    Run = 2,
    /// Guest -> host: data frame of the step's stdout.
    Stdout = 3,
    /// Guest -> host: data frame of the step's stderr.
    Stderr = 4,
    /// Guest -> host: [`ExitReport`].
    Exit = 5,
    /// Host -> guest: [`Control`] naming the request to stop.
    Cancel = 6,
    /// Host -> guest: [`SyncRequest`]; the guest answers with `SyncData` frames and one `SyncEnd`.
    Sync = 7,
    /// Guest -> host: data frame, a piece of a tar stream of `/data`.
    SyncData = 8,
    /// Guest -> host: [`SyncEnd`].
    SyncEnd = 9,
    /// Host -> guest: [`Control`]; the guest flushes its disks and powers off.
    Shutdown = 10,
    /// Guest -> host: [`ErrorReport`] for a request that could not be carried out.
    Error = 11,
    /// Guest -> host: data frame with no bytes, sent every second while a request runs.
    Alive = 12,
    /// Host -> guest: [`Control`]; a VM booted ahead of its job (`executor.workspace=2`) mounts
    /// its workspace disk at /data now, the host having just written the job's filesystem into it.
    Mount = 13,
    /// Guest -> host: [`Control`]; the workspace is mounted.
    Mounted = 14,
    /// Host -> guest: [`Reseed`]; a VM restored from a snapshot takes fresh entropy, the host's
    /// clock and its own machine id (guest/identity.rs). A template's agent
    /// (`executor.template=1`) refuses `Mount` and `Run` until it had one.
    Reseed = 15,
    /// Guest -> host: [`Control`]; the VM is reseeded.
    Reseeded = 16,
    /// Host -> guest: data frame, bytes for the standard input of a request run with
    /// [`RunRequest::stdin`]; one with no bytes closes it.
    Stdin = 17,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Run,
            3 => Stdout,
            4 => Stderr,
            5 => Exit,
            6 => Cancel,
            7 => Sync,
            8 => SyncData,
            9 => SyncEnd,
            10 => Shutdown,
            11 => Error,
            12 => Alive,
            13 => Mount,
            14 => Mounted,
            15 => Reseed,
            16 => Reseeded,
            17 => Stdin,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
    /// Chosen by the host; the guest echoes it, so frames of an earlier connection are told apart.
    pub nonce: u64,
    /// Guest only: milliseconds from the kernel's start to the agent's first instruction.
    #[serde(default)]
    pub start_ms: u64,
    /// Guest only: milliseconds from the kernel's start to the agent being ready.
    #[serde(default)]
    pub ready_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunRequest {
    pub id: u32,
    /// Index of the image disk the step runs in.
    pub image: u32,
    /// argv, run with the image as the root and the workspace at /data.
    pub argv: Vec<String>,
    /// Absolute working directory inside the step's root (below /data).
    pub cwd: String,
    /// `NAME=value` strings: the whole environment.
    pub env: Vec<String>,
    /// Who the step runs as (the image config's `User`); absent: root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<RunUser>,
    /// A step that runs in the guest's container engine (a `cliSteps` job's `src`): `image` is
    /// then the engine's disk, stacked under these disks, and these images are loaded into the
    /// engine first (guest/engine.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSetup>,
    /// A step that fails (exits non-zero or is killed) leaves its writable layer as the VM's
    /// kept layer ([`KEPT_LAYER`] at the top of /data, replacing an earlier one) for
    /// `executor debug` (`EXECUTOR_KEEP_FAILED`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_failed: bool,
    /// Runs over the kept layer instead of a fresh one, and leaves it there (`executor debug`):
    /// what the failed step wrote is there as it left it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub kept: bool,
    /// Standard input comes in [`Kind::Stdin`] frames; otherwise it is /dev/null.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin: bool,
    /// Runs on a terminal of this size, its output (both streams) coming as `Stdout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// The job's dependency caches (docs/caches.md), bound into the step's root at their paths:
    /// each an overlay the agent mounts once per VM (guest/caches.rs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<CacheBind>,
}

/// One path of a dependency cache in the guest: an overlay whose lower is directory `sub` of
/// image disk `disk` (a cache version's read-only disk; none: empty) and whose upper and work
/// directories are in `/data/<layer>` (so the workspace disk counts what the steps write, and
/// the layer comes back to the host with the workspace), bound at `target` in every step's root
/// (absolute in the root, or relative to /data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheBind {
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u32>,
    /// `p<N>`: the version tree's directory of this path.
    pub sub: String,
    /// `.executor-cache-<N>`.
    pub layer: String,
}

/// A `Sync`: the tar of /data, or with `cachesOnly` only the cache layers (`.executor-cache-*`)
/// that a promotion needs. In both, a cache layer's overlay whiteouts come as empty files named
/// `.wh.<name>` and an opaque directory holds an empty `.wh..wh..opq` (the OCI layer format):
/// the host keeps only files, directories and symlinks of what a guest sends.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncRequest {
    pub id: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub caches_only: bool,
}

/// The prefix of a cache layer's directory at the top of /data (host and guest).
pub const CACHE_LAYER_PREFIX: &str = ".executor-cache-";
/// The OCI layer format's whiteout prefix and opaque marker, which a cache layer's whiteouts
/// travel as from the guest.
pub const WHITEOUT_PREFIX: &str = ".wh.";
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// The kept layer's directory at the top of /data (see [`RunRequest::keep_failed`]).
pub const KEPT_LAYER: &str = ".executor-kept";

fn is_false(b: &bool) -> bool {
    !*b
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// What a step in the guest's container engine needs besides the engine's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineSetup {
    /// Disks stacked above the engine's in the step's root, highest first (the `src` binary).
    pub upper: Vec<u32>,
    /// Step images to load into the engine's store before the step starts.
    pub images: Vec<EngineImage>,
}

/// One image handed to the guest's engine: an image disk, the name it is loaded under and
/// the parts of its config the engine keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineImage {
    pub disk: u32,
    /// The names it is loaded under (the reference as the batch spec wrote it, normalized).
    pub names: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: String,
    #[serde(default)]
    pub user: String,
}

/// A step's uid, gid and supplementary groups inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunUser {
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Control {
    pub id: u32,
}

/// What makes a VM restored from a snapshot its own: host randomness, the host's clock, a
/// machine id and, for a VM with a network device, its own address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reseed {
    pub id: u32,
    /// 64 bytes from the host's RNG, hex.
    pub seed: String,
    /// The host's clock, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// 32 lowercase hex digits (`/etc/machine-id`).
    pub machine_id: String,
    /// The VM's network as `executor.net=` writes it (`<address>/<prefix>,<gateway>[,<resolver>
    /// ...]`), for a VM booted with `executor.nic=1`: the template's command line names no
    /// address, each restored VM gets its own here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExitReport {
    pub id: u32,
    /// The exit status, when the step exited.
    pub code: Option<i32>,
    /// The signal that killed it, otherwise.
    pub signal: Option<i32>,
    /// True when the step was stopped by a cancel request.
    #[serde(default)]
    pub canceled: bool,
    /// Microseconds the guest took to attach the job's caches in the step's root (the first
    /// step of a VM mounts each cache's overlay, later ones bind it); none without caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caches_us: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncEnd {
    pub id: u32,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ErrorReport {
    pub id: u32,
    pub message: String,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn json<T: Serialize>(kind: Kind, value: &T) -> Result<Frame> {
        Ok(Frame { kind, body: serde_json::to_vec(value).context("encoding an agent message")? })
    }

    pub fn data(kind: Kind, id: u32, bytes: &[u8]) -> Frame {
        let mut body = Vec::with_capacity(4 + bytes.len());
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(bytes);
        Frame { kind, body }
    }

    /// The JSON body of a control frame.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("agent {:?} message is malformed", self.kind))
    }

    /// The request id and bytes of a data frame.
    pub fn split_data(&self) -> Result<(u32, &[u8])> {
        if self.body.len() < 4 {
            bail!("agent {:?} frame is too short for a request id", self.kind);
        }
        let (id, rest) = self.body.split_at(4);
        Ok((u32::from_be_bytes([id[0], id[1], id[2], id[3]]), rest))
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let len = self.body.len() + 1;
        if len > MAX_FRAME {
            bail!("agent frame of {len} bytes exceeds the limit of {MAX_FRAME}");
        }
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    pub fn write_to(&self, w: &mut impl Write) -> Result<()> {
        let bytes = self.encode()?;
        w.write_all(&bytes).context("writing to the agent channel")?;
        w.flush().context("flushing the agent channel")
    }
}

/// Incremental frame decoder: feed it whatever bytes arrive, take whole frames out. It never
/// holds more than one frame's worth of bytes, so a guest that sends garbage costs at most
/// [`MAX_FRAME`] bytes of memory before it is refused.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many more bytes may be fed before the next frame must be complete.
    pub fn room(&self) -> usize {
        (4 + MAX_FRAME).saturating_sub(self.buf.len())
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `None` if more bytes are needed, or an error on garbage.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            bail!("agent sent a frame length of {len} bytes (allowed 1 to {MAX_FRAME})");
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let kind_byte = self.buf[4];
        let kind =
            Kind::from_u8(kind_byte).with_context(|| format!("agent sent unknown frame kind {kind_byte}"))?;
        let body = self.buf[5..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(Frame { kind, body }))
    }
}

/// Reads frames from a blocking reader (the guest side, where the host is trusted).
pub struct FrameReader<R> {
    inner: R,
    dec: Decoder,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, dec: Decoder::new() }
    }

    /// The next frame; `Ok(None)` at end of stream.
    pub fn read_frame(&mut self) -> Result<Option<Frame>> {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(Some(f));
            }
            let want = chunk.len().min(self.dec.room()).max(1);
            match self.inner.read(&mut chunk[..want]) {
                Ok(0) => return Ok(None),
                Ok(n) => self.dec.feed(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading from the agent channel"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_across_split_reads() {
        let hello =
            Frame::json(Kind::Hello, &Hello { version: 1, nonce: 7, start_ms: 0, ready_ms: 0 }).unwrap();
        let data = Frame::data(Kind::Stdout, 3, b"hello world");
        let mut bytes = hello.encode().unwrap();
        bytes.extend(data.encode().unwrap());
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        for b in bytes {
            dec.feed(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![hello.clone(), data]);
        assert_eq!(got[0].parse::<Hello>().unwrap().nonce, 7);
        assert_eq!(got[1].split_data().unwrap(), (3, &b"hello world"[..]));
    }

    #[test]
    fn garbage_is_refused_not_buffered() {
        let mut dec = Decoder::new();
        dec.feed(&[0xff, 0xff, 0xff, 0xff, 1]);
        assert!(dec.next_frame().unwrap_err().to_string().contains("frame length"));
        let mut dec = Decoder::new();
        dec.feed(&[0, 0, 0, 1, 99]);
        assert!(dec.next_frame().unwrap_err().to_string().contains("unknown frame kind 99"));
        let mut dec = Decoder::new();
        dec.feed(&[0, 0, 0, 0]);
        assert!(dec.next_frame().is_err());
        let f = Frame { kind: Kind::Stdout, body: vec![0; MAX_FRAME] };
        assert!(f.encode().is_err());
        assert!(Frame::data(Kind::Stdout, 1, b"").split_data().unwrap().1.is_empty());
        assert!(Frame { kind: Kind::Stdout, body: vec![1] }.split_data().is_err());
        assert!(Frame { kind: Kind::Exit, body: b"{nope".to_vec() }.parse::<ExitReport>().is_err());
    }

    #[test]
    fn an_exit_says_how_long_the_caches_took_only_when_there_were_some() {
        let with = ExitReport { id: 3, code: Some(0), signal: None, canceled: false, caches_us: Some(1500) };
        let f = Frame::json(Kind::Exit, &with).unwrap();
        assert!(String::from_utf8_lossy(&f.body).contains("\"cachesUs\":1500"));
        assert_eq!(f.parse::<ExitReport>().unwrap(), with);
        // An agent of this protocol built before the field: no figure, not an error.
        let older = Frame { kind: Kind::Exit, body: br#"{"id":3,"code":0,"signal":null}"#.to_vec() };
        assert_eq!(older.parse::<ExitReport>().unwrap().caches_us, None);
        let none = ExitReport { caches_us: None, ..with };
        assert!(!String::from_utf8_lossy(&Frame::json(Kind::Exit, &none).unwrap().body).contains("caches"));
    }
}

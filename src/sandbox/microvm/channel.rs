//! The host end of the agent channel: a unix socket that QEMU bridges to the guest's
//! virtio-serial port. Everything read from it is hostile: reads are bounded by the frame limit
//! and by time, and frames of an earlier connection are told apart by the hello nonce.

use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::guest::protocol::*;

/// How often the host says hello again while the agent does not answer. QEMU holds what the
/// host sends until the agent opens its port, so this is only a fallback; each hello sent is
/// answered once the agent runs.
const HELLO_RESEND: Duration = Duration::from_secs(2);
/// How long one write to the agent may wait for the guest to take it.
const WRITE_LIMIT: Duration = Duration::from_secs(10);

pub(crate) struct Channel {
    stream: UnixStream,
    dec: Decoder,
}

impl Channel {
    /// Connects to QEMU's socket, retrying until `timeout` (QEMU creates it as it starts). The
    /// socket is reached through an open handle on its directory, so that a long state directory
    /// does not hit the 108-byte limit of a socket address.
    pub(crate) fn connect(sock: &Path, timeout: Duration) -> Result<Channel> {
        Self::connect_while(sock, timeout, || true)
    }

    /// [`connect`](Self::connect) that gives up as soon as `alive` says the socket's server is
    /// gone (a QEMU that exited, or was killed by a pool that stops, accepts nothing ever).
    pub(crate) fn connect_while(
        sock: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Channel> {
        let start = Instant::now();
        let dir = sock.parent().unwrap_or(Path::new("."));
        let name = sock.file_name().with_context(|| format!("{} names no socket", sock.display()))?;
        let handle = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        let short = Path::new("/proc/self/fd").join(handle.as_raw_fd().to_string()).join(name);
        loop {
            match UnixStream::connect(&short) {
                Ok(stream) => {
                    // A guest that stops reading must not hold the host in a write forever.
                    stream
                        .set_write_timeout(Some(WRITE_LIMIT))
                        .context("setting the agent socket timeout")?;
                    return Ok(Channel { stream, dec: Decoder::new() });
                }
                Err(e) if start.elapsed() >= timeout || !alive() => {
                    return Err(e)
                        .with_context(|| format!("connecting to the agent socket {}", sock.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// A second handle that writes to the agent, for another thread (frames written through
    /// it must not interleave with [`Channel::send`]'s).
    pub(crate) fn writer(&self) -> Result<UnixStream> {
        self.stream.try_clone().context("duplicating the agent socket")
    }

    pub(crate) fn send(&mut self, frame: &Frame) -> Result<()> {
        let mut s = &self.stream;
        frame.write_to(&mut s)
    }

    /// The next frame within `timeout`; `None` when none came in time.
    pub(crate) fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>> {
        let until = Instant::now() + timeout;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(Some(f));
            }
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some((until - now).max(Duration::from_millis(1))))
                .context("setting the agent socket timeout")?;
            let want = buf.len().min(self.dec.room()).max(1);
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => bail!("the agent channel closed (the VM stopped)"),
                Ok(n) => self.dec.feed(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the agent channel"),
            }
        }
    }

    /// Says hello and waits for the agent's answer carrying the same nonce, dropping whatever an
    /// earlier connection left in the pipe. The agent also says hello unasked (nonce 0) when it
    /// opens its port; any hello that is not the answer makes the host say its own again at once
    /// (besides every [`HELLO_RESEND`]), in case what it sent before was lost.
    pub(crate) fn handshake(&mut self, timeout: Duration) -> Result<Hello> {
        let nonce: u64 = rand::random::<u64>().max(1);
        let until = Instant::now() + timeout;
        self.send(&Frame::json(
            Kind::Hello,
            &Hello { version: PROTOCOL_VERSION, nonce, start_ms: 0, ready_ms: 0 },
        )?)?;
        let mut last_sent = Instant::now();
        let mut resend = last_sent + HELLO_RESEND;
        loop {
            let now = Instant::now();
            if now >= until {
                bail!("the guest agent did not answer within {timeout:?}");
            }
            if now >= resend {
                self.send(&Frame::json(
                    Kind::Hello,
                    &Hello { version: PROTOCOL_VERSION, nonce, start_ms: 0, ready_ms: 0 },
                )?)?;
                last_sent = now;
                resend = now + HELLO_RESEND;
            }
            let wait = (until - now).min(resend.saturating_duration_since(now)).max(Duration::from_millis(1));
            if let Some(f) = self.recv(wait)? {
                if f.kind == Kind::Hello {
                    let h: Hello = f.parse()?;
                    if h.nonce != nonce {
                        // At most every 50 ms: a guest sending hellos in a loop sets no pace.
                        resend = resend.min(last_sent + Duration::from_millis(50));
                        continue;
                    }
                    if h.version != PROTOCOL_VERSION {
                        bail!(
                            "the guest agent speaks protocol {} (host speaks {PROTOCOL_VERSION}): its \
                             initramfs was built by another executor version; run `executor install vm`",
                            h.version
                        );
                    }
                    return Ok(h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket whose server is gone refuses every connection: `connect_while` stops trying as
    /// soon as `alive` says so, not at its timeout (an hour here).
    #[test]
    fn connect_gives_up_when_the_server_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("agent.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let mut asked = 0;
        let res = Channel::connect_while(&sock, Duration::from_secs(3600), || {
            asked += 1;
            asked < 3
        });
        let err = format!("{:#}", res.err().expect("no server"));
        assert!(err.contains("connecting to the agent socket"), "{err}");
        assert_eq!(asked, 3);
        // A live server is reached whatever `alive` would say.
        let l = std::os::unix::net::UnixListener::bind(d.path().join("live.sock")).unwrap();
        assert!(Channel::connect_while(&d.path().join("live.sock"), Duration::from_secs(1), || false).is_ok());
        drop(l);
    }
}

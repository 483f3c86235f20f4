//! Process output: which stream a piece came from, the sink that receives it, and a child's
//! stdout and stderr read on two threads into one channel, so a caller sees output in arrival
//! order while it also watches a deadline, a cancel or the child itself; and [`command`], the
//! one way to start a child, with an empty environment.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The variables every child of the executor gets from the executor's own environment: PATH,
/// so that the operator's choice of binaries holds. Nothing else: the shared secret, tokens and
/// settings (`EXECUTOR_*`), or whatever the service manager passed, stay in the executor.
pub const INHERITED: &[&str] = &["PATH"];

/// Proxy settings, for the children that download (`apt-get`, `debootstrap`), which pass them
/// on explicitly with [`Inherit::inherit`].
pub const PROXY: &[&str] =
    &["http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"];

/// `program` with an empty environment plus [`INHERITED`]: the only way this crate starts a child
/// process (a test keeps it so). Callers add what their child needs with `.env`.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    cmd.inherit(INHERITED);
    cmd
}

/// Passing named variables of the executor's environment on to a child.
pub trait Inherit {
    /// Adds each of `names` that the executor's environment has.
    fn inherit(&mut self, names: &[&str]) -> &mut Self;
}

impl Inherit for Command {
    fn inherit(&mut self, names: &[&str]) -> &mut Self {
        for name in names {
            if let Some(v) = std::env::var_os(name) {
                self.env(name, v);
            }
        }
        self
    }
}

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives a step's output as it arrives, in arrival order.
pub trait OutputSink {
    fn output(&mut self, stream: Stream, data: &[u8]);
    /// The step hit one of the job's limits; `what` names it (`memory limit of 200 MiB ...`).
    /// By default a line on the step's stderr; `run-steps` also puts it in the job's failure.
    fn limit_hit(&mut self, what: &str) {
        self.output(Stream::Stderr, format!("\nexecutor: the step hit the job's {what}\n").as_bytes());
    }
    /// A line of the executor's about the step (not the step's output); by default dropped.
    fn note(&mut self, _line: &str) {}
}

/// What [`Pipes::next`] saw.
pub enum PipeEvent {
    Data(Stream, Vec<u8>),
    /// Nothing within the timeout.
    Idle,
    /// Both pipes reached their end (or were never there).
    Closed,
}

pub struct Pipes {
    rx: mpsc::Receiver<Option<(Stream, Vec<u8>)>>,
    open: usize,
    readers: Vec<JoinHandle<()>>,
}

impl Pipes {
    /// Takes the child's piped stdout and stderr and starts reading them.
    pub fn spawn(child: &mut Child) -> Pipes {
        let (tx, rx) = mpsc::channel();
        let mut readers = Vec::new();
        for (stream, pipe) in [
            (Stream::Stdout, child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
            (Stream::Stderr, child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
        ] {
            let Some(mut pipe) = pipe else { continue };
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tx.send(Some((stream, buf[..n].to_vec()))).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tx.send(None);
            }));
        }
        Pipes { rx, open: readers.len(), readers }
    }

    /// Waits up to `timeout` for the next piece of output.
    pub fn next(&mut self, timeout: Duration) -> PipeEvent {
        while self.open > 0 {
            match self.rx.recv_timeout(timeout) {
                Ok(Some((s, data))) => return PipeEvent::Data(s, data),
                Ok(None) => self.open -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => return PipeEvent::Idle,
                Err(mpsc::RecvTimeoutError::Disconnected) => self.open = 0,
            }
        }
        PipeEvent::Closed
    }

    /// Waits for the reader threads (after the pipes closed, or the child was killed).
    pub fn join(self) {
        drop(self.rx);
        for r in self.readers {
            let _ = r.join();
        }
    }
}

//! Keeping a failed job's VM and attaching to it (`executor debug`, see sandbox/kept.rs).
//!
//! Kept: the VM itself, paused (QEMU stopped with SIGSTOP: no guest instruction runs; its memory
//! and disks stay), with the failed step's writable layer, which the agent kept as
//! `/data/.executor-kept` because the step ran with `keep_failed` (`EXECUTOR_KEEP_FAILED`); its
//! network goes (the TAP is deleted under QEMU, the slot, firewall entry and addresses freed), so
//! the guest's eth0 leads nowhere. Every process of the job died with its step.
//!
//! An attach resumes the VM, runs the shell as a request in the failed step's image over the kept
//! layer (what the step wrote is there, what the shell writes adds to it), with the step's user,
//! working directory and environment less secrets, on a terminal in the guest when the attach
//! has one, standard input forwarded; then pauses the VM again. SIGINT, SIGTERM or SIGHUP stop
//! the shell (the VM is paused again all the same). One attach at a time.

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use super::requests::{base_env, inside_data};
use super::{identity, net, printable, teardown, MicroVm, MARKER, SILENCE_LIMIT};
use crate::base::cancel::Cancel;
use crate::base::proc::{OutputSink, Stream};
use crate::guest::protocol::*;
use crate::sandbox::kept::KeptStep;
use crate::sandbox::{RecordDetails, SandboxRecord, StepEnd};

/// Held while someone is attached to the VM.
const ATTACH_LOCK: &str = "debug.lock";

/// The QEMU of `sandbox`, when it is still that VM's.
fn qemu_pid(sandbox: &SandboxRecord) -> Result<i32> {
    sandbox
        .pid
        .filter(|p| teardown::process_is(*p, &sandbox.name))
        .with_context(|| format!("the QEMU of VM {} is not running", sandbox.name))
}

fn signal(pid: i32, sig: Signal) -> Result<()> {
    kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to QEMU (pid {pid})"))
}

/// A paused VM resumed for an attach: paused again when dropped.
struct Resumed(i32);

impl Resumed {
    fn new(pid: i32) -> Result<Resumed> {
        signal(pid, Signal::SIGCONT)?;
        Ok(Resumed(pid))
    }
}

impl Drop for Resumed {
    fn drop(&mut self) {
        let _ = signal(self.0, Signal::SIGSTOP);
    }
}

/// Collects a probe's output.
#[derive(Default)]
struct Collect(Vec<u8>);

impl OutputSink for Collect {
    fn output(&mut self, _stream: Stream, data: &[u8]) {
        if self.0.len() < 4096 {
            self.0.extend_from_slice(data);
        }
    }
}

impl MicroVm {
    pub(super) fn keep_vm(&self, sandbox: &SandboxRecord) -> Result<SandboxRecord> {
        let mut d = Self::details(sandbox)?;
        let pid = qemu_pid(sandbox)?;
        // The agent kept the failed step's layer, or there is nothing to debug.
        let probe = RunRequest {
            id: rand::random::<u32>() % (u32::MAX - 1),
            image: u32::MAX,
            argv: vec!["/bin/sh".into(), "-c".into(), format!("test -d /data/{KEPT_LAYER}/upper")],
            cwd: "/".into(),
            env: base_env(),
            ..RunRequest::default()
        };
        let mut out = Collect::default();
        let cancel = Cancel::with_deadline(Some(Instant::now() + Duration::from_secs(30)));
        match self.request(sandbox, probe, &mut out, &cancel)? {
            StepEnd::Exited(0) => {}
            _ => bail!("VM {} has no failed step's layer to keep", sandbox.name),
        }
        // Its connection goes: an attach makes its own.
        drop(self.take_idle(sandbox, &d.socket));
        signal(pid, Signal::SIGSTOP)?;
        if let Some(n) = d.network.take() {
            // QEMU holds the TAP's descriptor: the link is deleted under it, then the rest goes
            // as after any VM.
            crate::network::netlink::Socket::route()
                .and_then(|mut s| s.del_link(&n.host_if))
                .with_context(|| format!("deleting the TAP {} of kept VM {}", n.host_if, sandbox.name))?;
            net::teardown(&self.opts, &n)
                .with_context(|| format!("removing the network of kept VM {}", sandbox.name))?;
        }
        let mut record = sandbox.clone();
        d.store(&mut record);
        Ok(record)
    }

    pub(super) fn attach_debug(
        &self,
        sandbox: &SandboxRecord,
        step: &KeptStep,
        command: Option<&str>,
        tty: bool,
    ) -> Result<i32> {
        let d = Self::details(sandbox)?;
        if !sandbox.state_dir.join(MARKER).is_file() {
            bail!("kept VM {} is gone", sandbox.name);
        }
        if d.network.is_some() {
            bail!("VM {} still has its network: it was not kept", sandbox.name);
        }
        let pid = qemu_pid(sandbox)?;
        let _held = crate::base::lock::try_lock(&sandbox.state_dir.join(ATTACH_LOCK))?
            .with_context(|| format!("someone is attached to VM {} already", sandbox.name))?;
        let image = d
            .images
            .iter()
            .position(|i| i.reference == step.image)
            .with_context(|| format!("kept VM {} has no disk of image {:?}", sandbox.name, step.image))?;
        let (mut env, user) = identity::step_identity(&self.opts.images_dir(), &step.image, &step.env)
            .with_context(|| format!("step {} in image {:?}", step.key, step.image))?;
        if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        let id = rand::random::<u32>() % (u32::MAX - 1);
        let req = RunRequest {
            id,
            image: image as u32,
            argv: match command {
                Some(c) => vec!["/bin/sh".into(), "-c".into(), c.into()],
                None => vec!["/bin/sh".into()],
            },
            cwd: inside_data(&step.dir)?,
            env,
            user,
            kept: true,
            stdin: true,
            tty: tty.then(terminal_size),
            ..RunRequest::default()
        };
        let resumed = Resumed::new(pid)?;
        let mut ch = self.connect(sandbox)?;
        ch.send(&Frame::json(Kind::Run, &req)?)?;
        let raw = if tty { Some(RawTerminal::enter()?) } else { None };
        let mut writer = ch.writer()?;
        // Detached: it ends with the process (a read of a terminal cannot be interrupted).
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 << 10];
            let mut input = std::io::stdin().lock();
            loop {
                let n = match input.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                if Frame::data(Kind::Stdin, id, &buf[..n]).write_to(&mut writer).is_err() || n == 0 {
                    return;
                }
            }
        });
        let stop = crate::base::cancel::signals().ok();
        let res = self.attached(sandbox, &mut ch, id, stop.as_ref());
        drop(raw);
        drop(ch);
        drop(resumed);
        res
    }

    /// The attached request's output to this process's, until its exit status.
    fn attached(
        &self,
        sandbox: &SandboxRecord,
        ch: &mut super::channel::Channel,
        id: u32,
        stop: Option<&std::sync::mpsc::Receiver<&'static str>>,
    ) -> Result<i32> {
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        let mut last_seen = Instant::now();
        let mut stopped = false;
        loop {
            if !stopped && stop.is_some_and(|s| s.try_recv().is_ok()) {
                ch.send(&Frame::json(Kind::Cancel, &Control { id })?)?;
                stopped = true;
            }
            if last_seen.elapsed() > SILENCE_LIMIT {
                bail!("the agent of VM {} was silent for {SILENCE_LIMIT:?}", sandbox.name);
            }
            let Some(f) = ch.recv(Duration::from_millis(20))? else { continue };
            match f.kind {
                Kind::Stdout | Kind::Stderr | Kind::Alive => {
                    let (fid, data) = f.split_data()?;
                    if fid != id {
                        continue;
                    }
                    last_seen = Instant::now();
                    let w: &mut dyn Write = if f.kind == Kind::Stderr { &mut err } else { &mut out };
                    let _ = w.write_all(data).and_then(|_| w.flush());
                }
                Kind::Exit => {
                    let r: ExitReport = f.parse()?;
                    if r.id == id {
                        return Ok(r.code.unwrap_or_else(|| 128 + r.signal.unwrap_or(0)));
                    }
                }
                Kind::Error => {
                    let r: ErrorReport = f.parse()?;
                    if r.id == id {
                        bail!("the agent of VM {}: {}", sandbox.name, printable(&r.message));
                    }
                }
                _ => {}
            }
        }
    }
}

/// This terminal's size (standard output's), 24x80 when it cannot be read.
fn terminal_size() -> TtySize {
    let (rows, cols) = crate::base::sys::window_size(1).unwrap_or((24, 80));
    TtySize { rows, cols }
}

/// Standard input in raw mode (keys go to the guest's terminal as typed, Ctrl-C included),
/// restored when dropped.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> Result<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            bail!("standard input is not a terminal");
        }
        let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("setting the terminal to raw mode")?;
        Ok(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}

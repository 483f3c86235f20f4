//! The end of a job network's teardown that need not hold the job up: reaping the job's resolver
//! (signalled by the teardown) and forgetting its address's connection-tracking entries (a walk
//! of the kernel's whole conntrack table, about 6 ms however few entries it holds). In a process
//! that lives on (`executor loop`, which holds [`defer_cleanup`]'s guard) they run on one
//! background thread, and the job's slot stays taken until they are done: the slot's next job,
//! given the same address, never inherits the old job's flows (`conntrack.rs`). A process that
//! may exit once its stage is done (`executor teardown`, `complete`, the janitor) does them
//! inline, before it frees the slot.

use anyhow::Result;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{dns, egress, JobNetwork};

/// What is left of a torn-down job network once it is off the job's path.
pub(super) struct Task {
    pub state_dir: PathBuf,
    pub net: JobNetwork,
    /// The job's resolver, signalled, perhaps not gone yet.
    pub resolver: Option<i32>,
    /// Forgets the flows of an address: `conntrack::forget` (the unit tests put their own).
    pub forget: fn(Ipv4Addr) -> Result<usize>,
}

struct Worker {
    state_dir: PathBuf,
    tx: mpsc::Sender<Task>,
    thread: std::thread::JoinHandle<()>,
}

static WORKER: Mutex<Option<Worker>> = Mutex::new(None);
/// The sandboxes whose cleanup is queued or running (their slots are still taken).
static PENDING: Mutex<Vec<String>> = Mutex::new(Vec::new());
static DONE: Condvar = Condvar::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Moves the end of the teardowns of `state_dir`'s job networks onto a background thread until
/// the guard is dropped, which waits for what is queued (held by `executor loop`; a stage run
/// alone does it inline, since its process may exit). The thread is in this thread's network
/// namespace, where the job networks are.
#[must_use]
pub fn defer_cleanup(state_dir: &Path) -> CleanupGuard {
    let (tx, rx) = mpsc::channel::<Task>();
    let thread = std::thread::Builder::new().name("network-cleanup".into()).spawn(move || {
        for task in rx {
            let _done = Done(task.net.sandbox.clone());
            run(&task);
        }
    });
    match thread {
        Ok(thread) => {
            let old = lock(&WORKER).replace(Worker { state_dir: state_dir.to_path_buf(), tx, thread });
            stop(old);
        }
        Err(e) => tracing::warn!("starting the network cleanup thread (teardowns clean up inline): {e}"),
    }
    CleanupGuard(())
}

/// Stops deferring when dropped, once every queued cleanup is done.
pub struct CleanupGuard(());

impl CleanupGuard {
    /// Waits until no cleanup is queued or running (`scripts/bench-network` times it); whether
    /// there was one.
    pub fn wait_idle(&self) -> bool {
        wait_idle()
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        let w = lock(&WORKER).take();
        stop(w);
    }
}

/// Closes a worker's queue and waits until it has done what was in it.
fn stop(w: Option<Worker>) {
    if let Some(w) = w {
        drop(w.tx);
        let _ = w.thread.join();
    }
}

/// Takes a finished (or panicked) task's sandbox off [`PENDING`].
struct Done(String);

impl Drop for Done {
    fn drop(&mut self) {
        let mut p = lock(&PENDING);
        if let Some(i) = p.iter().position(|n| *n == self.0) {
            p.remove(i);
        }
        DONE.notify_all();
    }
}

/// Whether the teardowns of `state_dir` defer their end.
pub(super) fn deferring(state_dir: &Path) -> bool {
    lock(&WORKER).as_ref().is_some_and(|w| w.state_dir == state_dir)
}

/// Queues a task; false when nothing defers for its state directory (the caller does it
/// inline).
pub(super) fn defer(task: Task) -> bool {
    let w = lock(&WORKER);
    let Some(w) = w.as_ref().filter(|w| w.state_dir == task.state_dir) else { return false };
    let name = task.net.sandbox.clone();
    lock(&PENDING).push(name.clone());
    if w.tx.send(task).is_err() {
        drop(Done(name));
        return false;
    }
    true
}

/// Whether the cleanup of `sandbox`'s network is queued or running (its slot is not free yet,
/// and not the janitor's either).
pub(super) fn is_pending(sandbox: &str) -> bool {
    lock(&PENDING).iter().any(|n| n == sandbox)
}

/// Waits until no cleanup is queued or running; whether there was one.
pub(super) fn wait_idle() -> bool {
    let mut p = lock(&PENDING);
    if p.is_empty() {
        return false;
    }
    while !p.is_empty() {
        p = DONE.wait(p).unwrap_or_else(|e| e.into_inner());
    }
    true
}

/// The deferred end of one teardown: the resolver reaped and what it wrote meanwhile taken out
/// of the sets, the address's flows forgotten (three tries), then the slot freed. When the
/// flows cannot be forgotten the slot stays taken and the janitor tries again (it does the
/// whole teardown inline) before it frees the slot.
fn run(task: &Task) {
    let net = &task.net;
    if let Some(pid) = task.resolver {
        dns::reap(pid);
    }
    // Nobody else freed the slot meanwhile (the janitor leaves pending slots alone): what follows
    // would otherwise touch the address of the slot's next job.
    if !super::slot_is(&task.state_dir, net) {
        return;
    }
    if task.resolver.is_some() {
        // An answer the resolver put into the sets after the teardown read them.
        if let Err(e) = egress::forget_answers(net.address) {
            tracing::warn!("taking the resolver's answers of sandbox {} out of the sets: {e:#}", net.sandbox);
        }
    }
    let mut delay = Duration::from_millis(20);
    for attempt in (1..=3).filter(|_| !net.address.is_unspecified()) {
        match (task.forget)(net.address) {
            Ok(_) => break,
            Err(e) if attempt < 3 => {
                tracing::debug!(
                    "forgetting the connection-tracking entries of sandbox {}: {e:#}",
                    net.sandbox
                );
                std::thread::sleep(delay);
                delay *= 5;
            }
            Err(e) => {
                return tracing::warn!(
                    "forgetting the connection-tracking entries of sandbox {} ({}): {e:#}; its network \
                     slot {} stays taken until the janitor forgets them",
                    net.sandbox,
                    net.address,
                    net.slot
                );
            }
        }
    }
    if task.resolver.is_some() {
        // A late reply counted after the record was read (nothing marks its flow any more).
        let _ = egress::forget_received(net.address);
    }
    if let Err(e) = super::free_slot(&task.state_dir, net) {
        tracing::warn!("{e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    static RELEASE: AtomicBool = AtomicBool::new(false);
    static CALLS: AtomicUsize = AtomicUsize::new(0);

    /// A forget that takes until the test releases it.
    fn slow_forget(_: Ipv4Addr) -> Result<usize> {
        while !RELEASE.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(1)
    }

    fn failing_forget(_: Ipv4Addr) -> Result<usize> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        anyhow::bail!("no conntrack today")
    }

    fn net(sandbox: &str, slot: u32) -> JobNetwork {
        JobNetwork {
            sandbox: sandbox.into(),
            slot,
            host_if: format!("exn{slot}"),
            gateway: Ipv4Addr::new(10, 255, 0, 1),
            address: Ipv4Addr::new(10, 255, 0, 2),
            dns: vec![],
        }
    }

    /// A deferred teardown keeps the slot taken until its flows are forgotten, and for good when
    /// they cannot be (the janitor's turn); dropping the guard waits for what is queued.
    #[test]
    fn the_slot_stays_taken_until_the_flows_are_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().to_path_buf();
        let slots = super::super::slots_dir(&state);
        std::fs::create_dir_all(&slots).unwrap();
        let (a, b) = (net("cleanup-a", 0), net("cleanup-b", 1));
        for n in [&a, &b] {
            std::fs::write(slots.join(n.slot.to_string()), super::super::slot_text(n)).unwrap();
        }
        let task = |net: &JobNetwork, forget: fn(Ipv4Addr) -> Result<usize>| Task {
            state_dir: state.clone(),
            net: net.clone(),
            resolver: None,
            forget,
        };
        // Nothing defers for this state directory yet: the task comes back for inline work.
        assert!(!defer(task(&a, slow_forget)));
        let guard = defer_cleanup(&state);
        assert!(deferring(&state));
        assert!(!deferring(Path::new("/elsewhere")));
        assert!(defer(task(&a, slow_forget)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(slots.join("0").exists(), "the slot was freed before its flows were forgotten");
        assert!(is_pending("cleanup-a"));
        RELEASE.store(true, Ordering::SeqCst);
        assert!(wait_idle());
        assert!(!slots.join("0").exists(), "the slot was not freed once its flows were forgotten");
        assert!(!is_pending("cleanup-a"));
        // A forget that keeps failing: three tries, then the slot stays taken.
        assert!(defer(task(&b, failing_forget)));
        drop(guard);
        assert_eq!(CALLS.load(Ordering::SeqCst), 3);
        assert!(slots.join("1").exists(), "a slot whose flows may remain was freed");
        assert!(!is_pending("cleanup-b"));
        assert!(!deferring(&state));
    }
}

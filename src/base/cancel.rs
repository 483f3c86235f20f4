//! Cancellation shared between a job's stages, its heartbeat and its sandbox: a cancel from the
//! coordinator, the job's deadline, or an executor shutdown.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why work was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelReason {
    /// The coordinator asked (`cancelIds`): reported with markFailed, recorded as canceled.
    Canceled,
    /// The job's deadline passed: reported with markErrored.
    Deadline,
    /// The executor is shutting down and the grace period is over.
    Shutdown,
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CancelReason::Canceled => "canceled",
            CancelReason::Deadline => "deadline",
            CancelReason::Shutdown => "shutdown",
        })
    }
}

impl CancelReason {
    /// Why the work stopped, in the words a job's log gives.
    pub fn describe(self) -> &'static str {
        match self {
            CancelReason::Canceled => "the job was canceled",
            CancelReason::Deadline => "the job reached its deadline",
            CancelReason::Shutdown => "the executor is shutting down",
        }
    }
}

/// Work stopped by a [`Cancel`] (a caller branches on it: no retry, no fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted: {}", .0.describe())]
pub struct Interrupted(pub CancelReason);

#[derive(Debug, Default)]
struct Inner {
    reason: Mutex<Option<CancelReason>>,
    cv: Condvar,
}

/// A cloneable cancellation token with an optional deadline.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
    deadline: Option<Instant>,
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token that also fires at `deadline`.
    pub fn with_deadline(deadline: Option<Instant>) -> Self {
        Cancel { inner: Arc::default(), deadline }
    }

    /// Cancels; the first reason sticks.
    pub fn cancel(&self, reason: CancelReason) {
        let mut r = self.inner.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.inner.cv.notify_all();
    }

    /// The reason, if cancelled or past the deadline.
    pub fn check(&self) -> Option<CancelReason> {
        let r = *self.inner.reason.lock().unwrap_or_else(|p| p.into_inner());
        r.or_else(|| match self.deadline {
            Some(d) if Instant::now() >= d => Some(CancelReason::Deadline),
            _ => None,
        })
    }

    /// Sleeps up to `timeout`, waking early when cancelled or at the deadline.
    pub fn wait(&self, timeout: Duration) -> Option<CancelReason> {
        let mut until = Instant::now() + timeout;
        if let Some(d) = self.deadline {
            until = until.min(d);
        }
        let mut r = self.inner.reason.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if r.is_some() {
                return *r;
            }
            let now = Instant::now();
            if now >= until {
                drop(r);
                return self.check();
            }
            r = self.inner.cv.wait_timeout(r, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Cancel {
    /// Runs the blocking `f` on a thread of its own and returns its result, or [`Interrupted`]
    /// within 100 ms of a cancel or the deadline. For calls that cannot be interrupted where
    /// they block (an HTTP request in flight): `f` is then left to end by itself (at its own
    /// timeout) and its result is dropped, so it must own what it uses.
    pub fn run_abandonable<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        if let Some(reason) = self.check() {
            return Err(Interrupted(reason).into());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _ = tx.send(f());
            })
            .map_err(|e| anyhow::anyhow!("starting the {name} thread: {e}"))?;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => return r,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("the {name} thread ended without an answer")
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(reason) = self.check() {
                        return Err(Interrupted(reason).into());
                    }
                }
            }
        }
    }
}

/// SIGTERM/SIGINT/SIGHUP as messages, without blocking them for child processes (SIGHUP is
/// Sourcegraph's stop signal too; left alone it would kill the process and strand its jobs).
pub(crate) fn signals() -> anyhow::Result<std::sync::mpsc::Receiver<&'static str>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (mut term, mut int, mut hup) = match (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::hangup()),
                ) {
                    (Ok(t), Ok(i), Ok(h)) => (t, i, h),
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    let name = tokio::select! {
                        _ = term.recv() => "SIGTERM",
                        _ = int.recv() => "SIGINT",
                        _ = hup.recv() => "SIGHUP",
                    };
                    if tx.send(name).is_err() {
                        return;
                    }
                }
            });
        })
        .map_err(|e| anyhow::anyhow!("starting the signal handler: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(rx),
        Ok(Err(e)) => anyhow::bail!("installing signal handlers: {e}"),
        Err(_) => anyhow::bail!("installing signal handlers failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_wakes_waiters_and_first_reason_sticks() {
        let c = Cancel::new();
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        c.cancel(CancelReason::Canceled);
        c.cancel(CancelReason::Shutdown);
        assert_eq!(t.join().unwrap(), Some(CancelReason::Canceled));
        assert_eq!(c.check(), Some(CancelReason::Canceled));
    }

    #[test]
    fn a_blocking_call_is_abandoned_at_a_cancel() {
        let c = Cancel::new();
        assert_eq!(c.run_abandonable("quick", || Ok(7)).unwrap(), 7);
        let c2 = c.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            c2.cancel(CancelReason::Canceled);
        });
        let t = Instant::now();
        let e = c
            .run_abandonable("slow", || {
                std::thread::sleep(Duration::from_secs(5));
                Ok(())
            })
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(e.downcast_ref::<Interrupted>(), Some(&Interrupted(CancelReason::Canceled)));
        assert_eq!(e.to_string(), "interrupted: the job was canceled");
        let late = Cancel::with_deadline(Some(Instant::now()));
        assert!(late.run_abandonable("late", || Ok(1)).is_err(), "a token already past is not run");
    }

    #[test]
    fn deadline_fires() {
        let c = Cancel::with_deadline(Some(Instant::now() + Duration::from_millis(30)));
        assert_eq!(c.check(), None);
        assert_eq!(c.wait(Duration::from_secs(5)), Some(CancelReason::Deadline));
    }
}

//! `executor loop`: the stages in-process for up to N jobs at once, with one heartbeat for all of
//! them (cancelIds stop a job, a job missing from knownIds is dropped), per-job deadlines, a
//! janitor, `EXECUTOR_NUM_TOTAL_JOBS` / `EXECUTOR_MAX_ACTIVE_TIME` for ephemeral hosts, and
//! Sourcegraph's shutdown on SIGTERM/SIGINT/SIGHUP: no more dequeues, the running jobs run to
//! their end; past `EXECUTOR_SHUTDOWN_GRACE` (unset: no limit) or on a second signal they are
//! stopped and torn down but not reported, so that the coordinator's stalled-job reset requeues
//! them (both Sourcegraph queues never retry an errored job). Logs go through the log facade; on
//! a terminal, a live view of the jobs, with the log's lines printed above it.

use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{error, info, warn};

use crate::api::{metrics, new_executor_name, Client};
use crate::base::cancel::{Cancel, CancelReason};
use crate::config::Settings;
use crate::document::{FailureKind, RunDocument};
use crate::sandbox::{RuntimeKind, WarmPool, WarmPoolRequest};
use crate::stage::{self, JobCtx, Stage};

/// On a terminal, one spinner per running job, with the log's lines printed above them.
#[derive(Clone)]
pub(crate) struct Ui {
    multi: Option<indicatif::MultiProgress>,
    /// Sends the log's lines through `multi` while a clone of this view lives.
    _routed: Option<Arc<crate::base::log::Routed>>,
}

impl Ui {
    pub(crate) fn new() -> Ui {
        use std::io::IsTerminal;
        let multi = std::io::stderr().is_terminal().then(indicatif::MultiProgress::new);
        let routed = multi.clone().map(|m| {
            Arc::new(crate::base::log::route_lines(move |line| {
                let _ = m.println(line);
            }))
        });
        Ui { multi, _routed: routed }
    }

    fn job_bar(&self, uid: &str) -> Option<indicatif::ProgressBar> {
        let m = self.multi.as_ref()?;
        let bar = m.add(indicatif::ProgressBar::new_spinner());
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{spinner} job {prefix}: {wide_msg} {elapsed}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(uid.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Some(bar)
    }
}

impl Default for Ui {
    fn default() -> Self {
        Ui::new()
    }
}

struct Slot {
    cancel: Cancel,
    /// The coordinator no longer lists it in knownIds: it runs on, out of the heartbeat.
    dropped: bool,
}

#[derive(Default)]
struct Running {
    jobs: HashMap<String, Slot>,
}

/// The concrete runtime for `settings.runtime`, checked to work here.
pub(crate) fn resolve_runtime(settings: &Settings) -> Result<RuntimeKind> {
    let rt = crate::sandbox::open_choice(settings.runtime, &settings.runtime_options())?;
    rt.check().with_context(|| format!("the {} runtime cannot run here", rt.name()))?;
    Ok(rt.kind())
}

/// One janitor pass: workspaces and sandboxes that no live job owns. `me` is this executor's
/// name and `live` the uids of the jobs it runs (its own other workspaces go at once); others'
/// go once their deadline is long past. Boots wait while a pass runs (`janitor_lock`).
pub(crate) fn janitor_pass(settings: &Settings, me: &str, live: &HashSet<String>) -> Result<Vec<String>> {
    janitor_pass_with(settings, me, || live.clone())
}

/// [`janitor_pass`] with the live jobs read once the janitor lock is held: a job dequeued while
/// the pass waited for the lock (boots hold it) is live by then.
pub(crate) fn janitor_pass_with(
    settings: &Settings,
    me: &str,
    live: impl FnOnce() -> HashSet<String>,
) -> Result<Vec<String>> {
    let grace = Duration::from_secs(60);
    let _lock = crate::workspace::janitor_lock(&settings.state_dir, true)?;
    // Sandboxes kept for `executor debug` whose time is up (or over the caps) go first; the
    // others' workspaces and sandboxes are owned as a live job's are.
    let kept = crate::sandbox::kept::sweep(
        &settings.runtime_options(),
        chrono::Utc::now(),
        &HashSet::new(),
        settings.keep_failed_max,
        settings.keep_failed_disk,
    );
    let mut live = live();
    live.extend(kept.live);
    let live = &live;
    let (removed, mut claimed) = crate::workspace::sweep(&settings.workspaces_dir(), me, live, grace)?;
    // Sandboxes booted ahead of demand (no job yet) of executors that still live.
    for name in RuntimeKind::ALL {
        if let Ok(rt) = crate::sandbox::open(name, &settings.runtime_options()) {
            claimed.extend(rt.booted_ahead()?);
        }
    }
    let mut out: Vec<String> = kept.released;
    out.extend(removed.iter().map(|p| format!("workspace {}", p.display())));
    match settings.templates().sweep() {
        Ok(gone) => out.extend(gone.iter().map(|p| format!("workspace template file {}", p.display()))),
        Err(e) => out.push(format!("workspace template janitor failed: {e:#}")),
    }
    for name in RuntimeKind::ALL {
        if let Ok(rt) = crate::sandbox::open(name, &settings.runtime_options()) {
            match rt.janitor(&settings.vm_prefix, &claimed) {
                Ok(names) => out.extend(names.into_iter().map(|n| format!("{name} sandbox {n}"))),
                Err(e) => out.push(format!("{name} janitor failed: {e:#}")),
            }
        }
    }
    // The dependency caches: leases of sandboxes gone, replaced and corrupted versions, the budget.
    let sandboxes = settings.runtime_options().sandboxes_dir();
    let caches = crate::cache::CacheStore::new(&settings.state_dir);
    match caches.prune(settings.cache_bytes, false, |s| !sandboxes.join(s).exists()) {
        Ok(gone) => out.extend(gone.iter().map(|g| {
            format!("cache version {} ({}, {})", g.version, crate::base::units::format_bytes(g.bytes), g.why)
        })),
        Err(e) => out.push(format!("cache janitor failed: {e:#}")),
    }
    // A few versions a pass are read in full against their manifests, each about once a day: a
    // corrupted one is a miss from then on, and the next pass removes it.
    match caches.verify_due(Duration::from_secs(24 * 3600), 4) {
        Ok(bad) => {
            out.extend(bad.iter().map(|(v, why)| format!("cache version {v} marked corrupted ({why})")))
        }
        Err(e) => out.push(format!("cache verification failed: {e:#}")),
    }
    // The image cache budget, after the sandboxes above gave back the images they used.
    if settings.image_cache_bytes > 0 {
        let store = crate::image::ImageStore::open(&settings.runtime_options().images_dir());
        match store.and_then(|s| s.prune(Some(settings.image_cache_bytes), false)) {
            Ok(r) => out.extend(r.images.iter().map(|i| {
                let size = crate::base::units::format_bytes(i.bytes);
                format!("image {} {} ({size}, over EXECUTOR_IMAGE_CACHE_SIZE)", i.digest, i.names.join(", "))
            })),
            Err(e) => out.push(format!("image prune failed: {e:#}")),
        }
        let vm_images = crate::vm::vm_dir(&settings.state_dir).join("images");
        let store = crate::image::ImageStore::open(&settings.runtime_options().images_dir());
        match store
            .and_then(|s| s.tree_digests())
            .and_then(|d| crate::sandbox::microvm::disk::remove_orphan_image_disks(&vm_images, &d, false))
        {
            Ok(gone) => {
                out.extend(gone.into_iter().map(|(f, _)| format!("VM image disk {f} (its image is gone)")))
            }
            Err(e) => out.push(format!("VM image disk sweep failed: {e:#}")),
        }
    }
    Ok(out)
}

/// Runs the loop until a stop condition; returns the exit status.
pub(crate) fn run(settings: Settings) -> Result<i32> {
    let settings = Arc::new(settings);
    let ui = Ui::new();
    let name = new_executor_name();
    // Held until this process ends, however it ends: a janitor (another executor's, or this
    // executor's after a restart) reclaims this one's workspaces and sandboxes at once then.
    crate::workspace::hold_lifetime(&settings.workspaces_dir(), &name)?;
    let client = settings.client(settings.frontend_url()?, &name)?;
    let runtime = resolve_runtime(&settings)?;
    if runtime == RuntimeKind::Shell {
        warn!("{}", crate::sandbox::shell::WARNING);
    }
    let sig = crate::base::cancel::signals()?;
    // Made once, before the first job needs it; a failure only means the first job runs mkfs.
    if let Err(e) =
        crate::workspace::prepare_blank_disk(&settings.workspaces_dir(), settings.limits().disk_bytes)
    {
        warn!("could not make the blank workspace disk ahead: {e:#}");
    }
    info!(
        "executor {name} polling {} at {} ({} runtime, up to {} jobs)",
        settings.queues.join(","),
        client.base_url(),
        runtime,
        settings.max_jobs
    );
    // The microvm runtime runs cliSteps with the installed src-cli: its version is the one the
    // instance should see in heartbeats.
    if runtime == RuntimeKind::Microvm {
        if let Ok(src) = crate::vm::src_cli::installed(&settings.state_dir) {
            crate::api::report_src_cli_version(src.version);
        }
    }
    // The end of each job network's teardown (its flows forgotten, its resolver reaped) runs
    // off the job's path, its slot taken until it is done; what is queued finishes before this
    // returns (network/cleanup.rs).
    let _cleanup = (settings.network.mode != crate::network::Mode::None && runtime != RuntimeKind::Shell)
        .then(|| crate::network::defer_cleanup(&settings.state_dir));
    // An allowlist job's resolver waits ahead of it (network/dns).
    let _spare = (settings.network.mode == crate::network::Mode::Allowlist && runtime != RuntimeKind::Shell)
        .then(|| crate::network::dns::keep_spare(&settings.state_dir));
    if let Some(s) = wait_for_coordinator(&settings, &client, &sig) {
        info!("{s} before the coordinator answered: exiting");
        crate::workspace::release_lifetime(&settings.workspaces_dir());
        return Ok(crate::base::exit::JOB_FAILED);
    }

    let pool = start_pool(&settings, runtime, &name)?;
    let running = Arc::new((Mutex::new(Running::default()), Condvar::new()));
    let stop_bg = Arc::new((Mutex::new(false), Condvar::new()));
    let heartbeat = spawn_heartbeat(&settings, &client, &name, &running, &stop_bg);
    let janitor = spawn_janitor(&settings, &name, &running, &stop_bg);
    let l = Loop { settings: settings.clone(), ui, client, runtime, sig, pool, running };

    let done = l.dequeue_until_stopped()?;
    l.drain(done.signal);
    for t in done.threads {
        let _ = t.join();
    }
    if let Some(p) = &l.pool {
        let n = p.drain();
        info!("VM pool: destroyed {n} idle VMs ({})", p.status_line());
    }
    {
        let (m, cv) = &*stop_bg;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
    let _ = heartbeat.join();
    let _ = janitor.join();
    // Nothing stays kept for debugging past the executor that kept it.
    for line in crate::sandbox::kept::release_all(&settings.runtime_options(), &name) {
        info!("released {line}");
    }
    info!("stopped after {} jobs", done.count);
    crate::workspace::release_lifetime(&settings.workspaces_dir());
    Ok(crate::base::exit::OK)
}

/// Pings until the coordinator answers (job routes need the executor to be known); the signal
/// that came first, if one did.
fn wait_for_coordinator(
    settings: &Settings,
    client: &Client,
    sig: &Receiver<&'static str>,
) -> Option<&'static str> {
    // The first failure says what failed and what to set, once; the retries that follow are
    // quiet unless the failure changes (a fixed proxy that now meets a certificate problem).
    let mut said: Option<String> = None;
    loop {
        match client.ping(&settings.queues, settings.multi_queue) {
            Ok(()) => {
                if said.is_some() {
                    info!("reached the coordinator at {}", client.base_url());
                }
                return None;
            }
            Err(e) => {
                let advice = e.advice();
                if said.as_ref() != Some(&advice.clone().unwrap_or_default()) {
                    match &advice {
                        Some(a) => warn!(
                            "cannot reach the coordinator at {} ({e}): {a}; retrying every second",
                            client.base_url()
                        ),
                        None => warn!(
                            "cannot reach the coordinator at {} ({e}); retrying every second",
                            client.base_url()
                        ),
                    }
                    said = Some(advice.unwrap_or_default());
                } else {
                    tracing::debug!("cannot reach the coordinator yet: {e}");
                }
            }
        }
        if let Ok(s) = sig.recv_timeout(Duration::from_secs(1)) {
            return Some(s);
        }
    }
}

/// How the dequeuing ended: the jobs dequeued, the signal that stopped it (if one did) and the
/// jobs' threads.
struct Dequeued {
    count: u64,
    signal: Option<&'static str>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What the loop's phases share once the coordinator answered.
struct Loop {
    settings: Arc<Settings>,
    ui: Ui,
    client: Client,
    runtime: RuntimeKind,
    sig: Receiver<&'static str>,
    pool: Option<Arc<dyn WarmPool>>,
    running: Arc<(Mutex<Running>, Condvar)>,
}

impl Loop {
    /// Dequeues and starts jobs until a signal, `EXECUTOR_NUM_TOTAL_JOBS` or
    /// `EXECUTOR_MAX_ACTIVE_TIME` stops it.
    fn dequeue_until_stopped(&self) -> Result<Dequeued> {
        let settings = &self.settings;
        let started = Instant::now();
        let mut dequeued: u64 = 0;
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        let long_poll = Duration::from_secs(2);
        let mut over_budget = false;
        let draining = |s: &'static str| {
            let until = match settings.shutdown_grace {
                Some(g) => {
                    format!("for up to {} (EXECUTOR_SHUTDOWN_GRACE)", crate::base::units::format_duration(g))
                }
                None => "until they end".to_string(),
            };
            info!("{s}: no more dequeues; waiting for the running jobs {until}; a second signal stops them");
            Some(s)
        };
        loop {
            if let Ok(s) = self.sig.try_recv() {
                return Ok(Dequeued { count: dequeued, signal: draining(s), threads });
            }
            if settings.num_total_jobs > 0 && dequeued >= settings.num_total_jobs {
                info!("dequeued {dequeued} jobs (EXECUTOR_NUM_TOTAL_JOBS): finishing");
                return Ok(Dequeued { count: dequeued, signal: None, threads });
            }
            if settings.max_active_time.is_some_and(|m| started.elapsed() >= m) {
                info!("EXECUTOR_MAX_ACTIVE_TIME reached: finishing");
                return Ok(Dequeued { count: dequeued, signal: None, threads });
            }
            if !self.has_room(&mut over_budget) {
                continue;
            }
            let (t, asked) = (Instant::now(), SystemTime::now());
            match stage::dequeue::run(settings, &self.client, self.runtime, Some(long_poll)) {
                Ok(Some(doc)) => {
                    dequeued += 1;
                    threads.retain(|t| !t.is_finished());
                    let asked = (asked, SystemTime::now());
                    threads.push(start_job(
                        settings,
                        doc,
                        asked,
                        &self.running,
                        &self.ui,
                        self.pool.as_ref(),
                    )?);
                    continue;
                }
                Ok(None) if t.elapsed() >= long_poll / 2 => continue,
                Ok(None) => {}
                Err(e) => {
                    metrics::registry().add(metrics::DEQUEUE_ERRORS, &[], 1.0);
                    warn!("dequeue failed: {e}")
                }
            }
            match self.sig.recv_timeout(settings.poll_interval) {
                Ok(s) => return Ok(Dequeued { count: dequeued, signal: draining(s), threads }),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(settings.poll_interval),
            }
        }
    }

    /// Whether another job may start now: fewer than `EXECUTOR_MAXIMUM_NUM_JOBS` run and the
    /// pool's memory budget admits one more. Waits up to 200 ms for a job to end when not.
    fn has_room(&self, over_budget: &mut bool) -> bool {
        let (m, cv) = &*self.running;
        let guard = m.lock().unwrap_or_else(|p| p.into_inner());
        let wait = |guard| {
            let _ = cv.wait_timeout(guard, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner());
            false
        };
        if guard.jobs.len() >= self.settings.max_jobs {
            return wait(guard);
        }
        if let Some(p) = &self.pool {
            if !p.admits(guard.jobs.len()) {
                if !*over_budget {
                    info!(
                        "memory budget ({}) reached with {} jobs and the idle pool: waiting for a job to end",
                        crate::base::units::format_bytes(p.budget_bytes()),
                        guard.jobs.len()
                    );
                    *over_budget = true;
                }
                return wait(guard);
            }
            *over_budget = false;
        }
        true
    }

    /// Waits for the running jobs to end: no more pool boots (the ready VMs stay for the jobs
    /// just dequeued); after a signal, a second signal or the grace period's end stops them,
    /// unreported: `complete` tears them down and leaves them to the coordinator's requeue.
    fn drain(&self, signal_seen: Option<&'static str>) {
        if let Some(p) = &self.pool {
            let n = p.stop_booting();
            if n > 0 {
                info!("VM pool: stopped {n} VMs being made ahead");
            }
        }
        let grace_end = signal_seen.and_then(|_| self.settings.shutdown_grace.map(|g| Instant::now() + g));
        let mut killed = false;
        loop {
            let n = self.running.0.lock().unwrap_or_else(|p| p.into_inner()).jobs.len();
            if n == 0 {
                return;
            }
            let second = self.sig.try_recv().ok();
            let grace_over = grace_end.is_some_and(|g| Instant::now() >= g);
            if !killed && (second.is_some() || grace_over) {
                let why = match second {
                    Some(s) => format!("second signal ({s})"),
                    None => "grace period over".to_string(),
                };
                warn!(
                    "{why}: stopping {n} running jobs without reporting them; the coordinator requeues \
                     them once their heartbeat stops (its stalled-job reset)"
                );
                for slot in self.running.0.lock().unwrap_or_else(|p| p.into_inner()).jobs.values() {
                    slot.cancel.cancel(CancelReason::Shutdown);
                }
                killed = true;
            }
            let (m, cv) = &*self.running;
            let guard = m.lock().unwrap_or_else(|p| p.into_inner());
            let _ = cv.wait_timeout(guard, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn wait_or_stop(stop: &(Mutex<bool>, Condvar), d: Duration) -> bool {
    let (m, cv) = stop;
    let g = m.lock().unwrap_or_else(|p| p.into_inner());
    let (g, _) = cv.wait_timeout_while(g, d, |s| !*s).unwrap_or_else(|p| p.into_inner());
    *g
}

fn spawn_heartbeat(
    settings: &Arc<Settings>,
    client: &Client,
    me: &str,
    running: &Arc<(Mutex<Running>, Condvar)>,
    stop: &Arc<(Mutex<bool>, Condvar)>,
) -> std::thread::JoinHandle<()> {
    let (settings, client, running, stop) = (settings.clone(), client.clone(), running.clone(), stop.clone());
    let me = me.to_string();
    std::thread::spawn(move || loop {
        let uids: Vec<String> = {
            let r = running.0.lock().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<String> =
                r.jobs.iter().filter(|(_, s)| !s.dropped).map(|(k, _)| k.clone()).collect();
            v.sort();
            v
        };
        let kept = kept_jobs(&settings, &me);
        match client.heartbeat_kept(&settings.queues, settings.multi_queue, &uids, &kept) {
            Ok(resp) => {
                release_kept(&settings, &resp.release_ids);
                let mut r = running.0.lock().unwrap_or_else(|p| p.into_inner());
                for id in &resp.cancel_ids {
                    if let Some(slot) = r.jobs.get(id) {
                        info!(job_id = %id, "canceled by the coordinator");
                        slot.cancel.cancel(CancelReason::Canceled);
                    }
                }
                for uid in &uids {
                    if !resp.known_ids.contains(uid) && !resp.cancel_ids.contains(uid) {
                        // The contract drops it from the heartbeat and lets it run; its final
                        // mark* will find it is no longer ours.
                        warn!(job_id = %uid, "the coordinator no longer knows it as ours; dropped");
                        if let Some(slot) = r.jobs.get_mut(uid) {
                            slot.dropped = true;
                        }
                    }
                }
            }
            Err(e) => {
                metrics::registry().add(metrics::HEARTBEAT_ERRORS, &[], 1.0);
                warn!("heartbeat failed: {e}")
            }
        }
        if wait_or_stop(&stop, settings.heartbeat_interval) {
            return;
        }
    })
}

/// The jobs this executor keeps for debugging, for its heartbeat.
fn kept_jobs(settings: &Settings, me: &str) -> Vec<crate::protocol::KeptJob> {
    crate::sandbox::kept::list(&settings.state_dir)
        .into_iter()
        .filter(|k| k.executor == me)
        .map(|k| crate::protocol::KeptJob {
            id: k.job_uid,
            until: k.until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })
        .collect()
}

/// Releases the kept sandboxes the coordinator asked to release (`executor queue release`).
fn release_kept(settings: &Settings, uids: &[String]) {
    if uids.is_empty() {
        return;
    }
    let Ok(_lock) = crate::workspace::janitor_lock(&settings.state_dir, true) else { return };
    let release: HashSet<String> = uids.iter().cloned().collect();
    let swept = crate::sandbox::kept::sweep(
        &settings.runtime_options(),
        chrono::Utc::now(),
        &release,
        settings.keep_failed_max,
        settings.keep_failed_disk,
    );
    for line in swept.released {
        info!("released {line}");
    }
}

fn spawn_janitor(
    settings: &Arc<Settings>,
    me: &str,
    running: &Arc<(Mutex<Running>, Condvar)>,
    stop: &Arc<(Mutex<bool>, Condvar)>,
) -> std::thread::JoinHandle<()> {
    let (settings, me, running, stop) = (settings.clone(), me.to_string(), running.clone(), stop.clone());
    std::thread::spawn(move || loop {
        let live = || -> HashSet<String> {
            running.0.lock().unwrap_or_else(|p| p.into_inner()).jobs.keys().cloned().collect()
        };
        match janitor_pass_with(&settings, &me, live) {
            Ok(removed) => {
                for r in removed {
                    info!("janitor: removed {r}");
                }
            }
            Err(e) => warn!("janitor: {e:#}"),
        }
        if wait_or_stop(&stop, settings.cleanup_interval.max(Duration::from_secs(1))) {
            return;
        }
    })
}

/// The sandboxes the loop's runtime boots ahead of demand (the microVM pool), when it boots
/// any and `EXECUTOR_VM_POOL_SIZE` (or the memory rule) asks for some; in network mode
/// `internet` they boot with their network made. The loop and the stages see them as a
/// [`WarmPool`].
fn start_pool(settings: &Settings, runtime: RuntimeKind, name: &str) -> Result<Option<Arc<dyn WarmPool>>> {
    let rt = crate::sandbox::open(runtime, &settings.runtime_options())?;
    if !rt.boots_ahead() {
        return Ok(None);
    }
    let (size, budget) = settings.vm_pool(runtime)?;
    let fmt = crate::base::units::format_bytes;
    if size == 0 {
        info!(
            "VM pool: off (size 0); memory budget {}, {} per job VM",
            fmt(budget.total_bytes),
            fmt(budget.job_bytes)
        );
        return Ok(None);
    }
    // A networked pool VM holds an address slot while it waits: jobs keep theirs first.
    let size = if settings.network.mode == crate::network::Mode::None {
        size
    } else {
        let free = (settings.network.slots() as usize).saturating_sub(settings.max_jobs);
        if free < size {
            warn!(
                "VM pool: {size} VMs asked, {free} fit: EXECUTOR_NETWORK_CIDR {} has {} job subnets \
                 and {} go to running jobs",
                settings.network.pool,
                settings.network.slots(),
                settings.max_jobs
            );
        }
        size.min(free)
    };
    if size == 0 {
        return Ok(None);
    }
    let pool = rt.start_warm_pool(WarmPoolRequest {
        size,
        prefix: settings.vm_prefix.clone(),
        owner: name.to_string(),
        limits: settings.limits(),
        coordinator: settings.frontend_url.clone(),
        budget_bytes: budget.total_bytes,
        job_bytes: budget.job_bytes,
        concurrency: settings.vm_pool_restores(),
    })?;
    if let Some(p) = &pool {
        info!(
            "{}; memory budget {}, {} per job VM",
            p.status_line(),
            fmt(budget.total_bytes),
            fmt(budget.job_bytes)
        );
    }
    Ok(pool)
}

/// `asked`: when the dequeue was sent and when its job came, for the job's trace.
fn start_job(
    settings: &Arc<Settings>,
    doc: RunDocument,
    asked: (SystemTime, SystemTime),
    running: &Arc<(Mutex<Running>, Condvar)>,
    ui: &Ui,
    pool: Option<&Arc<dyn WarmPool>>,
) -> Result<std::thread::JoinHandle<()>> {
    let uid = doc.job.uid.clone();
    let cancel = Cancel::with_deadline(stage::deadline_instant(&doc));
    // Sourcegraph's gauges: running jobs by queue, and job VMs (one per microvm job).
    let queue = doc.executor.queue.clone();
    let vms = if doc.executor.runtime == RuntimeKind::Microvm { 1.0 } else { 0.0 };
    metrics::registry().add(metrics::SG_PROCESSOR_HANDLERS, &[&queue], 1.0);
    metrics::registry().add(metrics::SG_VMS, &[], vms);
    {
        let mut r = running.0.lock().unwrap_or_else(|p| p.into_inner());
        r.jobs.insert(uid.clone(), Slot { cancel: cancel.clone(), dropped: false });
        metrics::registry().set(metrics::RUNNING, &[], r.jobs.len() as f64);
        if let Some(p) = pool {
            p.set_running_jobs(r.jobs.len());
        }
    }
    let (settings, running, ui, pool) = (settings.clone(), running.clone(), ui.clone(), pool.cloned());
    std::thread::Builder::new()
        .name(format!("job-{uid}"))
        .spawn(move || {
            run_job(&settings, doc, asked, cancel, &ui, pool.clone());
            metrics::registry().add(metrics::SG_PROCESSOR_HANDLERS, &[&queue], -1.0);
            metrics::registry().add(metrics::SG_VMS, &[], -vms);
            let (m, cv) = &*running;
            let mut r = m.lock().unwrap_or_else(|p| p.into_inner());
            r.jobs.remove(&uid);
            metrics::registry().set(metrics::RUNNING, &[], r.jobs.len() as f64);
            if let Some(p) = &pool {
                p.set_running_jobs(r.jobs.len());
            }
            drop(r);
            cv.notify_all();
            crate::base::sys::release_free_memory();
        })
        .context("starting a job thread")
}

fn run_job(
    settings: &Arc<Settings>,
    mut doc: RunDocument,
    asked: (SystemTime, SystemTime),
    cancel: Cancel,
    ui: &Ui,
    pool: Option<Arc<dyn WarmPool>>,
) {
    let uid = doc.job.uid.clone();
    let t0 = Instant::now();
    // Every line of the job's thread names the job.
    let job_span = tracing::error_span!("job", job_id = %uid, runtime = %doc.executor.runtime).entered();
    info!("dequeued ({} steps)", doc.job.steps.len());
    let mut ctx = match JobCtx::new(settings.clone(), &doc, Some(cancel)) {
        Ok(c) => c,
        Err(e) => {
            error!("cannot start: {e:#}");
            return;
        }
    };
    ctx.warm_pool = pool.clone();
    let trace = stage::traced::start(&ctx, &doc, asked.0, asked.1);
    let traced = trace.enter();
    let bar = ui.job_bar(&uid);
    if let Some(b) = bar.clone() {
        ctx.logger = ctx.logger.clone().on_entry(Arc::new(move |key: &str| b.set_message(key.to_string())));
    }
    // A sandbox that needs only the workspace's directory boots while the repository clones.
    let boot_early = ctx.runtime(&doc).is_ok_and(|rt| rt.boots_during_clone());
    for st in Stage::ALL {
        let _stage = tracing::error_span!("stage", stage = st.name()).entered();
        let res = match st {
            Stage::Complete => complete_with_retries(&ctx, &mut doc),
            Stage::PrepareWorkspace if boot_early => {
                stage::prepare_and_boot(&ctx, &mut doc).map(|_| stage::StageResult::Done)
            }
            Stage::VmBoot if boot_early => continue,
            _ => stage::run_stage(st, &ctx, &mut doc),
        };
        if let Err(e) = res {
            if st == Stage::Complete {
                error!("could not report: {e:#}");
            } else {
                doc.fail(st.name(), FailureKind::Errored, ctx.redact(&format!("{e:#}")));
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    drop(traced);
    stage::traced::finish(trace, &doc);
    let what = match (&doc.completion, &doc.outcome) {
        (Some(c), Some(f)) => format!("{} ({}: {})", c.reported, f.stage, f.message),
        (Some(c), None) => c.reported.clone(),
        (None, _) => "not reported".into(),
    };
    let outcome = doc.completion.as_ref().map_or("not_reported", |c| c.reported.as_str());
    metrics::registry().add(metrics::JOBS, &[&doc.executor.queue, outcome], 1.0);
    metrics::job_done(&doc.executor.queue, outcome, t0.elapsed().as_secs_f64());
    let lost = doc.completion.as_ref().is_some_and(|c| !c.accepted);
    info!(
        "{what}{} in {:.2}s",
        if lost { " (not accepted: the job is no longer ours)" } else { "" },
        t0.elapsed().as_secs_f64()
    );
    // The pool's state is the loop's, not the job's.
    drop(job_span);
    if let Some(p) = &pool {
        info!("{}", p.status_line());
    }
}

fn complete_with_retries(ctx: &JobCtx, doc: &mut RunDocument) -> Result<stage::StageResult> {
    let mut delay = Duration::from_secs(1);
    let mut attempt = 0;
    loop {
        match stage::run_stage(Stage::Complete, ctx, doc) {
            Ok(r) => return Ok(r),
            Err(e) if attempt < 4 => {
                warn!("reporting failed, retrying: {e:#}");
                std::thread::sleep(delay);
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

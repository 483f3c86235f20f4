//! What the agent does with the guest kernel before it can serve: loading the kernel modules
//! the initramfs lists and waiting for the devices they bring, with the boot's own timing
//! (`executor.debug=1`). Shared by the agent (agent.rs) and the network setup (net.rs).

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// Where the initramfs keeps the modules to load, and the file listing their load order.
pub(crate) const MODULES_DIR: &str = "/lib/modules/executor";
pub(crate) const MODULES_ORDER: &str = "/lib/modules/executor/order";
/// Modules loaded in the background once the agent answered the host's first hello (overlay:
/// steps need it, the boot does not), so that their load overlaps the host's own work.
pub(crate) const MODULES_LATE: &str = "/lib/modules/executor/late";

/// Milliseconds since the kernel started (CLOCK_BOOTTIME needs no /proc).
pub(crate) fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Loads the modules a list file names, in its order (a missing list is an empty one).
pub(crate) fn load_modules(list: &str) -> Result<()> {
    let order = match fs::read_to_string(list) {
        Ok(o) => o,
        Err(_) => return Ok(()),
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULES_DIR).join(name);
        let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let t = uptime_ms();
        match nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => bail!("loading module {name}: {e}"),
        }
        debug_time(&format!("module {name} loaded"), t);
    }
    Ok(())
}

/// Polls `f` every 5 ms until it gives a value, for at most `limit`.
pub(crate) fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("{what} did not appear within {limit:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Prints how long `what` took since `since` (`uptime_ms`) when the guest boots with
/// `executor.debug=1`.
pub(crate) fn debug_time(what: &str, since: u64) {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *DEBUG.get_or_init(|| super::boot::current().is_ok_and(|p| p.debug)) {
        tracing::info!("{what} after {} ms", uptime_ms().saturating_sub(since));
    }
}

//! `executor cache ...`: the host's dependency caches (docs/caches.md): list them, remove a key,
//! prune to the budget, verify every version against its manifest.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;

use crate::base::exit;
use crate::base::units::format_bytes;
use crate::cache::CacheStore;

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// State directory; the caches are its caches/ subdirectory
    #[arg(long, env = "EXECUTOR_STATE_DIR", default_value = "/var/lib/executor", global = true)]
    pub state_dir: PathBuf,
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List every cache version, least recently used first
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove the versions of a key (a prefix of 8 or more hex digits) that no running job uses
    Rm {
        /// The key, or its first 8 or more hex digits
        key: String,
    },
    /// Remove replaced and corrupted versions, then the least recently used beyond the budget;
    /// never a version a running job uses
    Prune {
        /// The budget [default: none]
        #[arg(long = "cache-size", env = "EXECUTOR_CACHE_SIZE", value_name = "SIZE")]
        cache_size: Option<String>,
        /// Remove every version no running job uses
        #[arg(long)]
        all: bool,
    },
    /// Check every version's files against its manifest; a version that differs is a miss from
    /// then on (exit status 1 when one was found)
    Verify,
}

pub(crate) fn run(args: CacheArgs) -> Result<i32> {
    let store = CacheStore::new(&args.state_dir);
    let mut out = std::io::stdout().lock();
    let sandboxes = args.state_dir.join("sandboxes");
    let gone = |s: &str| !sandboxes.join(s).exists();
    match args.command {
        CacheCommand::Ls { json } => {
            let list = store.list()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
                return Ok(exit::OK);
            }
            writeln!(
                out,
                "{:<20} {:<24} {:<10} {:>10} {:>8}  STATE",
                "KEY", "REPOSITORY", "PREFIX", "SIZE", "FILES"
            )?;
            for l in &list {
                let state = match (&l.bad, l.in_use, l.current) {
                    (Some(why), _, _) => why.clone(),
                    (None, true, true) => "current, in use".into(),
                    (None, true, false) => "replaced, in use".into(),
                    (None, false, true) => "current".into(),
                    (None, false, false) => "replaced".into(),
                };
                writeln!(
                    out,
                    "{:<20} {:<24} {:<10} {:>10} {:>8}  {state}",
                    &l.key[..l.key.len().min(20)],
                    l.repository,
                    l.prefix,
                    format_bytes(l.bytes),
                    l.files
                )?;
            }
        }
        CacheCommand::Rm { key } => {
            let (gone, kept) = store.remove(&key)?;
            for g in &gone {
                writeln!(out, "removed {} {}", g.version, format_bytes(g.bytes))?;
            }
            for k in &kept {
                writeln!(out, "kept {k} (in use)")?;
            }
            if gone.is_empty() && kept.is_empty() {
                anyhow::bail!("no cache key starts with {key}");
            }
        }
        CacheCommand::Prune { cache_size, all } => {
            let budget = crate::config::parse_size_setting("cache_bytes", cache_size.as_deref())?;
            for g in store.prune(budget, all, gone)? {
                writeln!(out, "removed {} {} ({})", g.version, format_bytes(g.bytes), g.why)?;
            }
        }
        CacheCommand::Verify => {
            let bad = store.verify()?;
            for (v, why) in &bad {
                writeln!(out, "corrupted {v}: {why}")?;
            }
            return Ok(if bad.is_empty() { exit::OK } else { exit::JOB_FAILED });
        }
    }
    Ok(exit::OK)
}

//! Runs `executor image ...`: parsed flags in, the store's answer on stdout.

use anyhow::Result;
use std::io::Write;

use super::ImageStore;
use crate::cli::image::{ImageArgs, ImageCommand};

/// Runs one `executor image` command and returns the exit status.
pub fn run(args: ImageArgs) -> Result<i32> {
    let store = ImageStore::open(&args.state_dir.join("images"))?;
    let mut out = std::io::stdout().lock();
    match args.command {
        ImageCommand::Import { name, file } => {
            let img = super::import::import(&store, &name, &file)?;
            writeln!(out, "{} {}", img.reference, img.digest)?;
        }
        ImageCommand::BuildBase { name, mirror } => {
            let img = super::build::build_base(&store, &name, mirror.as_deref())?;
            writeln!(out, "{} {}", img.reference, img.digest)?;
        }
        ImageCommand::BuildBusybox { name } => {
            let img = super::build::build_busybox(&store, &name)?;
            writeln!(out, "{} {}", img.reference, img.digest)?;
        }
        ImageCommand::Ls { json } => {
            let list = store.list()?;
            if json {
                serde_json::to_writer_pretty(&mut out, &list)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{:<30} {:<12} {:<19} {:>10}  CREATED", "NAME", "TAG", "DIGEST", "SIZE")?;
                for e in list {
                    let short = e.digest.trim_start_matches("sha256:").get(..12).unwrap_or("");
                    writeln!(
                        out,
                        "{:<30} {:<12} sha256:{short:<12} {:>10}  {}",
                        e.name,
                        e.tag,
                        human(e.size),
                        e.created
                    )?;
                }
            }
        }
        ImageCommand::Rm { name } => {
            let removed = store.remove(&name)?;
            writeln!(out, "removed {name}")?;
            for d in removed {
                writeln!(out, "deleted {d}")?;
            }
        }
    }
    Ok(crate::exit::OK)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

//! `executor image ...`: its clap types, and the command that runs them against the local image
//! store (parsed flags in, the store's answer on stdout).

use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// State directory; the store is its images/ subdirectory
    #[arg(long, env = "EXECUTOR_STATE_DIR", default_value = "/var/lib/executor", global = true)]
    pub state_dir: PathBuf,
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a `docker save` or OCI image-layout tarball as NAME
    Import {
        /// Image name, `name` or `name:tag`
        name: String,
        /// The tarball (plain or gzip)
        file: PathBuf,
    },
    /// Build a minimal Debian bookworm image (bash, coreutils, git, ca-certificates) with debootstrap
    BuildBase {
        /// Image name, `name` or `name:tag`
        name: String,
        /// Debian mirror for debootstrap (its default when unset)
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Build a tiny image from the host's static busybox, plus git and the libraries it links
    BuildBusybox {
        /// Image name, `name` or `name:tag`
        #[arg(default_value = "busybox")]
        name: String,
    },
    /// List the images in the store
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove an image name; its tree goes once no name and no live sandbox uses it
    Rm {
        /// Image name, `name` or `name:tag`
        name: String,
    },
}

use anyhow::Result;
use std::io::Write;

use crate::image::ImageStore;

/// Runs one `executor image` command and returns the exit status.
pub fn run(args: ImageArgs) -> Result<i32> {
    let store = ImageStore::open(&args.state_dir.join("images"))?;
    let mut out = std::io::stdout().lock();
    match args.command {
        ImageCommand::Import { name, file } => {
            let img = crate::image::import::import(&store, &name, &file)?;
            writeln!(out, "{} {}", img.reference, img.digest)?;
        }
        ImageCommand::BuildBase { name, mirror } => {
            let img = crate::image::build::build_base(&store, &name, mirror.as_deref())?;
            writeln!(out, "{} {}", img.reference, img.digest)?;
        }
        ImageCommand::BuildBusybox { name } => {
            let img = crate::image::build::build_busybox(&store, &name)?;
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
                        crate::base::units::format_bytes(e.size),
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
    Ok(crate::base::exit::OK)
}

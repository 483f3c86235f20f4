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
    /// Pull an image from a registry over the OCI distribution protocol
    ///
    /// REF is written as for Docker: `busybox` is `docker.io/library/busybox:latest`; pin with
    /// `name@sha256:...`. Prints the stored reference and the digest the reference resolved to.
    Pull {
        /// Image reference, `name[:tag]` or `name@sha256:<hex>`
        reference: String,
        /// Download again even when the store has the reference
        #[arg(long)]
        always: bool,
        #[command(flatten)]
        registry: RegistryArgs,
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
    /// Remove what no one needs, then least recently used pulled images until the store fits
    /// the budget; never an image a job uses. Prints what it removed and the bytes freed
    Prune {
        /// Only print what would be removed
        #[arg(long)]
        dry_run: bool,
        /// The budget [default: none: only unnamed trees and unneeded blobs go]
        #[arg(long = "image-cache-size", env = "EXECUTOR_IMAGE_CACHE_SIZE", value_name = "SIZE")]
        image_cache_size: Option<String>,
    },
}

/// How pulls reach registries: the registry settings of the table (`config::table`), shared by
/// `image pull` and the executor's automatic pulls.
#[derive(Debug, Clone, Default)]
pub struct RegistryArgs {
    raw: crate::config::Raw,
}

impl clap::FromArgMatches for RegistryArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(RegistryArgs { raw: crate::config::Raw::from_matches(m, crate::config::table::Group::Registry) })
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for RegistryArgs {
    fn group_id() -> Option<clap::Id> {
        Some(clap::Id::from("RegistryArgs"))
    }
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use crate::config::table::{args, Group, TABLE};
        let ids: Vec<&str> = TABLE.iter().filter(|s| s.group == Group::Registry).map(|s| s.id).collect();
        cmd.group(clap::ArgGroup::new("RegistryArgs").multiple(true).args(ids)).args(args(Group::Registry))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl RegistryArgs {
    /// The validated settings.
    pub fn settings(&self) -> Result<crate::image::pull::PullSettings> {
        crate::config::pull_settings(&crate::config::Values::parse(&self.raw)?)
    }
}

use anyhow::Result;
use std::io::Write;

use crate::image::ImageStore;

/// Runs one `executor image` command and returns the exit status.
pub(crate) fn run(args: ImageArgs) -> Result<i32> {
    crate::sandbox::private_state_dir(&args.state_dir)?;
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
        ImageCommand::Pull { reference, always, registry } => {
            let mut opts = registry.settings()?.options(None)?;
            opts.always = always;
            let pulled =
                crate::image::pull::pull(&store, &reference, &opts, &crate::base::cancel::Cancel::new())?;
            eprintln!(
                "pulled {} from {}: {} downloaded in {}",
                pulled.reference,
                pulled.registry,
                crate::base::units::format_bytes(pulled.bytes),
                crate::base::units::format_duration(pulled.elapsed)
            );
            writeln!(out, "{} {}", pulled.reference, pulled.digest)?;
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
        ImageCommand::Prune { dry_run, image_cache_size } => {
            let budget = crate::config::parse_cache_size(image_cache_size.as_deref())?;
            // Exclusive against boots, which record the images they use under it shared.
            let _janitor = crate::workspace::janitor_lock(&args.state_dir, true)?;
            let report = store.prune((budget > 0).then_some(budget), dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            let fmt = crate::base::units::format_bytes;
            for i in &report.images {
                let names = if i.names.is_empty() { "(no name)".to_string() } else { i.names.join(", ") };
                writeln!(out, "{verb} image {} {names} {}", i.digest, fmt(i.bytes))?;
            }
            for (b, bytes) in &report.blobs {
                writeln!(out, "{verb} blob {b} {}", fmt(*bytes))?;
            }
            for k in &report.kept {
                writeln!(out, "kept {k}")?;
            }
            // The microVM's disks of the removed images (copies of their trees) go with them.
            let mut digests = store.tree_digests()?;
            if dry_run {
                for i in &report.images {
                    digests.remove(&i.digest);
                }
            }
            let vm_images = crate::vm::vm_dir(&args.state_dir).join("images");
            let disks =
                crate::sandbox::microvm::disk::remove_orphan_image_disks(&vm_images, &digests, dry_run)?;
            for (f, bytes) in &disks {
                writeln!(out, "{verb} VM image disk {f} {}", fmt(*bytes))?;
            }
            let freed = if dry_run { "would free" } else { "freed" };
            writeln!(
                out,
                "{freed} {} ({} bytes); the store takes {} of {}",
                fmt(report.freed()),
                report.freed(),
                fmt(report.after),
                if budget > 0 { fmt(budget) } else { "no budget".into() }
            )?;
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

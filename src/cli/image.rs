//! The clap types of `executor image ...`: the local image store.

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

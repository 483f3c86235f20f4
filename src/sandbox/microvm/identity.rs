//! A step's identity in a microVM, as Docker (and the `oci` runtime) make it from the image
//! config: its `Env` under the step's variables, its `User` resolved in the image's own passwd
//! and group files, `HOME` from that user's entry (`/` without one). Computed on the host from
//! the image store's tree; the guest agent applies it (`RunRequest::env`, `RunRequest::user`).

use anyhow::{Context, Result};
use std::path::Path;

use crate::guest::protocol::RunUser;

/// PATH when neither the image nor the step sets one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment and user of a step of image `reference` (as the job names it).
pub(crate) fn step_identity(
    images_dir: &Path,
    reference: &str,
    step_env: &[String],
) -> Result<(Vec<String>, Option<RunUser>)> {
    let store = crate::image::ImageStore::open(images_dir)?;
    let img = store.resolve(reference)?;
    let who = crate::image::runas::resolve(&img.rootfs, &img.user)
        .with_context(|| format!("the user of image {reference:?}"))?;
    let env = crate::image::runas::environment(&img.env, step_env, DEFAULT_PATH, &who.home);
    let root = who.uid == 0 && who.gid == 0 && who.groups.is_empty();
    let user = (!root).then_some(RunUser { uid: who.uid, gid: who.gid, groups: who.groups });
    Ok((env, user))
}

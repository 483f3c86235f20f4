//! What the oci runtime records about a sandbox in the run document (the `details` of its
//! [`crate::sandbox::SandboxRecord`]): written at boot, read by every later operation.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::network::JobNetwork;
use crate::sandbox::{RecordDetails, RuntimeKind};

/// What the oci runtime records at boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciDetails {
    pub oci_runtime: String,
    pub workspace: PathBuf,
    /// Owner of the workspace before the job, restored by `sync_workspace`.
    pub workspace_uid: u32,
    pub workspace_gid: u32,
    /// Image reference -> resolved root tree.
    pub images: BTreeMap<String, OciImage>,
    pub cgroup: String,
    pub tmp_bytes: u64,
    pub max_file_bytes: u64,
    /// The workspace's own filesystem size (its disk limit), 0 when it is a plain directory.
    #[serde(default)]
    pub workspace_disk_bytes: u64,
    /// The job's CPU limit (0 for none).
    #[serde(default)]
    pub cpus: u32,
    /// Host uid/gid of container root: the sandbox's own range, or the image store's shared
    /// base when the host cannot make idmapped mounts.
    pub uid_base: u32,
    /// The job's own network (`EXECUTOR_NETWORK=internet`); `None`: loopback only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<JobNetwork>,
    /// The dependency caches attached to every step (caches.rs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<OciCache>,
}

/// One cache path attached to the steps: an overlay of the cache's tree under a layer of the
/// job's own, bound at `target` in each step's container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciCache {
    /// Absolute in the step's root, or relative to the workspace.
    pub target: String,
    /// The overlay, in the reach directory.
    pub merged: PathBuf,
    /// The layer directory's name at the top of the workspace (upper and work in it).
    pub layer: String,
}

impl RecordDetails for OciDetails {
    const RUNTIME: RuntimeKind = RuntimeKind::Oci;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciImage {
    pub digest: String,
    pub rootfs: PathBuf,
    /// The sandbox's idmapped, read-only mount of `rootfs` (`roots/<digest>` in its state
    /// directory), where the image's files belong to the sandbox's own uid range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// The image config's `Env`, `User` and `WorkingDir`, applied to every step as Docker does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workdir: String,
}

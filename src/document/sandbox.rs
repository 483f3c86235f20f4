//! The sandbox part of the run document: which runtime holds the job's sandbox and the facts
//! each runtime records about it (typed per runtime, so no stage decodes them again by hand).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A sandbox runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// No isolation: development only.
    Shell,
    /// A container per step (runc, crun or runsc).
    Oci,
    /// A QEMU microVM per job.
    Microvm,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Shell, RuntimeKind::Oci, RuntimeKind::Microvm];
    /// The isolating runtimes, in `auto`'s order of preference; `shell` is never picked automatically.
    pub const AUTO_ORDER: [RuntimeKind; 2] = [RuntimeKind::Microvm, RuntimeKind::Oci];

    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Shell => "shell",
            RuntimeKind::Oci => "oci",
            RuntimeKind::Microvm => "microvm",
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match RuntimeKind::ALL.into_iter().find(|k| k.name() == s) {
            Some(k) => Ok(k),
            None => bail!("{s:?} is not one of shell, oci, microvm"),
        }
    }
}

/// The runtime an operator asks for: one runtime, or `auto` (microvm where KVM works, else oci).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeChoice {
    #[default]
    Auto,
    Only(RuntimeKind),
}

impl std::fmt::Display for RuntimeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuntimeChoice::Auto => f.write_str("auto"),
            RuntimeChoice::Only(k) => k.fmt(f),
        }
    }
}

impl std::str::FromStr for RuntimeChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(RuntimeChoice::Auto),
            _ => match s.parse() {
                Ok(k) => Ok(RuntimeChoice::Only(k)),
                Err(_) => bail!("{s:?} is not one of auto, shell, oci, microvm"),
            },
        }
    }
}

/// A running sandbox as recorded in the run document. Everything a later process needs to reach
/// it again, and nothing secret. In JSON: `runtime`, `name`, `stateDir`, optional `pid`, and the
/// runtime's `details`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRecord", into = "RawRecord")]
pub struct SandboxRecord {
    /// `<prefix>-<uuid>`: the janitor removes sandboxes with the prefix that no live job owns.
    pub name: String,
    /// The runtime's private directory for this sandbox.
    pub state_dir: PathBuf,
    /// A long-lived process the sandbox depends on (QEMU, a supervisor), if any.
    pub pid: Option<i32>,
    /// The runtime, and what it recorded.
    pub details: SandboxDetails,
}

/// What each runtime records about its sandbox.
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxDetails {
    Shell(ShellDetails),
    /// `None` for a sandbox the janitor found without its record.
    Oci(Option<OciDetails>),
    /// `None` until QEMU has started.
    Microvm(Option<VmDetails>),
}

impl SandboxRecord {
    pub fn runtime(&self) -> RuntimeKind {
        match self.details {
            SandboxDetails::Shell(_) => RuntimeKind::Shell,
            SandboxDetails::Oci(_) => RuntimeKind::Oci,
            SandboxDetails::Microvm(_) => RuntimeKind::Microvm,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRecord {
    runtime: RuntimeKind,
    name: String,
    state_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<i32>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    details: serde_json::Value,
}

impl TryFrom<RawRecord> for SandboxRecord {
    type Error = String;
    fn try_from(raw: RawRecord) -> Result<Self, String> {
        fn typed<T: serde::de::DeserializeOwned>(
            v: serde_json::Value,
            rt: RuntimeKind,
        ) -> Result<Option<T>, String> {
            if v.is_null() {
                return Ok(None);
            }
            serde_json::from_value(v).map(Some).map_err(|e| format!("the {rt} sandbox's details: {e}"))
        }
        let details = match raw.runtime {
            RuntimeKind::Shell => SandboxDetails::Shell(
                typed(raw.details, raw.runtime)?.ok_or("the shell sandbox records no workspace")?,
            ),
            RuntimeKind::Oci => SandboxDetails::Oci(typed(raw.details, raw.runtime)?),
            RuntimeKind::Microvm => SandboxDetails::Microvm(typed(raw.details, raw.runtime)?),
        };
        Ok(SandboxRecord { name: raw.name, state_dir: raw.state_dir, pid: raw.pid, details })
    }
}

impl From<SandboxRecord> for RawRecord {
    fn from(r: SandboxRecord) -> RawRecord {
        let runtime = r.runtime();
        // These types are plain data: encoding them to a JSON value cannot fail.
        let value = |v: Result<serde_json::Value, serde_json::Error>| v.unwrap_or(serde_json::Value::Null);
        let details = match &r.details {
            SandboxDetails::Shell(d) => value(serde_json::to_value(d)),
            SandboxDetails::Oci(d) => value(serde_json::to_value(d)),
            SandboxDetails::Microvm(d) => value(serde_json::to_value(d)),
        };
        RawRecord { runtime, name: r.name, state_dir: r.state_dir, pid: r.pid, details }
    }
}

/// The shell runtime's record: where the steps run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShellDetails {
    pub workspace: PathBuf,
}

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
}

/// One job's network (see `network`): its namespace (named as the sandbox), its /30 slot in
/// the pool, the host end of its veth, its addresses and resolvers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobNetwork {
    pub sandbox: String,
    pub slot: u32,
    pub host_if: String,
    pub gateway: std::net::Ipv4Addr,
    pub address: std::net::Ipv4Addr,
    pub dns: Vec<std::net::Ipv4Addr>,
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

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where the cached boot probe proved it works, else TCG if allowed.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => bail!("unknown accelerator {s:?} (auto, kvm or tcg)"),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the microvm runtime records about one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmDetails {
    pub accel: Accel,
    pub accel_reason: String,
    pub socket: PathBuf,
    pub console: PathBuf,
    pub workspace_disk: PathBuf,
    pub workspace_disk_bytes: u64,
    /// Step images in disk order: the agent mounts disk `i` at `/images/i`.
    pub images: Vec<ImageDisk>,
    pub phases: BootPhases,
    /// The unprivileged user QEMU runs as (none: it runs as the executor's own user).
    #[serde(default)]
    pub qemu_user: Option<String>,
    /// The job's network (`EXECUTOR_NETWORK=internet`): its TAP device and addresses.
    #[serde(default)]
    pub network: Option<JobNetwork>,
    /// Set when the VM came from the pool of VMs booted ahead of demand (and so its boot was
    /// not on the job's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolClaim>,
}

/// How a job took a VM of the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolClaim {
    /// How long the VM had been waiting, booted, for a job.
    pub idle_ms: u64,
    /// Writing the job's workspace filesystem into the VM's disk.
    pub disk_build_ms: u64,
    /// The agent mounting it, asked over the channel of the boot.
    pub mount_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageDisk {
    pub reference: String,
    pub digest: String,
    pub disk: PathBuf,
}

/// Milliseconds spent in each boot phase.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BootPhases {
    pub disk_build_ms: u64,
    pub qemu_start_ms: u64,
    pub kernel_boot_ms: u64,
    pub agent_ready_ms: u64,
    pub total_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_names_round_trip() {
        for k in RuntimeKind::ALL {
            assert_eq!(k.name().parse::<RuntimeKind>().unwrap(), k);
            assert_eq!(k.to_string().parse::<RuntimeChoice>().unwrap(), RuntimeChoice::Only(k));
        }
        assert_eq!("auto".parse::<RuntimeChoice>().unwrap(), RuntimeChoice::Auto);
        assert!("docker"
            .parse::<RuntimeChoice>()
            .unwrap_err()
            .to_string()
            .contains("auto, shell, oci, microvm"));
        assert!("auto".parse::<RuntimeKind>().is_err());
    }

    #[test]
    fn records_keep_their_json_shape_and_types() {
        let rec = SandboxRecord {
            name: "executor-1".into(),
            state_dir: "/s/executor-1".into(),
            pid: None,
            details: SandboxDetails::Shell(ShellDetails { workspace: "/w".into() }),
        };
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"runtime": "shell", "name": "executor-1", "stateDir": "/s/executor-1",
                               "details": {"workspace": "/w"}})
        );
        assert_eq!(serde_json::from_value::<SandboxRecord>(v).unwrap(), rec);
        let booting = serde_json::json!({"runtime": "microvm", "name": "n", "stateDir": "/s", "pid": 7});
        let rec: SandboxRecord = serde_json::from_value(booting.clone()).unwrap();
        assert_eq!(rec.details, SandboxDetails::Microvm(None));
        assert_eq!(serde_json::to_value(&rec).unwrap(), booting);
        let wrong = serde_json::json!({"runtime": "oci", "name": "n", "stateDir": "/s", "details": {"x": 1}});
        let err = serde_json::from_value::<SandboxRecord>(wrong).unwrap_err().to_string();
        assert!(err.contains("oci sandbox's details"), "{err}");
        let unknown = serde_json::json!({"runtime": "docker", "name": "n", "stateDir": "/s"});
        assert!(serde_json::from_value::<SandboxRecord>(unknown).is_err());
    }
}

//! Where a job's steps upload to besides the coordinator: a code-intel job's `upload` step posts
//! to `SRC_ENDPOINT`, the instance's `executors.frontendURL`, which need not be the URL this
//! executor polls. `vm-boot` asks the runtime to let the sandbox reach those hosts as it
//! reaches the coordinator, and says in the job's log when an upload cannot work.

use crate::network::{policy, Mode};
use crate::protocol::Job;

/// The environment variable that names the instance a step's `src` talks to.
pub(crate) const SRC_ENDPOINT: &str = "SRC_ENDPOINT";

/// What `vm-boot` does about the job's upload endpoints.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Endpoints {
    /// The URLs the sandbox must be allowed to reach besides the coordinator's.
    pub allow: Vec<String>,
    /// Lines for the boot's log entry: why an upload cannot work and what to set.
    pub notes: Vec<String>,
}

/// The job's `SRC_ENDPOINT` values, each with the key of its first step.
fn declared(job: &Job) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, step) in job.docker_steps.iter().enumerate() {
        for value in step.env.iter().filter_map(|e| e.strip_prefix(SRC_ENDPOINT)?.strip_prefix('=')) {
            if !value.is_empty() && !out.iter().any(|(_, v)| v == value) {
                out.push((super::run_steps::step_key(&step.key, i), value.to_string()));
            }
        }
    }
    out
}

/// Resolves the job's upload endpoints now (as the coordinator's URL is, at boot) for a sandbox
/// of network `mode`: those that reach addresses other than the coordinator's are to be allowed;
/// one that cannot work (no network, loopback only, no such host) gets a note.
pub(crate) fn plan(job: &Job, mode: Mode, coordinator: &str) -> Endpoints {
    let mut out = Endpoints::default();
    let declared = declared(job);
    if declared.is_empty() {
        return out;
    }
    if mode == Mode::None {
        for (key, url) in declared {
            out.notes.push(format!(
                "{key} uploads to {SRC_ENDPOINT}={url}, but the job has no network (EXECUTOR_NETWORK=none): \
                 the upload cannot reach the instance. Set EXECUTOR_NETWORK=internet on this executor."
            ));
        }
        return out;
    }
    let coordinator = policy::url_target(coordinator).ok().flatten();
    for (key, url) in declared {
        match policy::url_target(&url) {
            Ok(Some(t)) if Some(&t) == coordinator.as_ref() => {}
            Ok(Some(_)) => out.allow.push(url),
            Ok(None) => out.notes.push(format!(
                "{key} uploads to {SRC_ENDPOINT}={url}, which resolves only to loopback, and no \
                 sandbox reaches this host's loopback: the upload cannot work. Set the instance's \
                 site configuration executors.frontendURL to an address of the instance that jobs \
                 can reach (not localhost)."
            )),
            Err(e) => out.notes.push(format!(
                "{key} uploads to {SRC_ENDPOINT}={url}, which this host cannot turn into an address ({e:#}): the \
                 upload cannot reach the instance. Set the instance's site configuration \
                 executors.frontendURL to a name this host resolves, or give this host a resolver \
                 that knows it."
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DockerStep;

    fn job(envs: &[&[&str]]) -> Job {
        let mut j = Job::default();
        for (i, env) in envs.iter().enumerate() {
            j.docker_steps.push(DockerStep {
                key: if i == 0 { "indexer".into() } else { "upload".into() },
                env: env.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            });
        }
        j
    }

    #[test]
    fn endpoints_are_allowed_or_explained() {
        let j = job(&[&["VM_CPUS=4"], &["SRC_ENDPOINT=http://192.0.2.7:3080", "SRC_HEADER_AUTHORIZATION=x"]]);
        let got = plan(&j, Mode::Internet, "http://127.0.0.1:3080");
        assert_eq!(got, Endpoints { allow: vec!["http://192.0.2.7:3080".into()], notes: vec![] });
        // The coordinator's own address and port is allowed already.
        assert_eq!(plan(&j, Mode::Internet, "http://192.0.2.7:3080"), Endpoints::default());
        let none = plan(&j, Mode::None, "http://127.0.0.1:3080");
        assert!(none.allow.is_empty());
        assert_eq!(none.notes.len(), 1);
        assert!(none.notes[0].starts_with("step.docker.upload uploads to SRC_ENDPOINT=http://192.0.2.7:3080"));
        assert!(none.notes[0].contains("Set EXECUTOR_NETWORK=internet"), "{}", none.notes[0]);
        let lo =
            plan(&job(&[&[], &["SRC_ENDPOINT=http://localhost:3080"]]), Mode::Internet, "http://192.0.2.7");
        assert!(lo.allow.is_empty());
        assert!(lo.notes[0].contains("resolves only to loopback"), "{:?}", lo.notes);
        assert!(lo.notes[0].contains("executors.frontendURL"));
        let bad = plan(&job(&[&[], &["SRC_ENDPOINT=nonsense"]]), Mode::Internet, "http://192.0.2.7");
        assert!(bad.notes[0].contains("cannot turn into an address"), "{:?}", bad.notes);
        assert_eq!(
            plan(&job(&[&["A=1"]]), Mode::None, "http://x"),
            Endpoints::default(),
            "no upload, no note"
        );
    }
}

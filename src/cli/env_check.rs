//! Reports `EXECUTOR_*` variables this executor does not read: a typo is named with the closest
//! known variable, and a Sourcegraph variable deliberately not supported (its `EXECUTOR_*` ones
//! and its Kubernetes runtime's `KUBERNETES_*` ones) with what to use instead (Sourcegraph's
//! executor ignores unknown variables silently; an operator moving from it keeps the same
//! environment file and should see what has no effect).

/// Variables read outside the settings table and the clap definitions.
const READ_DIRECTLY: &[&str] =
    &["EXECUTOR_FRONTEND_PASSWORD", "EXECUTOR_QUEUE_ADMIN_TOKEN", "EXECUTOR_VM_DEBUG"];

/// Prefixes of variables that belong to something else (the test suite).
const OTHER_PREFIXES: &[&str] = &["EXECUTOR_TEST_"];

/// Sourcegraph variables (or prefixes, ending in `_`) this executor deliberately does not support.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "EXECUTOR_DOCKER_HOST_MOUNT_PATH",
        "steps run in this executor's own sandboxes, not through a Docker daemon",
    ),
    ("EXECUTOR_DOCKER_ADD_HOST_GATEWAY", "a sandbox never reaches the executor's host"),
    (
        "EXECUTOR_DOCKER_ADDITIONAL_MOUNTS",
        "a sandbox sees only its workspace: no host paths are mounted into it",
    ),
    ("EXECUTOR_FIRECRACKER_IMAGE", "the microvm runtime boots the guest `executor install vm` prepares"),
    (
        "EXECUTOR_FIRECRACKER_KERNEL_IMAGE",
        "the microvm runtime boots the guest `executor install vm` prepares",
    ),
    (
        "EXECUTOR_FIRECRACKER_SANDBOX_IMAGE",
        "the microvm runtime boots the guest `executor install vm` prepares",
    ),
    ("EXECUTOR_KUBERNETES_", NO_KUBERNETES),
];

const NO_KUBERNETES: &str = "there is no Kubernetes runtime: jobs run in this executor's own sandboxes \
     (EXECUTOR_RUNTIME=oci or microvm), wherever it runs";

/// Variables of Sourcegraph's Kubernetes runtime without the `EXECUTOR_` prefix (its config.go).
const SOURCEGRAPH_KUBERNETES: &[&str] = &[
    "KUBERNETES_JOB_DEADLINE",
    "KUBERNETES_KEEP_JOBS",
    "KUBERNETES_RUN_AS_USER",
    "KUBERNETES_RUN_AS_GROUP",
    "KUBERNETES_FS_GROUP",
    "KUBERNETES_SINGLE_JOB_POD",
    "KUBERNETES_JOB_VOLUME_TYPE",
    "KUBERNETES_JOB_VOLUME_SIZE",
    "KUBERNETES_ADDITIONAL_JOB_VOLUMES",
    "KUBERNETES_ADDITIONAL_JOB_VOLUME_MOUNTS",
    "KUBERNETES_SINGLE_JOB_STEP_IMAGE",
    "KUBERNETES_GIT_CA_CERT",
    "KUBERNETES_JOB_ANNOTATIONS",
    "KUBERNETES_JOB_POD_ANNOTATIONS",
    "KUBERNETES_IMAGE_PULL_SECRETS",
];

/// What replaces a Sourcegraph variable whose advice depends on its value: the Firecracker
/// bandwidth caps (bytes per second) become `EXECUTOR_NETWORK_BANDWIDTH` (bits per second, one
/// value for both directions or `INGRESS/EGRESS`).
fn with_value(name: &str, value: &str, env: &[(String, String)]) -> Option<String> {
    let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.trim().to_string());
    let mbit =
        |v: &str| v.parse::<u64>().ok().map(|bytes| format!("{}mbit", (bytes * 8).div_ceil(1_000_000)));
    match name {
        "EXECUTOR_FIRECRACKER_BANDWIDTH_INGRESS" | "EXECUTOR_FIRECRACKER_BANDWIDTH_EGRESS" => {
            let (i, e) = (
                get("EXECUTOR_FIRECRACKER_BANDWIDTH_INGRESS").as_deref().and_then(mbit),
                get("EXECUTOR_FIRECRACKER_BANDWIDTH_EGRESS").as_deref().and_then(mbit),
            );
            let rate = match (i, e) {
                (Some(i), Some(e)) if i == e => i,
                (Some(i), Some(e)) => format!("{i}/{e}"),
                (Some(r), None) | (None, Some(r)) => r,
                (None, None) => {
                    return Some(format!(
                    "{name}={value:?} is a Sourcegraph setting this executor does not read: cap each job's \
                     network with EXECUTOR_NETWORK_BANDWIDTH (bits per second, e.g. 4200mbit)"
                ))
                }
            };
            Some(format!(
                "{name} is a Sourcegraph setting this executor does not read: set \
                 EXECUTOR_NETWORK_BANDWIDTH={rate} instead (the same cap per job, in bits per second)"
            ))
        }
        _ => None,
    }
}

/// One line for each variable of `env` (names and values) that this executor does not read.
pub(super) fn report(known: &[String], env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut out = Vec::new();
    let set = |n: &str| env.iter().any(|(k, v)| k == n && !v.is_empty());
    if set("KUBERNETES_SERVICE_HOST") && set("KUBERNETES_SERVICE_PORT") {
        out.push(format!(
            "running in a Kubernetes pod, where Sourcegraph's executor would use its Kubernetes runtime: \
             {NO_KUBERNETES}"
        ));
    }
    for (name, value) in &env {
        if SOURCEGRAPH_KUBERNETES.contains(&name.as_str()) {
            out.push(format!(
                "{name} is a Sourcegraph setting this executor does not support: {NO_KUBERNETES}"
            ));
            continue;
        }
        let name = name.clone();
        if !name.starts_with("EXECUTOR_")
            || known.contains(&name)
            || READ_DIRECTLY.contains(&name.as_str())
            || OTHER_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            continue;
        }
        if let Some(line) = with_value(&name, value, &env) {
            out.push(line);
            continue;
        }
        let unsupported =
            UNSUPPORTED.iter().find(|(n, _)| if n.ends_with('_') { name.starts_with(n) } else { name == *n });
        if let Some((_, instead)) = unsupported {
            out.push(format!("{name} is a Sourcegraph setting this executor does not support: {instead}"));
            continue;
        }
        let closest = known
            .iter()
            .map(String::as_str)
            .chain(READ_DIRECTLY.iter().copied())
            .map(|k| (distance(&name, k), k))
            .min();
        match closest {
            Some((d, k)) if d <= 3 || d * 4 <= name.len() => {
                out.push(format!("{name} is not a variable this executor reads; did you mean {k}?"))
            }
            _ => out.push(format!("{name} is not a variable this executor reads")),
        }
    }
    out.sort();
    out
}

/// Every variable of the settings table (names and aliases, flag or not) and of the command
/// tree's other flags.
pub(super) fn known_variables(cmd: &clap::Command) -> Vec<String> {
    let mut out: Vec<String> = crate::config::table::variables().map(String::from).collect();
    out.extend(flag_variables(cmd));
    out.sort();
    out.dedup();
    out
}

fn flag_variables(cmd: &clap::Command) -> Vec<String> {
    let mut out: Vec<String> =
        cmd.get_arguments().filter_map(|a| a.get_env().and_then(|e| e.to_str()).map(String::from)).collect();
    for sub in cmd.get_subcommands() {
        out.extend(flag_variables(sub));
    }
    out
}

/// Levenshtein distance over bytes (the names are ASCII).
fn distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_unsupported_and_known_names() {
        let known = known_variables(&super::super::command());
        assert!(known.iter().any(|k| k == "EXECUTOR_QUEUE_NAME"));
        assert!(known.iter().any(|k| k == "EXECUTOR_USE_FIRECRACKER"));
        for k in [
            "EXECUTOR_LOG_LEVEL",
            "SRC_LOG_LEVEL",
            "EXECUTOR_FIRECRACKER_MEMORY",
            "EXECUTOR_DOCKER_AUTH_CONFIG",
        ] {
            assert!(known.iter().any(|x| x == k), "{k} is not known");
        }
        let env = [
            "PATH",
            "EXECUTOR_QUEUE_NAME",
            "EXECUTOR_QUEUE_NAEM",
            "EXECUTOR_FRONTEND_PASSWORD",
            "EXECUTOR_LOG_LEVEL",
            "EXECUTOR_FIRECRACKER_NUM_CPUS",
            "EXECUTOR_LOG_LEVLE",
            "EXECUTOR_DOCKER_HOST_MOUNT_PATH",
            "EXECUTOR_KUBERNETES_NAMESPACE",
            "EXECUTOR_TEST_REQUIRE",
            "EXECUTOR_COMPLETELY_DIFFERENT_THING",
        ]
        .map(|n| (n.to_string(), "1".to_string()));
        let lines = report(&known, env);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(lines.iter().any(|l| l.ends_with("did you mean EXECUTOR_LOG_LEVEL?")), "{lines:#?}");
        assert!(lines
            .iter()
            .any(|l| l.contains("EXECUTOR_QUEUE_NAEM") && l.ends_with("did you mean EXECUTOR_QUEUE_NAME?")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("EXECUTOR_DOCKER_HOST_MOUNT_PATH is a Sourcegraph setting")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("EXECUTOR_KUBERNETES_NAMESPACE") && l.contains("no Kubernetes")));
        assert!(lines
            .iter()
            .any(|l| l == "EXECUTOR_COMPLETELY_DIFFERENT_THING is not a variable this executor reads"));
    }

    #[test]
    fn kubernetes_and_bandwidth_settings_say_what_replaces_them() {
        let known = known_variables(&super::super::command());
        let env = [
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_PORT_443_TCP", "tcp://10.0.0.1:443"),
            ("KUBERNETES_JOB_DEADLINE", "1200"),
            ("EXECUTOR_FIRECRACKER_BANDWIDTH_INGRESS", "524288000"),
            ("EXECUTOR_FIRECRACKER_BANDWIDTH_EGRESS", "125000000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let lines = report(&known, env);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines
            .iter()
            .any(|l| l.starts_with("running in a Kubernetes pod") && l.contains("EXECUTOR_RUNTIME")));
        assert!(lines.iter().any(|l| l.starts_with("KUBERNETES_JOB_DEADLINE is a Sourcegraph setting")
            && l.contains("EXECUTOR_RUNTIME")));
        // 524288000 bytes/s is 4194.304 Mbit/s; 125000000 bytes/s is 1000 Mbit/s.
        assert!(
            lines.iter().any(|l| l.starts_with("EXECUTOR_FIRECRACKER_BANDWIDTH_INGRESS")
                && l.contains("EXECUTOR_NETWORK_BANDWIDTH=4195mbit/1000mbit")),
            "{lines:#?}"
        );
        // Only the pod's own variables: one line, nothing about them one by one.
        let pod = [("KUBERNETES_SERVICE_HOST", "h"), ("KUBERNETES_SERVICE_PORT", "443")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(report(&known, pod).len(), 1);
    }

    #[test]
    fn edit_distance() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
    }
}

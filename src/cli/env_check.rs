//! Reports `EXECUTOR_*` variables this executor does not read: a typo is named with the closest
//! known variable, and a Sourcegraph variable deliberately not supported with what to use instead
//! (Sourcegraph's executor ignores unknown variables silently; an operator moving from it keeps
//! the same environment file and should see what has no effect).

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
    ("EXECUTOR_FIRECRACKER_BANDWIDTH_INGRESS", "sandboxes have no network device to shape"),
    ("EXECUTOR_FIRECRACKER_BANDWIDTH_EGRESS", "sandboxes have no network device to shape"),
    ("EXECUTOR_KUBERNETES_", "there is no Kubernetes runtime: use EXECUTOR_RUNTIME=oci or microvm"),
];

/// One line for each variable of `env` (names) that this executor does not read.
pub(super) fn report(known: &[String], env: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    for name in env {
        if !name.starts_with("EXECUTOR_")
            || known.contains(&name)
            || READ_DIRECTLY.contains(&name.as_str())
            || OTHER_PREFIXES.iter().any(|p| name.starts_with(p))
        {
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
        .map(String::from);
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
    fn edit_distance() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
    }
}

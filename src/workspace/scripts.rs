//! Step scripts, named and written as the contract says (section 3.4): one per docker step,
//! `.sourcegraph-executor/<jobID>.<i>_<repo with / as _>@<commit>.sh`, a preamble that moves to
//! bash where the image has it, then `set +e` and `set -x` before the step's commands.

/// The directory (relative to the workspace) that holds the scripts.
pub(crate) const SCRIPTS_DIR: &str = ".sourcegraph-executor";

/// The preamble: on the first run (no argument) re-exec under bash if there is one, passing
/// `skip-check`; then errors do not abort, commands are traced, the status is the last command's.
pub(crate) const PREAMBLE: &str = r#"
# Only on the first run, check if we can upgrade to bash.
if [ -z "$1" ]; then
  bash_path=$(command -p -v bash)
  set -e
  # Check if bash is present. If so, use bash. Otherwise just keep running with sh.
  if [ -n "$bash_path" ]; then
    exec "${bash_path}" "$0" skip-check
  else
    # If not in the path but still exists at /bin/bash, we can use that.
    if [ -f "/bin/bash" ]; then
      exec /bin/bash "$0" skip-check
    fi
  fi
fi

# Restore default shell behavior.
set +e
# From the actual script, log all commands.
set -x
"#;

/// The script's file name for step `index` of job `job_id`.
pub(crate) fn script_name(job_id: i64, index: usize, repository_name: &str, commit: &str) -> String {
    format!("{job_id}.{index}_{}@{commit}.sh", repository_name.replace('/', "_"))
}

/// The script's path relative to the workspace.
pub(crate) fn script_path(job_id: i64, index: usize, repository_name: &str, commit: &str) -> String {
    format!("{SCRIPTS_DIR}/{}", script_name(job_id, index, repository_name, commit))
}

/// The script's body: the preamble, an empty line, the commands joined by newlines.
pub(crate) fn script_body(commands: &[String]) -> String {
    let mut s = String::from(PREAMBLE);
    s.push('\n');
    s.push_str(&commands.join("\n"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(
            script_name(42, 0, "github.com/acme/widgets", "4b1d"),
            "42.0_github.com_acme_widgets@4b1d.sh"
        );
        assert_eq!(script_path(7, 2, "", ""), ".sourcegraph-executor/7.2_@.sh");
    }

    #[test]
    fn script_runs_every_line_traced_and_returns_the_last_status() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sh");
        std::fs::write(&p, script_body(&["false".into(), "echo after".into(), "exit 3".into()])).unwrap();
        let o = std::process::Command::new("/bin/sh").arg(&p).output().unwrap();
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "after\n");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("+ false") && err.contains("+ echo after"), "{err}");
    }
}

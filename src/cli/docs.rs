//! Man pages and shell completions, generated from the clap definitions so they cannot drift.

use anyhow::{Context, Result};
use std::path::Path;

/// Writes `man/*.1` and `completions/{executor.bash,_executor,executor.fish}` below `out`.
pub fn generate(out: &Path) -> Result<()> {
    let man_dir = out.join("man");
    let comp_dir = out.join("completions");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    std::fs::create_dir_all(&comp_dir).with_context(|| format!("creating {}", comp_dir.display()))?;
    for (name, bytes) in render()? {
        let dir = if name.ends_with(".1") { &man_dir } else { &comp_dir };
        let path = dir.join(&name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Every generated file, by name.
pub fn render() -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    let cmd = crate::cli::command();
    render_man(&cmd, "executor", &mut files)?;
    for (shell, name) in [
        (clap_complete::Shell::Bash, "executor.bash"),
        (clap_complete::Shell::Zsh, "_executor"),
        (clap_complete::Shell::Fish, "executor.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut crate::cli::command(), "executor", &mut buf);
        files.push((name.to_string(), buf));
    }
    Ok(files)
}

fn render_man(cmd: &clap::Command, name: &str, files: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    let cmd = cmd.clone().name(name.to_string());
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut buf)
        .with_context(|| format!("rendering the man page of {name}"))?;
    if let Some(extra) = super::docs_extra::man_section(name) {
        buf.extend_from_slice(extra.as_bytes());
    }
    files.push((format!("{name}.1"), buf));
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        render_man(sub, &format!("{name}-{}", sub.get_name()), files)?;
    }
    Ok(())
}

//! Each `executor queue` client command as load, then print: the call to the admin API, then the
//! answer as JSON (`--json`) or as text for people (`print`).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use super::print::{self, print_json, s, summary_row, table, FollowView, SUMMARY_HEADERS};
use super::{AdminClient, ClientCommand, ClientOptions};

/// Runs one client command; returns the exit status.
pub(crate) fn run(opts: &ClientOptions, cmd: ClientCommand) -> Result<i32> {
    let client = AdminClient::new(&opts.url, &opts.token, opts.ca_cert.as_deref())?;
    let mut stdout = std::io::stdout().lock();
    let out: &mut dyn Write = &mut stdout;
    let (json, raw) = (opts.json, opts.raw);
    match cmd {
        ClientCommand::Submit { queue, file } => {
            let id = client.submit(&read_job(&file, queue)?)?;
            if json {
                writeln!(out, "{}", serde_json::json!({ "id": id }))?;
            } else {
                writeln!(out, "{id}")?;
            }
        }
        ClientCommand::Jobs { queue, state, limit } => {
            let v = client.jobs(queue.as_deref(), state.as_deref(), limit)?;
            show(out, json, &v, |v| Ok(print::jobs_table(v, raw)))?;
        }
        ClientCommand::Show { id } => {
            if json {
                print_json(&client.job(id)?)?;
            } else {
                // The fields first, then the log entry by entry as it streams in: the text view
                // never holds a big job's whole log.
                print::print_job(&client.job_fields(id)?, out, raw)?;
                client.logs(id, false, |e| print::print_log_entry(&e, out, raw))?;
            }
        }
        ClientCommand::Logs { id, follow } => {
            let mut view = FollowView::new(raw);
            client.logs(id, follow, |e| {
                if json {
                    writeln!(out, "{e}")?;
                } else {
                    view.print(&e, out)?;
                }
                out.flush()?;
                Ok(())
            })?;
        }
        ClientCommand::Cancel { id } => {
            let v = client.cancel(id)?;
            show(out, json, &v, |v| Ok(table(SUMMARY_HEADERS, &[summary_row(v)], raw)))?;
        }
        ClientCommand::Release { id } => {
            let v = client.release(id)?;
            show(out, json, &v, |v| {
                Ok(format!(
                    "asked {} to release the sandbox of job {id} at its next heartbeat\n",
                    s(v, "executor")
                ))
            })?;
        }
        ClientCommand::Executors => {
            let v = client.executors()?;
            show(out, json, &v, |v| Ok(print::executors_table(v, raw)))?;
        }
        ClientCommand::Queues => {
            let v = client.queues()?;
            show(out, json, &v, |v| Ok(print::queues_table(v, raw)))?;
        }
        ClientCommand::RepoAdd { name, path } => {
            let abs = std::fs::canonicalize(&path)
                .with_context(|| format!("repository path {}", path.display()))?;
            let v = client.repo_add(&name, &abs)?;
            show(out, json, &v, |_| Ok(format!("serving {} as {name}\n", abs.display())))?;
        }
        ClientCommand::RepoLs => {
            let v = client.repos()?;
            show(out, json, &v, |v| Ok(print::repos_table(v, raw)))?;
        }
        ClientCommand::RepoRm { name } => {
            client.repo_rm(&name)?;
            if !json {
                writeln!(out, "no longer serving {name}")?;
            }
        }
        ClientCommand::FilePut { bucket, key, file } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let v = client.file_put(&bucket, &key, &bytes)?;
            show(out, json, &v, |v| {
                Ok(format!("{bucket}/{key}: {} bytes, sha256 {}\n", s(v, "size"), s(v, "sha256")))
            })?;
        }
        ClientCommand::FileLs => {
            let v = client.files()?;
            show(out, json, &v, |v| Ok(print::files_table(v, raw)))?;
        }
        ClientCommand::Artifacts { id, output } => artifacts(&client, id, output.as_deref(), out)?,
    }
    out.flush()?;
    Ok(crate::base::exit::OK)
}

/// An answer as JSON for scripts, or as `text` renders it for people.
fn show(
    out: &mut dyn Write,
    json: bool,
    v: &Value,
    text: impl FnOnce(&Value) -> Result<String>,
) -> Result<()> {
    if json {
        print_json(v)
    } else {
        out.write_all(text(v)?.as_bytes())?;
        Ok(())
    }
}

/// The job file (`-` for stdin) as a JSON object, with `--queue` set in it.
fn read_job(file: &Path, queue: Option<String>) -> Result<Value> {
    let text = if file.as_os_str() == "-" {
        let mut t = String::new();
        std::io::stdin().read_to_string(&mut t).context("reading the job from stdin")?;
        t
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading job file {}", file.display()))?
    };
    let mut job: Value =
        serde_json::from_str(&text).with_context(|| format!("job file {} is not JSON", file.display()))?;
    if let Some(q) = queue {
        match job.as_object_mut() {
            Some(obj) => {
                obj.insert("queue".into(), Value::String(q));
            }
            None => bail!("job file {} must hold a JSON object", file.display()),
        }
    }
    Ok(job)
}

/// The job's artifacts into `output` (written whole, then renamed) or to a pipe.
fn artifacts(client: &AdminClient, id: i64, output: Option<&Path>, out: &mut dyn Write) -> Result<()> {
    match output {
        Some(path) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("creating a file in {}", dir.display()))?;
            client.artifacts(id, tmp.as_file_mut())?;
            tmp.persist(PathBuf::from(path)).with_context(|| format!("writing {}", path.display()))?;
        }
        None => {
            if std::io::stdout().is_terminal() {
                bail!(
                    "refusing to write the binary artifacts of job {id} to a terminal; use -o FILE or a pipe"
                );
            }
            client.artifacts(id, out)?;
        }
    }
    Ok(())
}

//! The parsers of the settings table: each turns one raw value (absent when the setting is
//! unset) into its type, and names the variable in its error. The units are `base::units`'s.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::setting::Setting;
use crate::base::units::{parse_duration, parse_size};
use crate::protocol::SOURCEGRAPH_QUEUES;
use crate::sandbox::microvm::Accel;
use crate::sandbox::{OciRuntime, RuntimeChoice};

/// A byte size as the operator wrote it (`12G`), which the coordinator also receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Size {
    pub bytes: u64,
    text: String,
}

impl Size {
    pub(crate) fn parse(text: &str) -> Result<Size> {
        Ok(Size { bytes: parse_size(text)?, text: text.trim().to_string() })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// `EXECUTOR_LOG_LEVEL` (or Sourcegraph's `SRC_LOG_LEVEL`): the most detailed lines logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl FromStr for LogLevel {
    type Err = anyhow::Error;
    /// The five names, any case; also Sourcegraph's spellings (`dbug`, `eror`, `crit`).
    fn from_str(s: &str) -> Result<LogLevel> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "error" | "eror" | "crit" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" | "dbug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            other => bail!("{other:?} is not one of error, warn, info, debug, trace"),
        })
    }
}

/// `EXECUTOR_LOG_FORMAT`: how log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum LogFormat {
    /// Today's lines: `executor: job 5: …`, with the clock for the loop.
    #[default]
    Human,
    /// One JSON object a line, with every field.
    Json,
}

impl FromStr for LogFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<LogFormat> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => bail!("{other:?} is not a log format: use human or json"),
        })
    }
}

/// The value as text, untrimmed (`None`: unset).
fn raw<'a>(s: &Setting, v: Option<&'a OsStr>) -> Result<Option<&'a str>> {
    v.map(|v| v.to_str().with_context(|| format!("{} is not valid UTF-8", s.env))).transpose()
}

/// The value trimmed, `None` when unset or blank.
fn given<'a>(s: &Setting, v: Option<&'a OsStr>) -> Result<Option<&'a str>> {
    Ok(raw(s, v)?.map(str::trim).filter(|t| !t.is_empty()))
}

/// The value trimmed, else the setting's default (blank when it has none).
fn or_default<'a>(s: &'a Setting, v: Option<&'a OsStr>) -> Result<&'a str> {
    Ok(given(s, v)?.or(s.default).unwrap_or(""))
}

/// The text as given.
pub(crate) fn text(s: &Setting, v: Option<&OsStr>) -> Result<Option<String>> {
    Ok(raw(s, v)?.map(String::from))
}

/// Text that never prints (`None` when unset or blank).
pub(crate) fn secret(s: &Setting, v: Option<&OsStr>) -> Result<Option<crate::base::secret::Secret>> {
    Ok(raw(s, v)?.filter(|t| !t.trim().is_empty()).map(crate::base::secret::Secret::new))
}

/// A comma-separated list (the flag's repeats arrive joined by commas), entries as written.
pub(crate) fn list(s: &Setting, v: Option<&OsStr>) -> Result<Vec<String>> {
    Ok(raw(s, v)?.map(|t| t.split(',').map(String::from).collect()).unwrap_or_default())
}

pub(crate) fn path(_: &Setting, v: Option<&OsStr>) -> Result<Option<PathBuf>> {
    Ok(v.map(PathBuf::from))
}

/// A path, or `None` when unset or empty.
pub(crate) fn nonempty_path(_: &Setting, v: Option<&OsStr>) -> Result<Option<PathBuf>> {
    Ok(v.filter(|v| !v.is_empty()).map(PathBuf::from))
}

/// An optional host file that must exist.
pub(crate) fn existing_file(s: &Setting, v: Option<&OsStr>) -> Result<Option<PathBuf>> {
    match nonempty_path(s, v)? {
        Some(p) if !p.is_file() => bail!("{} {} is not a file", s.env, p.display()),
        other => Ok(other),
    }
}

/// An absolute directory (the default when unset).
pub(crate) fn absolute_dir(s: &Setting, v: Option<&OsStr>) -> Result<PathBuf> {
    let dir = v.map(PathBuf::from).unwrap_or_else(|| PathBuf::from(s.default.unwrap_or("")));
    if !dir.is_absolute() {
        bail!("{} {} must be an absolute path", s.env, dir.display());
    }
    Ok(dir)
}

/// The coordinator's URL: http or https, a host, no credentials, query or fragment; returned
/// without a trailing slash.
pub(crate) fn url(s: &Setting, v: Option<&OsStr>) -> Result<Option<String>> {
    let Some(u) = given(s, v)? else { return Ok(None) };
    let (scheme, rest) = u.split_once("://").with_context(|| format!("frontend URL {u:?} has no scheme"))?;
    if scheme != "http" && scheme != "https" {
        bail!("frontend URL {u:?}: scheme must be http or https");
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains('@') {
        bail!("frontend URL {u:?} has no host (or carries credentials)");
    }
    if rest.contains(['?', '#']) {
        bail!("frontend URL {u:?} must not have a query or fragment");
    }
    Ok(Some(u.trim_end_matches('/').to_string()))
}

fn check_queue(q: &str) -> Result<()> {
    if !SOURCEGRAPH_QUEUES.contains(&q) {
        bail!("queue {q:?} is not one of {}", SOURCEGRAPH_QUEUES.join(", "));
    }
    Ok(())
}

/// One of Sourcegraph's queues.
pub(crate) fn queue(s: &Setting, v: Option<&OsStr>) -> Result<Option<String>> {
    given(s, v)?.map(|q| check_queue(q).map(|()| q.to_string())).transpose()
}

/// Sourcegraph's queues, comma-separated, each once, at least one.
pub(crate) fn queues(s: &Setting, v: Option<&OsStr>) -> Result<Option<Vec<String>>> {
    let Some(list) = given(s, v)? else { return Ok(None) };
    let mut qs: Vec<String> = Vec::new();
    for q in list.split(',').map(str::trim).filter(|q| !q.is_empty()) {
        check_queue(q)?;
        if !qs.iter().any(|x| x == q) {
            qs.push(q.to_string());
        }
    }
    if qs.is_empty() {
        bail!("{} names no queue", s.env);
    }
    Ok(Some(qs))
}

pub(crate) fn duration(s: &Setting, v: Option<&OsStr>) -> Result<Duration> {
    let t = or_default(s, v)?;
    parse_duration(t).with_context(|| format!("{} {t:?}", s.env))
}

/// A duration where 0 means no limit (`None`).
pub(crate) fn duration_or_unlimited(s: &Setting, v: Option<&OsStr>) -> Result<Option<Duration>> {
    Ok(Some(duration(s, v)?).filter(|d| !d.is_zero()))
}

/// A duration, or `None` when unset, blank or `unlimited` (no limit).
pub(crate) fn duration_or_forever(s: &Setting, v: Option<&OsStr>) -> Result<Option<Duration>> {
    match given(s, v)? {
        None | Some("unlimited") => Ok(None),
        Some(_) => duration(s, v).map(Some),
    }
}

/// The heartbeat period, at least 100 ms.
pub(crate) fn heartbeat(s: &Setting, v: Option<&OsStr>) -> Result<Duration> {
    Ok(duration(s, v)?.max(Duration::from_millis(100)))
}

/// A whole number.
pub(crate) fn number<T: FromStr>(s: &Setting, v: Option<&OsStr>) -> Result<T> {
    let t = or_default(s, v)?;
    t.parse().ok().with_context(|| format!("{} {t:?} is not a whole number", s.env))
}

pub(crate) fn at_least_one(s: &Setting, v: Option<&OsStr>) -> Result<usize> {
    let n = number(s, v)?;
    if n == 0 {
        bail!("{} must be at least 1", s.env);
    }
    Ok(n)
}

/// A count, or `None` when unset or `auto`.
pub(crate) fn count_or_auto(s: &Setting, v: Option<&OsStr>) -> Result<Option<usize>> {
    match given(s, v)? {
        None | Some("auto") => Ok(None),
        Some(_) => number(s, v).map(Some),
    }
}

/// A count of at least 1, or `None` when unset or `auto`.
pub(crate) fn at_least_one_or_auto(s: &Setting, v: Option<&OsStr>) -> Result<Option<usize>> {
    match given(s, v)? {
        None | Some("auto") => Ok(None),
        Some(_) => at_least_one(s, v).map(Some),
    }
}

/// A boolean; unset or blank is false.
pub(crate) fn boolean(s: &Setting, v: Option<&OsStr>) -> Result<bool> {
    Ok(opt_boolean(s, v)?.unwrap_or(false))
}

/// A boolean that may be unset (`None`).
pub(crate) fn opt_boolean(s: &Setting, v: Option<&OsStr>) -> Result<Option<bool>> {
    match given(s, v)?.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(None),
        Some("0") | Some("false") | Some("no") | Some("off") => Ok(Some(false)),
        Some("1") | Some("true") | Some("yes") | Some("on") => Ok(Some(true)),
        Some(other) => bail!("{} {other:?} is not a boolean (true or false)", s.env),
    }
}

/// A size, kept with its text (the default when unset).
pub(crate) fn size(s: &Setting, v: Option<&OsStr>) -> Result<Size> {
    let t = raw(s, v)?.or(s.default).unwrap_or("");
    Size::parse(t).with_context(|| format!("{} {t:?}", s.env))
}

/// A size in bytes (the default when unset).
pub(crate) fn bytes(s: &Setting, v: Option<&OsStr>) -> Result<u64> {
    size(s, v).map(|z| z.bytes)
}

/// The image store's budget: a size, or unset, blank or `0` for none (0).
pub(crate) fn budget(s: &Setting, v: Option<&OsStr>) -> Result<u64> {
    match given(s, v)? {
        None => Ok(0),
        Some(t) => parse_size(t)
            .with_context(|| format!("{} {t:?} is not a size (like 20G, or 0 for no budget)", s.env)),
    }
}

/// `auto` or a runtime's name, any case (`None` when unset: `EXECUTOR_USE_FIRECRACKER` decides).
pub(crate) fn runtime(s: &Setting, v: Option<&OsStr>) -> Result<Option<RuntimeChoice>> {
    given(s, v)?
        .map(|t| t.to_ascii_lowercase().parse().map_err(|e: anyhow::Error| anyhow::anyhow!("{} {e}", s.env)))
        .transpose()
}

/// Letters, digits, `-` and `_`, at least one (the default when unset).
pub(crate) fn name_prefix(s: &Setting, v: Option<&OsStr>) -> Result<String> {
    let p = raw(s, v)?.or(s.default).unwrap_or("");
    if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("{} {p:?} must be letters, digits, '-' or '_'", s.env);
    }
    Ok(p.to_string())
}

pub(crate) fn oci_runtime(s: &Setting, v: Option<&OsStr>) -> Result<OciRuntime> {
    let t = raw(s, v)?.or(s.default).unwrap_or("").trim().to_ascii_lowercase();
    t.parse().map_err(|_| anyhow::anyhow!("{} {t:?} is not one of runc, crun, runsc", s.env))
}

pub(crate) fn accel(s: &Setting, v: Option<&OsStr>) -> Result<Accel> {
    let t = raw(s, v)?.or(s.default).unwrap_or("").trim();
    t.parse().map_err(|e: anyhow::Error| anyhow::anyhow!("{}: {e}", s.env))
}

pub(crate) fn pull_policy(s: &Setting, v: Option<&OsStr>) -> Result<crate::image::pull::PullPolicy> {
    crate::image::pull::PullPolicy::parse(raw(s, v)?.unwrap_or(""))
}

pub(crate) fn log_level(s: &Setting, v: Option<&OsStr>) -> Result<LogLevel> {
    let t = or_default(s, v)?;
    t.parse().with_context(|| format!("{} {t:?}", s.env))
}

pub(crate) fn log_format(s: &Setting, v: Option<&OsStr>) -> Result<LogFormat> {
    let t = or_default(s, v)?;
    t.parse().with_context(|| format!("{} {t:?}", s.env))
}

#[cfg(test)]
mod tests {
    use super::super::table::setting;
    use super::*;

    fn run<T>(id: &str, v: &str, f: fn(&Setting, Option<&OsStr>) -> Result<T>) -> Result<T> {
        f(setting(id).unwrap(), Some(OsStr::new(v)))
    }

    #[test]
    fn sizes_keep_their_text_and_bytes() {
        let m = run("job_memory", "512M", size).unwrap();
        assert_eq!((m.bytes, m.to_string()), (512 << 20, "512M".to_string()));
        let d = size(setting("disk_space").unwrap(), None).unwrap();
        assert_eq!(d.bytes, 20 << 30);
        let e = format!("{:#}", run("job_memory", "lots", size).unwrap_err());
        assert!(e.starts_with("EXECUTOR_JOB_MEMORY \"lots\""), "{e}");
        assert_eq!(run("image_cache_bytes", " 0 ", budget).unwrap(), 0);
        assert!(format!("{:#}", run("image_cache_bytes", "big", budget).unwrap_err()).contains("no budget"));
    }

    #[test]
    fn log_levels_take_sourcegraph_spellings() {
        for (v, want) in [("DEBUG", LogLevel::Debug), ("dbug", LogLevel::Debug), ("eror", LogLevel::Error)] {
            assert_eq!(run("log_level", v, log_level).unwrap(), want, "{v}");
        }
        assert_eq!(log_level(setting("log_level").unwrap(), None).unwrap(), LogLevel::Info);
        assert_eq!(run("log_format", "JSON", log_format).unwrap(), LogFormat::Json);
        assert_eq!(log_format(setting("log_format").unwrap(), None).unwrap(), LogFormat::Human);
        let e = format!("{:#}", run("log_format", "xml", log_format).unwrap_err());
        assert!(e.starts_with("EXECUTOR_LOG_FORMAT \"xml\"") && e.contains("human or json"), "{e}");
        let e = format!("{:#}", run("log_level", "loud", log_level).unwrap_err());
        assert!(e.starts_with("EXECUTOR_LOG_LEVEL \"loud\"") && e.contains("error, warn"), "{e}");
    }

    #[test]
    fn oci_runtime_is_an_enum() {
        assert_eq!(run("oci_runtime", " CRUN ", oci_runtime).unwrap(), OciRuntime::Crun);
        assert_eq!(oci_runtime(setting("oci_runtime").unwrap(), None).unwrap(), OciRuntime::Runc);
        let e = run("oci_runtime", "docker", oci_runtime).unwrap_err().to_string();
        assert_eq!(e, "EXECUTOR_OCI_RUNTIME \"docker\" is not one of runc, crun, runsc");
    }

    #[test]
    fn counts_booleans_and_durations() {
        assert_eq!(run("vm_pool_size", "auto", count_or_auto).unwrap(), None);
        assert_eq!(run("vm_pool_size", "3", count_or_auto).unwrap(), Some(3));
        assert!(run("vm_pool_size", "-1", count_or_auto).is_err());
        assert_eq!(run("vm_pool_restores", "auto", at_least_one_or_auto).unwrap(), None);
        assert_eq!(run("vm_pool_restores", "2", at_least_one_or_auto).unwrap(), Some(2));
        assert!(run("vm_pool_restores", "0", at_least_one_or_auto).is_err());
        assert!(run("keep_workspaces", " Yes ", boolean).unwrap());
        assert!(!run("keep_workspaces", "", boolean).unwrap());
        assert_eq!(run("heartbeat_interval", "1ms", heartbeat).unwrap(), Duration::from_millis(100));
        assert_eq!(run("max_active_time", "0", duration_or_unlimited).unwrap(), None);
        let e = run("max_jobs", "0", at_least_one).unwrap_err().to_string();
        assert_eq!(e, "EXECUTOR_MAXIMUM_NUM_JOBS must be at least 1");
    }
}

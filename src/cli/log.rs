//! How the command line's log looks: the format each command's lines take and the level, read
//! from the environment at start (`EXECUTOR_LOG_LEVEL`, or Sourcegraph's `SRC_LOG_LEVEL`;
//! `EXECUTOR_LOG_FORMAT`), and the subscriber that `base::log` builds from them.

use anyhow::Result;

use super::{executor::ExecutorCommand, queue::QueueCommand, Command};
use crate::base::exit::{ExitError, USAGE};
use crate::base::log::{Format, LevelFilter};

/// The variables [`from_env`] reads that no flag declares.
pub const VARIABLES: &[&str] = &["EXECUTOR_LOG_LEVEL", "EXECUTOR_LOG_FORMAT"];

/// The log's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    pub level: LevelFilter,
    /// One JSON object a line instead of today's lines.
    pub json: bool,
}

/// The log's settings from the variables `var` looks up: the level from `EXECUTOR_LOG_LEVEL`,
/// else `SRC_LOG_LEVEL` (info when neither is set), and `EXECUTOR_LOG_FORMAT` (`human`, the
/// default, or `json`).
pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<LogSettings> {
    let set = |name: &'static str| var(name).filter(|v| !v.trim().is_empty()).map(|v| (name, v));
    let level = match set("EXECUTOR_LOG_LEVEL").or_else(|| set("SRC_LOG_LEVEL")) {
        None => LevelFilter::INFO,
        Some((name, v)) => parse_level(&v).ok_or_else(|| {
            ExitError::new(
                USAGE,
                format!("{name} {v:?} is not a log level: use error, warn, info, debug or trace"),
            )
        })?,
    };
    let json = match set("EXECUTOR_LOG_FORMAT") {
        None => false,
        Some((_, v)) if v.trim().eq_ignore_ascii_case("human") => false,
        Some((_, v)) if v.trim().eq_ignore_ascii_case("json") => true,
        Some((name, v)) => {
            return Err(
                ExitError::new(USAGE, format!("{name} {v:?} is not a log format: use human or json")).into()
            )
        }
    };
    Ok(LogSettings { level, json })
}

/// A level by its name; Sourcegraph's spellings (`dbug`, `eror`, `crit`) are accepted too.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.trim().to_ascii_lowercase().as_str() {
        "error" | "eror" | "crit" => LevelFilter::ERROR,
        "warn" | "warning" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" | "dbug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

/// How `command`'s lines look: named as the program (`executor queue` for the coordinator), and
/// with the clock for the loop, which runs for days.
pub fn format(command: &Command, json: bool) -> Format {
    if json {
        return Format::Json;
    }
    let serving = matches!(command, Command::Queue(q) if matches!(q.command, QueueCommand::Serve(_)));
    let looping = matches!(command, Command::Executor(e) if matches!(**e, ExecutorCommand::Loop(_)));
    let name = if serving { "executor queue" } else { "executor" };
    Format::Human { name: name.to_string(), time: looping }
}

/// Installs the subscriber for `command`, with the settings of this process's environment.
pub fn install(command: &Command) -> Result<()> {
    let s = from_env(|name| std::env::var(name).ok())?;
    // Installed once a process; a second install (none today) keeps the first.
    let _ = crate::base::log::init(format(command, s.json), s.level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<LogSettings> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_env(|k| env.get(k).cloned())
    }

    #[test]
    fn the_level_comes_from_executor_log_level_then_src_log_level() {
        assert_eq!(settings(&[]).unwrap(), LogSettings { level: LevelFilter::INFO, json: false });
        assert_eq!(settings(&[("SRC_LOG_LEVEL", "dbug")]).unwrap().level, LevelFilter::DEBUG);
        assert_eq!(settings(&[("SRC_LOG_LEVEL", "eror")]).unwrap().level, LevelFilter::ERROR);
        let both = [("EXECUTOR_LOG_LEVEL", "WARN"), ("SRC_LOG_LEVEL", "trace")];
        assert_eq!(settings(&both).unwrap().level, LevelFilter::WARN);
        assert_eq!(
            settings(&[("EXECUTOR_LOG_LEVEL", ""), ("SRC_LOG_LEVEL", "trace")]).unwrap().level,
            LevelFilter::TRACE
        );
        for (name, level) in
            [("error", LevelFilter::ERROR), ("info", LevelFilter::INFO), ("trace", LevelFilter::TRACE)]
        {
            assert_eq!(parse_level(name), Some(level));
        }
    }

    #[test]
    fn a_bad_value_is_a_usage_error_naming_the_variable() {
        let err = settings(&[("SRC_LOG_LEVEL", "loud")]).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "SRC_LOG_LEVEL \"loud\" is not a log level: use error, warn, info, debug or trace"
        );
        assert_eq!(crate::base::exit::code_for(&err), USAGE);
        let err = settings(&[("EXECUTOR_LOG_FORMAT", "xml")]).unwrap_err();
        assert!(format!("{err:#}").starts_with("EXECUTOR_LOG_FORMAT \"xml\""), "{err:#}");
        assert!(settings(&[("EXECUTOR_LOG_FORMAT", "json")]).unwrap().json);
    }

    #[test]
    fn the_queue_names_its_lines_and_the_loop_stamps_them() {
        use clap::Parser;
        let parse = |args: &[&str]| super::super::Cli::try_parse_from(args).unwrap().command;
        let human = |name: &str, time: bool| Format::Human { name: name.into(), time };
        assert_eq!(
            format(&parse(&["executor", "queue", "serve", "--data-dir", "d"]), false),
            human("executor queue", false)
        );
        assert_eq!(format(&parse(&["executor", "loop"]), false), human("executor", true));
        assert_eq!(format(&parse(&["executor", "janitor"]), false), human("executor", false));
        assert_eq!(format(&parse(&["executor", "loop"]), true), Format::Json);
    }
}

//! How the command line's log looks: the format each command's lines take and the level, from
//! the settings table's `EXECUTOR_LOG_LEVEL` (or Sourcegraph's `SRC_LOG_LEVEL`) and
//! `EXECUTOR_LOG_FORMAT`, read at start, and the subscriber that `base::log` builds from them.

use anyhow::Result;

use super::{executor::ExecutorCommand, queue::QueueCommand, Command};
use crate::base::exit::{ExitError, USAGE};
use crate::base::log::{Format, LevelFilter};
use crate::config::{LogFormat, LogLevel};

/// The facade's filter for a level of the settings table.
pub(super) fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// How `command`'s lines look: named as the program (`executor queue` for the coordinator), and
/// with the clock for the loop, which runs for days.
pub(super) fn format(command: &Command, format: LogFormat) -> Format {
    if format == LogFormat::Json {
        return Format::Json;
    }
    let serving = matches!(command, Command::Queue(q) if matches!(q.command, QueueCommand::Serve(_)));
    let looping = matches!(command, Command::Executor(e) if matches!(**e, ExecutorCommand::Loop(_)));
    let name = if serving { "executor queue" } else { "executor" };
    Format::Human { name: name.to_string(), time: looping }
}

/// Installs the subscriber for `command`, with the settings of this process's environment; a
/// bad value is a usage error that names its variable.
pub(super) fn install(command: &Command) -> Result<()> {
    let (level, fmt) = crate::config::log_from_env().map_err(|e| ExitError::new(USAGE, format!("{e:#}")))?;
    // Installed once a process; a second install (none today) keeps the first.
    let _ = crate::base::log::init(format(command, fmt), level_filter(level));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_one_to_one() {
        let all = [LogLevel::Error, LogLevel::Warn, LogLevel::Info, LogLevel::Debug, LogLevel::Trace];
        let filters: Vec<LevelFilter> = all.iter().map(|l| level_filter(*l)).collect();
        assert_eq!(
            filters,
            [
                LevelFilter::ERROR,
                LevelFilter::WARN,
                LevelFilter::INFO,
                LevelFilter::DEBUG,
                LevelFilter::TRACE
            ]
        );
    }

    #[test]
    fn the_queue_names_its_lines_and_the_loop_stamps_them() {
        use clap::Parser;
        let parse = |args: &[&str]| super::super::Cli::try_parse_from(args).unwrap().command;
        let human = |name: &str, time: bool| Format::Human { name: name.into(), time };
        assert_eq!(
            format(&parse(&["executor", "queue", "serve", "--data-dir", "d"]), LogFormat::Human),
            human("executor queue", false)
        );
        assert_eq!(format(&parse(&["executor", "loop"]), LogFormat::Human), human("executor", true));
        assert_eq!(format(&parse(&["executor", "janitor"]), LogFormat::Human), human("executor", false));
        assert_eq!(format(&parse(&["executor", "loop"]), LogFormat::Json), Format::Json);
    }
}

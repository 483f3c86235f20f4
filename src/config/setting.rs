//! One setting as the table declares it: its flag, variable and aliases, default, help, how its
//! value is written and which commands take it, and how it reads itself from the command line
//! or the environment. The table (`table.rs`) lists the settings; the parsers (`parse.rs`)
//! make typed values of them.

use clap::{Arg, ArgAction, ArgMatches};
use std::ffi::OsString;
use std::path::PathBuf;

/// How a setting's value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One value.
    Value,
    /// A file or directory (completed as a path).
    Path,
    /// A boolean: the bare flag means true.
    Switch,
    /// A comma-separated list; the flag may repeat.
    List,
}

/// Which commands take a setting as a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// The pipeline stages, `loop`, `validate` and `janitor` (`ConfigArgs`).
    Executor,
    /// Those, and `image pull` (how pulls reach registries).
    Registry,
    /// No flag: read from the environment at startup.
    EnvOnly,
}

/// One setting, as the table declares it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Setting {
    /// The clap id and the field of [`Values`](super::Values).
    pub id: &'static str,
    /// The long flag, without `--`.
    pub flag: &'static str,
    pub env: &'static str,
    /// Other variables read, in order, when neither the flag nor `env` is given.
    pub aliases: &'static [&'static str],
    pub value_name: &'static str,
    /// One line for `--help`, without the default.
    pub help: &'static str,
    /// The value the parser gets when the setting is unset (`None`: it decides itself).
    pub default: Option<&'static str>,
    /// What `[default: ...]` says instead of `default` (for defaults that are not a value).
    pub default_note: Option<&'static str>,
    /// Let clap fill in and print the default (`[default: X]` after the flag).
    pub clap_default: bool,
    pub shape: Shape,
    pub group: Group,
    /// The value is a secret: `--help` never shows it.
    pub secret: bool,
}

impl Setting {
    pub(super) const EMPTY: Setting = Setting {
        id: "",
        flag: "",
        env: "",
        aliases: &[],
        value_name: "",
        help: "",
        default: None,
        default_note: None,
        clap_default: false,
        shape: Shape::Value,
        group: Group::Executor,
        secret: false,
    };

    /// The default as `--help` and the docs show it, if any.
    pub(crate) fn shown_default(&self) -> Option<&'static str> {
        self.default_note.or(self.default)
    }

    /// The clap argument of this setting.
    pub(crate) fn arg(&self) -> Arg {
        let mut help = self.help.to_string();
        if let (false, Some(d)) = (self.clap_default, self.shown_default()) {
            help = format!("{help} [default: {d}]");
        }
        let mut arg = Arg::new(self.id)
            .long(self.flag)
            .env(self.env)
            .value_name(self.value_name)
            .help(help)
            .hide_env_values(self.secret);
        if self.clap_default {
            if let Some(d) = self.default {
                arg = arg.default_value(d);
            }
        }
        match self.shape {
            Shape::Value => arg.action(ArgAction::Set).value_parser(clap::value_parser!(String)),
            Shape::Path => arg.action(ArgAction::Set).value_parser(clap::value_parser!(PathBuf)),
            Shape::Switch => arg
                .action(ArgAction::Set)
                .value_parser(clap::value_parser!(String))
                .num_args(0..=1)
                .default_missing_value("true"),
            Shape::List => {
                arg.action(ArgAction::Append).value_parser(clap::value_parser!(String)).value_delimiter(',')
            }
        }
    }

    /// This setting's raw value in the environment (its variable, else the first alias set),
    /// with the variable it came from.
    pub(crate) fn env_value(&self) -> Option<(OsString, &'static str)> {
        self.raw(None)
    }

    /// This setting's raw value in `m` (from the flag, `env`, or clap's default), else from the
    /// first alias set in the environment; with the variable an error about it names.
    pub(super) fn raw(&self, m: Option<&ArgMatches>) -> Option<(OsString, &'static str)> {
        let given =
            m.filter(|m| m.try_contains_id(self.id).unwrap_or(false)).and_then(|m| match self.shape {
                Shape::Path => m.get_one::<PathBuf>(self.id).map(|p| p.clone().into_os_string()),
                Shape::List => m
                    .get_many::<String>(self.id)
                    .map(|v| OsString::from(v.map(String::as_str).collect::<Vec<_>>().join(","))),
                Shape::Value | Shape::Switch => m.get_one::<String>(self.id).map(OsString::from),
            });
        let env = || if m.is_none() { std::env::var_os(self.env) } else { None };
        given
            .or_else(env)
            .map(|v| (v, self.env))
            .or_else(|| self.aliases.iter().find_map(|a| std::env::var_os(a).map(|v| (v, *a))))
    }

    /// This setting as read from `var` (one of its aliases), so that errors name that variable.
    pub(crate) fn read_from(&self, var: &'static str) -> Setting {
        Setting { env: var, ..*self }
    }
}

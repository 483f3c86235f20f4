//! `executor install src-cli`: fetches Sourcegraph's `src` from the instance (every instance
//! serves it at `/.api/src-cli/src_linux_amd64`, with a `.sha256` beside it on recent ones) or
//! takes a file, and installs it for the guests of `cliSteps` jobs (`crate::vm::src_cli`).

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use crate::base::exit;
use crate::vm::src_cli::{parse_sha256, SRC_ROUTE};

#[derive(Debug, Args)]
pub struct InstallSrcCliArgs {
    /// State directory (vm/src-cli/ is created below it)
    #[arg(long, env = "EXECUTOR_STATE_DIR", default_value = "/var/lib/executor")]
    pub state_dir: PathBuf,
    /// The Sourcegraph instance to fetch src from (<URL>/.api/src-cli/src_linux_amd64)
    #[arg(long, env = "EXECUTOR_FRONTEND_URL", value_name = "URL")]
    pub frontend_url: Option<String>,
    /// PEM file of CA certificates trusted for an https instance
    #[arg(long, env = "EXECUTOR_FRONTEND_CA", value_name = "FILE")]
    pub frontend_ca: Option<PathBuf>,
    /// Install this file as src instead of fetching it
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
}

/// Largest src binary accepted (src-cli is about 40 MB).
const MAX_SRC: u64 = 512 << 20;

/// GETs `url`: its body, or `None` on a 404.
fn fetch(agent: &ureq::Agent, url: &str, max: u64) -> Result<Option<Vec<u8>>> {
    match agent.get(url).call() {
        Ok(resp) => {
            let mut body = Vec::new();
            resp.into_reader()
                .take(max + 1)
                .read_to_end(&mut body)
                .with_context(|| format!("reading {url}"))?;
            if body.len() as u64 > max {
                bail!("{url} is larger than {} bytes", max);
            }
            Ok(Some(body))
        }
        Err(ureq::Error::Status(404, _)) => Ok(None),
        Err(ureq::Error::Status(code, _)) => bail!("{url} answered {code}"),
        Err(e) => Err(anyhow::anyhow!("fetching {url}: {e}")),
    }
}

pub(crate) fn install_src_cli(args: InstallSrcCliArgs) -> Result<i32> {
    let state_dir = std::path::absolute(&args.state_dir)
        .with_context(|| format!("resolving the state directory {}", args.state_dir.display()))?;
    let did =
        match (&args.from, args.frontend_url.as_deref().filter(|u| !u.is_empty())) {
            (Some(file), _) => {
                let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                crate::vm::src_cli::install(&state_dir, &bytes, None, &file.display().to_string())?
            }
            (None, Some(url)) => {
                let base = url.trim_end_matches('/');
                // The system trust store, the frontend CA and the proxies, as for the coordinator.
                let make = || {
                    ureq::AgentBuilder::new()
                        .timeout_connect(Duration::from_secs(10))
                        .timeout_read(Duration::from_secs(120))
                        .user_agent(&format!("executor/{}", env!("CARGO_PKG_VERSION")))
                };
                let agents = crate::base::http::Agents::new(
                    make,
                    base.starts_with("https://"),
                    args.frontend_ca.as_deref(),
                )?;
                let url = format!("{base}{SRC_ROUTE}");
                let agent = agents.for_url(&url);
                let bytes = fetch(agent, &url, MAX_SRC)?
                    .with_context(|| format!("{url} answered 404: the instance serves no src-cli"))?;
                let sum_url = format!("{url}.sha256");
                let want = match fetch(agent, &sum_url, 4096)? {
                    Some(text) => Some(
                        parse_sha256(&String::from_utf8_lossy(&text))
                            .with_context(|| format!("reading {sum_url}"))?,
                    ),
                    None => None,
                };
                crate::vm::src_cli::install(&state_dir, &bytes, want.as_deref(), &url)?
            }
            (None, None) => return Err(exit::ExitError::new(
                exit::USAGE,
                "install src-cli needs the instance (EXECUTOR_FRONTEND_URL, --frontend-url) or --from FILE",
            )
            .into()),
        };
    for line in did {
        eprintln!("install src-cli: {line}");
    }
    Ok(exit::OK)
}

//! A progress bar for the clone on a terminal, fed by git's own `--progress` lines
//! (`Receiving objects:  45% (450/1000)`).

use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    partial: Vec<u8>,
}

impl Progress {
    pub(crate) fn new(enabled: bool, key: &str) -> Self {
        let bar = enabled.then(|| {
            let b = ProgressBar::new(100);
            b.set_style(
                ProgressStyle::with_template("{prefix:>22} {bar:30} {pos:>3}% {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(key.to_string());
            b
        });
        Progress { bar, partial: Vec::new() }
    }

    /// Feeds raw git output; updates the bar on every complete progress line.
    pub(crate) fn feed(&mut self, data: &[u8]) {
        let Some(bar) = &self.bar else { return };
        self.partial.extend_from_slice(data);
        while let Some(pos) = self.partial.iter().position(|b| *b == b'\r' || *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            if let Some((phase, pct)) = parse(&String::from_utf8_lossy(&line)) {
                bar.set_message(phase);
                bar.set_position(pct);
            }
        }
        if self.partial.len() > 4096 {
            self.partial.clear();
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `("Receiving objects", 45)` from a git progress line.
fn parse(line: &str) -> Option<(String, u64)> {
    let line = line.trim().trim_start_matches("remote: ");
    let (phase, rest) = line.split_once(':')?;
    let pct = rest.trim_start().split('%').next()?.trim().parse::<u64>().ok()?;
    Some((phase.trim().to_string(), pct.min(100)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_git_progress() {
        assert_eq!(
            super::parse("Receiving objects:  45% (450/1000), 1.2 MiB"),
            Some(("Receiving objects".into(), 45))
        );
        assert_eq!(
            super::parse("remote: Counting objects: 100% (3/3), done."),
            Some(("Counting objects".into(), 100))
        );
        assert_eq!(super::parse("From http://x"), None);
    }
}

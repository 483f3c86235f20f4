//! Job output to styled text: SGR colour codes become segments with CSS classes (`fg-0`..`fg-15`,
//! `bg-0`..`bg-15`, `bold`, `dim`, `italic`, `underline`); every other escape sequence (CSI, OSC
//! with its title or hyperlink, DCS, single-character escapes) and every control character but
//! newline and tab is dropped. The parser is incremental: an escape cut between two appended
//! chunks is completed by the next `feed`.

/// The most an unfinished escape sequence may hold before it is dropped.
const MAX_PENDING: usize = 4096;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Style {
    fg: Option<u8>,
    bg: Option<u8>,
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
}

impl Style {
    fn class(&self) -> String {
        let mut c = Vec::new();
        if let Some(n) = self.fg {
            c.push(format!("fg-{n}"));
        }
        if let Some(n) = self.bg {
            c.push(format!("bg-{n}"));
        }
        for (on, name) in
            [(self.bold, "bold"), (self.dim, "dim"), (self.italic, "italic"), (self.underline, "underline")]
        {
            if on {
                c.push(name.to_string());
            }
        }
        c.join(" ")
    }

    fn apply(&mut self, params: &str) {
        let nums: Vec<Option<u32>> =
            params.split([';', ':']).map(|p| if p.is_empty() { Some(0) } else { p.parse().ok() }).collect();
        let mut i = 0;
        while i < nums.len() {
            let Some(n) = nums[i] else {
                i += 1;
                continue;
            };
            match n {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => (self.bold, self.dim) = (false, false),
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 => self.fg = Some((n - 30) as u8),
                39 => self.fg = None,
                40..=47 => self.bg = Some((n - 40) as u8),
                49 => self.bg = None,
                90..=97 => self.fg = Some((n - 90 + 8) as u8),
                100..=107 => self.bg = Some((n - 100 + 8) as u8),
                38 | 48 => {
                    // 256 colours (5;n): the first 16 map to classes; true colour (2;r;g;b) is dropped.
                    let colour = match nums.get(i + 1).copied().flatten() {
                        Some(5) => {
                            let c = nums.get(i + 2).copied().flatten();
                            i += 2;
                            c.filter(|c| *c < 16).map(|c| c as u8)
                        }
                        Some(2) => {
                            i += 4;
                            None
                        }
                        _ => None,
                    };
                    if n == 38 {
                        self.fg = colour;
                    } else {
                        self.bg = colour;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// A run of text in one style; `class` is empty for unstyled text.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Segment {
    pub class: String,
    pub text: String,
}

/// The parser with its style and any unfinished escape.
#[derive(Debug, Default)]
pub(super) struct Ansi {
    style: Style,
    pending: String,
}

enum Scan {
    /// The sequence ends before byte `usize` (exclusive); `Some(params)` for an SGR.
    Done(usize, Option<String>),
    Incomplete,
}

/// Scans an escape sequence starting at `s[0] == ESC`.
fn scan_escape(s: &str) -> Scan {
    let b = s.as_bytes();
    let Some(&kind) = b.get(1) else { return Scan::Incomplete };
    match kind {
        b'[' => {
            for (i, &c) in b.iter().enumerate().skip(2) {
                if (0x40..=0x7e).contains(&c) {
                    let sgr = (c == b'm').then(|| s[2..i].to_string());
                    return Scan::Done(i + 1, sgr);
                }
                if !(0x20..=0x3f).contains(&c) {
                    // Not a CSI byte: the sequence is broken; drop what was read.
                    return Scan::Done(i, None);
                }
            }
            Scan::Incomplete
        }
        // OSC, DCS, SOS, PM, APC: up to BEL or ST (ESC \).
        b']' | b'P' | b'X' | b'^' | b'_' => {
            let mut i = 2;
            while i < b.len() {
                if b[i] == 0x07 {
                    return Scan::Done(i + 1, None);
                }
                if b[i] == 0x1b {
                    return match b.get(i + 1) {
                        Some(b'\\') => Scan::Done(i + 2, None),
                        Some(_) => Scan::Done(i, None),
                        None => Scan::Incomplete,
                    };
                }
                i += 1;
            }
            Scan::Incomplete
        }
        // nF escapes (charset designations like ESC ( B): intermediates, then a final byte.
        0x20..=0x2f => match b.iter().skip(2).position(|c| !(0x20..=0x2f).contains(c)) {
            // A non-ASCII final is not part of the escape (and must not be cut in two).
            Some(n) if b[2 + n].is_ascii() => Scan::Done(2 + n + 1, None),
            Some(n) => Scan::Done(2 + n, None),
            None => Scan::Incomplete,
        },
        // ESC followed by one character (and its UTF-8 continuation bytes).
        _ => {
            let len = s[1..].chars().next().map(char::len_utf8).unwrap_or(1);
            Scan::Done(1 + len, None)
        }
    }
}

impl Ansi {
    pub(super) fn new() -> Ansi {
        Ansi::default()
    }

    /// Parses the next chunk of output into segments (adjacent segments of one style merged).
    pub(super) fn feed(&mut self, input: &str) -> Vec<Segment> {
        let mut text = std::mem::take(&mut self.pending);
        text.push_str(input);
        let mut out: Vec<Segment> = Vec::new();
        let push = |out: &mut Vec<Segment>, style: &Style, s: &str| {
            if s.is_empty() {
                return;
            }
            let class = style.class();
            match out.last_mut() {
                Some(last) if last.class == class => last.text.push_str(s),
                _ => out.push(Segment { class, text: s.to_string() }),
            }
        };
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let stop = rest.find(|c: char| c.is_control() && c != '\n' && c != '\t').unwrap_or(rest.len());
            push(&mut out, &self.style, &rest[..stop]);
            rest = &rest[stop..];
            let Some(c) = rest.chars().next() else { break };
            if c != '\u{1b}' {
                rest = &rest[c.len_utf8()..];
                continue;
            }
            match scan_escape(rest) {
                Scan::Done(end, sgr) => {
                    if let Some(params) = sgr {
                        self.style.apply(&params);
                    }
                    rest = &rest[end..];
                }
                Scan::Incomplete => {
                    if rest.len() <= MAX_PENDING {
                        self.pending = rest.to_string();
                    }
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(class: &str, text: &str) -> Segment {
        Segment { class: class.into(), text: text.into() }
    }

    #[test]
    fn colours_become_classes_and_other_escapes_vanish() {
        let mut a = Ansi::new();
        let got = a.feed("a\x1b[1;31mred\x1b[0m b\x1b]0;title\x07c\x1b]8;;javascript:alert(1)\x1b\\link\x1b]8;;\x1b\\\x1b[2Kd\re\x07\x1b(B!");
        assert_eq!(got, [seg("", "a"), seg("fg-1 bold", "red"), seg("", " bclinkde!")]);
        let got = a.feed("\x1b[38;5;12;48;5;200mx\x1b[38;2;1;2;3;4my\x1b[39;49;24m");
        assert_eq!(got, [seg("fg-12", "x"), seg("underline", "y")]);
    }

    #[test]
    fn an_escape_split_between_chunks_is_finished_by_the_next() {
        let mut a = Ansi::new();
        assert_eq!(a.feed("x\x1b[3"), [seg("", "x")]);
        assert_eq!(a.feed("2mgreen\x1b]0;ti"), [seg("fg-2", "green")]);
        assert_eq!(a.feed("tle\x1b\\ok\n"), [seg("fg-2", "ok\n")]);
        assert_eq!(a.feed("\x1b"), []);
        assert_eq!(a.feed("[mé"), [seg("", "é")]);
        assert_eq!(a.feed("\x1b(é\x1bé\u{9b}1mz"), [seg("", "é1mz")]);
    }
}

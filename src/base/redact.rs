//! Secret redaction: a plain multi-string replacer for whole strings, and a streaming variant
//! that also catches a secret split across reads (it holds back any tail that could still grow
//! into a secret) or spanning a newline (it works on the raw bytes, before lines are framed).

use std::collections::BTreeMap;

/// What the shared secret becomes in logs (the contract's replacement).
pub(crate) const SECRET_REPLACEMENT: &str = "SECRET_REMOVED";
/// What a job token becomes in logs.
pub(crate) const TOKEN_REPLACEMENT: &str = "TOKEN_REMOVED";

/// A set of secrets and their replacements. Longer secrets win where two match at one place.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// Sorted longest first.
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    first_bytes: Box<[bool; 256]>,
    max_len: usize,
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor { pairs: Vec::new(), first_bytes: Box::new([false; 256]), max_len: 0 }
    }
}

impl Redactor {
    pub fn new<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut map: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (k, v) in pairs {
            let k = k.as_ref();
            // An empty secret would match everywhere; a one-byte "secret" would shred all output.
            if k.len() >= 2 {
                map.insert(k.to_vec(), v.as_ref().to_vec());
            }
        }
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = map.into_iter().collect();
        pairs.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let mut first_bytes = Box::new([false; 256]);
        for (k, _) in &pairs {
            first_bytes[k[0] as usize] = true;
        }
        let max_len = pairs.first().map(|p| p.0.len()).unwrap_or(0);
        Redactor { pairs, first_bytes, max_len }
    }

    /// The contract's redactor: the shared secret, the job token, then the job's
    /// `redactedValues`, which win on a clash.
    pub fn for_job(shared_secret: &str, redacted_values: &BTreeMap<String, String>) -> Self {
        Self::for_job_with_token(shared_secret, "", redacted_values)
    }

    pub fn for_job_with_token(
        shared_secret: &str,
        token: &str,
        redacted_values: &BTreeMap<String, String>,
    ) -> Self {
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        all.insert(shared_secret.to_string(), SECRET_REPLACEMENT.to_string());
        all.insert(token.to_string(), TOKEN_REPLACEMENT.to_string());
        for (k, v) in redacted_values {
            all.insert(k.clone(), v.clone());
        }
        Self::new(all)
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The longest secret at `buf[i..]`, if one is complete there.
    fn match_at(&self, buf: &[u8], i: usize) -> Option<usize> {
        if !self.first_bytes[buf[i] as usize] {
            return None;
        }
        self.pairs.iter().position(|(k, _)| buf[i..].starts_with(k))
    }

    /// Whether `buf[i..]` (which reaches the end of the buffer) could still become a secret.
    fn could_grow(&self, buf: &[u8], i: usize) -> bool {
        let tail = &buf[i..];
        self.first_bytes[buf[i] as usize]
            && self.pairs.iter().any(|(k, _)| k.len() > tail.len() && k.starts_with(tail))
    }

    /// Replaces every secret in `input`.
    pub fn redact_bytes(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        self.redact_into(input, &mut out, false);
        out
    }

    pub fn redact_str(&self, input: &str) -> String {
        if self.pairs.is_empty() {
            return input.to_string();
        }
        String::from_utf8_lossy(&self.redact_bytes(input.as_bytes())).into_owned()
    }

    /// Redacts `buf` into `out`; with `hold`, stops at a tail that could still grow into a
    /// secret and returns its start, else returns `buf.len()`.
    fn redact_into(&self, buf: &[u8], out: &mut Vec<u8>, hold: bool) -> usize {
        let mut i = 0;
        let mut plain_from = 0;
        while i < buf.len() {
            if !self.first_bytes[buf[i] as usize] {
                i += 1;
                continue;
            }
            if let Some(p) = self.match_at(buf, i) {
                out.extend_from_slice(&buf[plain_from..i]);
                out.extend_from_slice(&self.pairs[p].1);
                i += self.pairs[p].0.len();
                plain_from = i;
                continue;
            }
            if hold && buf.len() - i < self.max_len && self.could_grow(buf, i) {
                out.extend_from_slice(&buf[plain_from..i]);
                return i;
            }
            i += 1;
        }
        out.extend_from_slice(&buf[plain_from..]);
        buf.len()
    }

    /// A streaming redactor for one output stream.
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor { redactor: self.clone(), pending: Vec::new() }
    }
}

/// Redacts a byte stream that arrives in arbitrary pieces.
#[derive(Debug, Clone)]
pub struct StreamRedactor {
    redactor: Redactor,
    pending: Vec<u8>,
}

impl StreamRedactor {
    /// Feeds `data`; returns what is safe to show now.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.redactor.is_empty() {
            return data.to_vec();
        }
        self.pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.pending.len());
        let kept_from = self.redactor.redact_into(&self.pending, &mut out, true);
        self.pending.drain(..kept_from);
        out
    }

    /// Ends the stream: returns whatever was held back, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        self.redactor.redact_bytes(&rest)
    }

    /// Bytes held back because they could be the start of a secret.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Redactor {
        let mut m = BTreeMap::new();
        m.insert("hunter2hunter2".to_string(), "PASSWORD_REMOVED".to_string());
        m.insert("line1\nline2".to_string(), "MULTILINE_REMOVED".to_string());
        Redactor::for_job("the-shared-secret-0123456789", &m)
    }

    #[test]
    fn whole_strings() {
        let r = r();
        assert_eq!(
            r.redact_str("a hunter2hunter2 b the-shared-secret-0123456789 c"),
            "a PASSWORD_REMOVED b SECRET_REMOVED c"
        );
        assert_eq!(r.redact_str("x line1\nline2 y"), "x MULTILINE_REMOVED y");
        assert_eq!(r.redact_str("nothing"), "nothing");
    }

    #[test]
    fn job_values_win_over_the_shared_secret() {
        let mut m = BTreeMap::new();
        m.insert("the-shared-secret-0123456789".to_string(), "MINE".to_string());
        let r = Redactor::for_job("the-shared-secret-0123456789", &m);
        assert_eq!(r.redact_str("the-shared-secret-0123456789"), "MINE");
    }

    #[test]
    fn split_across_every_possible_boundary() {
        let r = r();
        let text = b"start hunter2hunter2 mid line1\nline2 end the-shared-secret-0123456789";
        for cut in 0..=text.len() {
            for cut2 in cut..=text.len() {
                let mut s = r.stream();
                let mut out = s.push(&text[..cut]);
                out.extend(s.push(&text[cut..cut2]));
                out.extend(s.push(&text[cut2..]));
                out.extend(s.finish());
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    "start PASSWORD_REMOVED mid MULTILINE_REMOVED end SECRET_REMOVED",
                    "cuts {cut} {cut2}"
                );
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let r = r();
        let text = b"hunter2hunter2hunter2hunter2 hunter2";
        let mut s = r.stream();
        let mut out = Vec::new();
        for b in text {
            out.extend(s.push(&[*b]));
        }
        out.extend(s.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "PASSWORD_REMOVEDPASSWORD_REMOVED hunter2");
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let r = r();
        let mut s = r.stream();
        assert_eq!(s.push(b"abc hunt"), b"abc ");
        assert_eq!(s.held(), 4);
        assert_eq!(s.push(b"ing"), b"hunting");
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn empty_and_tiny_secrets_are_ignored() {
        let r = Redactor::new([("", "X"), ("a", "Y")]);
        assert!(r.is_empty());
        assert_eq!(r.redact_str("banana"), "banana");
    }
}

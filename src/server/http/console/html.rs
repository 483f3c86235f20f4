//! A tiny HTML builder whose only way to put a string into a page escapes it: tag and attribute
//! names are `&'static str` (so written in this crate's source), attribute values and text are
//! escaped, and a URL attribute that does not start with `/` (ours all do) becomes `#`. Nothing
//! else writes into the buffer, so no job-controlled text can become markup.

/// An HTML document or fragment being written.
#[derive(Debug, Default)]
pub(super) struct Html {
    buf: String,
}

/// The attributes that hold URLs: only same-origin paths are written.
const URL_ATTRS: &[&str] = &["href", "src", "action", "formaction", "data-events"];

fn escape_into(buf: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => buf.push_str("&amp;"),
            '<' => buf.push_str("&lt;"),
            '>' => buf.push_str("&gt;"),
            '"' => buf.push_str("&quot;"),
            '\'' => buf.push_str("&#39;"),
            c => buf.push(c),
        }
    }
}

/// A path on this server: `/...`, but not `//host` or `/\host` (which browsers read as another host).
fn is_local_path(v: &str) -> bool {
    v.starts_with('/') && !v.starts_with("//") && !v.starts_with("/\\")
}

impl Html {
    /// A document: the doctype and nothing else yet.
    pub(super) fn document() -> Html {
        Html { buf: String::from("<!DOCTYPE html>\n") }
    }

    /// An empty fragment.
    pub(super) fn fragment() -> Html {
        Html::default()
    }

    fn attrs(&mut self, attrs: &[(&'static str, &str)]) {
        for (name, value) in attrs {
            self.buf.push(' ');
            self.buf.push_str(name);
            self.buf.push_str("=\"");
            let safe = if URL_ATTRS.contains(name) && !is_local_path(value) { "#" } else { value };
            escape_into(&mut self.buf, safe);
            self.buf.push('"');
        }
    }

    /// `<tag attrs>`; the caller closes it.
    pub(super) fn open(&mut self, tag: &'static str, attrs: &[(&'static str, &str)]) -> &mut Html {
        self.buf.push('<');
        self.buf.push_str(tag);
        self.attrs(attrs);
        self.buf.push('>');
        self
    }

    /// `</tag>`.
    pub(super) fn close(&mut self, tag: &'static str) -> &mut Html {
        self.buf.push_str("</");
        self.buf.push_str(tag);
        self.buf.push('>');
        self
    }

    /// An element without content (`<input ...>`, `<meta ...>`).
    pub(super) fn void(&mut self, tag: &'static str, attrs: &[(&'static str, &str)]) -> &mut Html {
        self.open(tag, attrs)
    }

    /// Escaped text.
    pub(super) fn text(&mut self, s: &str) -> &mut Html {
        escape_into(&mut self.buf, s);
        self
    }

    /// `<tag attrs>text</tag>`.
    pub(super) fn elem(
        &mut self,
        tag: &'static str,
        attrs: &[(&'static str, &str)],
        text: &str,
    ) -> &mut Html {
        self.open(tag, attrs).text(text).close(tag)
    }

    /// A fragment written by another builder.
    pub(super) fn append(&mut self, other: Html) -> &mut Html {
        self.buf.push_str(&other.buf);
        self
    }

    pub(super) fn finish(self) -> String {
        self.buf
    }
}

/// Percent-encodes a query-string value (everything but RFC 3986's unreserved characters).
pub(super) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `application/x-www-form-urlencoded` (a form body or a query string); malformed
/// escapes are kept as they are.
pub(super) fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    fn decode(s: &[u8]) -> String {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < s.len() => {
                    match std::str::from_utf8(&s[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut it = pair.splitn(2, |b| *b == b'=');
            let k = decode(it.next().unwrap_or_default());
            let v = decode(it.next().unwrap_or_default());
            (k, v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_attributes_are_escaped() {
        let mut h = Html::fragment();
        h.elem("p", &[("title", "\"><img src=x onerror=alert(1)>")], "<script>alert('1')</script>&");
        assert_eq!(
            h.finish(),
            "<p title=\"&quot;&gt;&lt;img src=x onerror=alert(1)&gt;\">\
             &lt;script&gt;alert(&#39;1&#39;)&lt;/script&gt;&amp;</p>"
        );
    }

    #[test]
    fn url_attributes_keep_only_local_paths() {
        let mut h = Html::fragment();
        h.elem("a", &[("href", "javascript:alert(1)")], "x");
        h.elem("a", &[("href", "//evil.example/")], "y");
        h.elem("a", &[("href", "/\\evil.example/")], "w");
        h.elem("a", &[("href", "/admin/jobs?repository=a%20b")], "z");
        assert_eq!(
            h.finish(),
            "<a href=\"#\">x</a><a href=\"#\">y</a><a href=\"#\">w</a><a href=\"/admin/jobs?repository=a%20b\">z</a>"
        );
    }

    #[test]
    fn forms_and_urls_round_trip() {
        let v = "a b&c=d/é%";
        let body = format!("csrf=x&repo={}", url_encode(v));
        assert_eq!(
            parse_form(body.as_bytes()),
            [("csrf".into(), "x".into()), ("repo".into(), v.to_string())]
        );
        assert_eq!(
            parse_form(b"a=1+2&b=%zz&c=%4"),
            [("a".into(), "1 2".into()), ("b".into(), "%zz".into()), ("c".into(), "%4".into())]
        );
    }
}

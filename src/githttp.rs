//! Git's smart HTTP protocol (v0 and v2), served by `git upload-pack --stateless-rpc` as
//! `git http-backend` runs it, without the CGI program: this module checks the request, passes
//! its body to git (decompressed) and streams git's answer back. Read-only: `git-receive-pack`
//! is refused before git runs.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use futures_util::StreamExt;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which part of the protocol a request path names, relative to the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitRoute {
    InfoRefs,
    UploadPack,
}

impl GitRoute {
    /// Splits `name/info/refs` or `name/git-upload-pack` into the repository name and the route.
    pub fn split(path: &str) -> Option<(&str, GitRoute)> {
        let path = path.trim_start_matches('/');
        if let Some(name) = path.strip_suffix("/info/refs") {
            return Some((name, GitRoute::InfoRefs));
        }
        if let Some(name) = path.strip_suffix("/git-upload-pack") {
            return Some((name, GitRoute::UploadPack));
        }
        None
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Serves one smart-HTTP request for the repository at `repo` (a bare repository or a work
/// tree) with `git upload-pack`.
pub async fn serve(
    repo: &Path,
    route: GitRoute,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Response<Body> {
    let query = query.unwrap_or("");
    match (route, method) {
        (GitRoute::InfoRefs, &Method::GET) => {
            if query != "service=git-upload-pack" {
                return error(
                    StatusCode::FORBIDDEN,
                    "only git-upload-pack is served (the dumb protocol and pushes are not)",
                );
            }
        }
        (GitRoute::UploadPack, &Method::POST) => {}
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed for this git route"),
    }
    let protocol = headers.get("git-protocol").and_then(|v| v.to_str().ok()).filter(|v| valid_protocol(v));
    let v2 = protocol.is_some_and(|p| p.split(':').any(|kv| kv == "version=2"));
    let request = match route {
        GitRoute::InfoRefs => Vec::new(),
        GitRoute::UploadPack => {
            let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            if kind != "application/x-git-upload-pack-request" {
                return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not a git-upload-pack request");
            }
            let body = match axum::body::to_bytes(body, MAX_REQUEST).await {
                Ok(b) => b,
                Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("reading the request: {e}")),
            };
            let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("");
            match encoding {
                "" | "identity" => body.to_vec(),
                // git compresses a request body over 1 KiB (a long negotiation).
                "gzip" | "x-gzip" => match gunzip(&body) {
                    Ok(b) => b,
                    Err(e) => {
                        return error(StatusCode::BAD_REQUEST, &format!("decompressing the request: {e}"))
                    }
                },
                other => {
                    return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &format!("content encoding {other:?}"))
                }
            }
        }
    };
    // git upload-pack itself, as `git http-backend` runs it, without the two processes of the
    // CGI program in front of it on every request.
    let mut cmd = tokio::process::Command::from(crate::base::proc::command("git"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", "/nonexistent")
        // Executors fetch one commit by its hash, and sparse jobs ask for a blob filter.
        .env("GIT_CONFIG_COUNT", "2")
        .env("GIT_CONFIG_KEY_0", "uploadpack.allowAnySHA1InWant")
        .env("GIT_CONFIG_VALUE_0", "true")
        .env("GIT_CONFIG_KEY_1", "uploadpack.allowFilter")
        .env("GIT_CONFIG_VALUE_1", "true")
        .arg("upload-pack")
        .arg("--stateless-rpc");
    if route == GitRoute::InfoRefs {
        cmd.arg("--http-backend-info-refs");
    }
    cmd.arg(repo).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    if let Some(p) = protocol {
        cmd.env("GIT_PROTOCOL", p);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot start git upload-pack: {e}"))
        }
    };
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "git upload-pack has no pipes");
    };
    tokio::spawn(async move {
        let _ = stdin.write_all(&request).await;
        let _ = stdin.shutdown().await;
    });
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut sink).await;
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        let text = String::from_utf8_lossy(&sink);
        for line in text.lines().filter(|l| !l.trim().is_empty()).take(20) {
            tracing::warn!(target: "git upload-pack", "{line}");
        }
    });
    // Nothing is answered before git has: a repository it refuses is an error, not an empty 200.
    let mut first = vec![0u8; 8192];
    let n = match stdout.read(&mut first).await {
        Ok(n) => n,
        Err(e) => return error(StatusCode::BAD_GATEWAY, &format!("reading git upload-pack: {e}")),
    };
    if n == 0 {
        let status = child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("git upload-pack answered nothing ({status})"),
        );
    }
    first.truncate(n);
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let mut head = Vec::new();
    if route == GitRoute::InfoRefs && !v2 {
        head.extend_from_slice(b"001e# service=git-upload-pack\n0000");
    }
    head.extend_from_slice(&first);
    let rest = tokio_util::io::ReaderStream::new(stdout);
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(bytes::Bytes::from(head)) })
        .chain(rest);
    let mut response = Response::new(Body::from_stream(stream));
    let kind = match route {
        GitRoute::InfoRefs => "application/x-git-upload-pack-advertisement",
        GitRoute::UploadPack => "application/x-git-upload-pack-result",
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, max-age=0, must-revalidate"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(header::EXPIRES, HeaderValue::from_static("Fri, 01 Jan 1980 00:00:00 GMT"));
    response
}

/// Largest request body (a negotiation; compressed or not) and its decompressed size.
const MAX_REQUEST: usize = 64 << 20;

fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data).take(MAX_REQUEST as u64 + 1).read_to_end(&mut out)?;
    if out.len() > MAX_REQUEST {
        return Err(std::io::Error::other("over 64 MiB decompressed"));
    }
    Ok(out)
}

/// A `Git-Protocol` header git may be given (`version=2`, colon-separated `key[=value]`).
fn valid_protocol(v: &str) -> bool {
    !v.is_empty() && v.len() <= 256 && v.chars().all(|c| c.is_ascii_alphanumeric() || "=:._-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split() {
        assert_eq!(GitRoute::split("github.com/a/b/info/refs"), Some(("github.com/a/b", GitRoute::InfoRefs)));
        assert_eq!(GitRoute::split("/r/git-upload-pack"), Some(("r", GitRoute::UploadPack)));
        assert_eq!(GitRoute::split("r/git-receive-pack"), None);
        assert_eq!(GitRoute::split("r/HEAD"), None);
    }
}

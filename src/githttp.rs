//! Git's smart HTTP protocol (v0 and v2), served by git's own `git http-backend` as a CGI
//! program: this module only bridges an HTTP request to it and streams both bodies. Read-only:
//! `git-receive-pack` is refused before git runs.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use futures_util::StreamExt;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

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

    fn path_info(self) -> &'static str {
        match self {
            GitRoute::InfoRefs => "/info/refs",
            GitRoute::UploadPack => "/git-upload-pack",
        }
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
/// tree) through `git http-backend`.
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
    let mut cmd = tokio::process::Command::from(crate::base::proc::command("git"));
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
        .env("GIT_PROJECT_ROOT", repo)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", "/nonexistent")
        .env("PATH_INFO", route.path_info())
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", "127.0.0.1")
        // Executors fetch one commit by its hash, and sparse jobs ask for a blob filter.
        .env("GIT_CONFIG_COUNT", "3")
        .env("GIT_CONFIG_KEY_0", "uploadpack.allowAnySHA1InWant")
        .env("GIT_CONFIG_VALUE_0", "true")
        .env("GIT_CONFIG_KEY_1", "uploadpack.allowFilter")
        .env("GIT_CONFIG_VALUE_1", "true")
        .env("GIT_CONFIG_KEY_2", "http.receivepack")
        .env("GIT_CONFIG_VALUE_2", "false")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, env) in [
        (header::CONTENT_TYPE, "CONTENT_TYPE"),
        (header::CONTENT_ENCODING, "HTTP_CONTENT_ENCODING"),
        (header::CONTENT_LENGTH, "CONTENT_LENGTH"),
    ] {
        if let Some(v) = headers.get(&name).and_then(|v| v.to_str().ok()) {
            cmd.env(env, v);
        }
    }
    if let Some(v) = headers.get("git-protocol").and_then(|v| v.to_str().ok()) {
        cmd.env("HTTP_GIT_PROTOCOL", v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot start git http-backend: {e}"))
        }
    };
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "git http-backend has no pipes");
    };
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            if stdin.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = stdin.shutdown().await;
    });
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut sink).await;
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        let text = String::from_utf8_lossy(&sink);
        for line in text.lines().filter(|l| !l.trim().is_empty()).take(20) {
            eprintln!("git http-backend: {line}");
        }
    });
    let mut reader = BufReader::new(stdout);
    let mut status = StatusCode::OK;
    let mut response_headers = HeaderMap::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(0) => return error(StatusCode::BAD_GATEWAY, "git http-backend ended before its headers"),
            Ok(_) => {}
            Err(e) => return error(StatusCode::BAD_GATEWAY, &format!("reading git http-backend: {e}")),
        }
        if line.len() > 8192 {
            return error(StatusCode::BAD_GATEWAY, "git http-backend sent an oversized header");
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().and_then(|c| c.parse::<u16>().ok());
            status = code.and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_GATEWAY);
        } else if let (Ok(n), Ok(v)) =
            (header::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value))
        {
            response_headers.append(n, v);
        }
    }
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let mut response = Response::new(Body::from_stream(tokio_util::io::ReaderStream::new(reader)));
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    response
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

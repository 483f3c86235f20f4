//! Repositories: git's smart HTTP protocol under `/.executors/git/` for the token of a job of
//! that repository (served by git's own `upload-pack`), and the admin's `/api/repos` to
//! register, list and remove them.

use anyhow::Context;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;

use super::auth::{AdminToken, GitCaller};
use super::{db, http_err, json_response, query_params, read_json, HttpError, HttpResult, Shared};
use crate::githttp::GitRoute;
use crate::server::store;

/// The repository and git route a `/.executors/git/...` path names (404 for any other path). An
/// extractor so that it is answered before the credentials that follow it.
pub(super) struct GitTarget {
    name: String,
    route: GitRoute,
}

#[axum::async_trait]
impl FromRequestParts<Shared> for GitTarget {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _app: &Shared) -> HttpResult<Self> {
        let path = parts.uri.path().strip_prefix("/.executors/git/").unwrap_or("");
        let Some((name, route)) = GitRoute::split(path) else {
            return Err(http_err(StatusCode::NOT_FOUND, format!("no git route for {}", parts.uri.path())));
        };
        Ok(GitTarget { name: name.to_string(), route })
    }
}

/// `GET .../info/refs?service=git-upload-pack` and `POST .../git-upload-pack` of a registered
/// repository, for the token of a job whose `repositoryName` is that repository (or an executor
/// using the contract's shared-secret fallback).
pub(super) async fn git_route(
    State(app): State<Shared>,
    GitTarget { name, route }: GitTarget,
    caller: GitCaller,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<Response> {
    if let GitCaller::Job(job) = &caller {
        if job.repository != name {
            return Err(http_err(StatusCode::FORBIDDEN, "invalid token for this repository"));
        }
    }
    let lookup = name.clone();
    let Some(dir) = db(&app, move |s| s.repo_path(&lookup)).await? else {
        return Err(http_err(StatusCode::NOT_FOUND, format!("repository {name:?} is not served here")));
    };
    let dir = std::path::PathBuf::from(dir);
    Ok(crate::githttp::serve(&dir, route, &method, uri.query(), &headers, body).await)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRepo {
    name: String,
    path: String,
}

/// `POST /api/repos {"name", "path"}`: serves the git repository at `path` (on this host) as
/// `name`. The path must be an existing git repository.
pub(super) async fn add_repo(State(app): State<Shared>, _: AdminToken, body: Body) -> HttpResult<Response> {
    let req: AddRepo = read_json(body, app.json_limit).await?;
    crate::git::validate_repository_name(&req.name)
        .map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let path = std::path::PathBuf::from(&req.path);
    if !path.is_absolute() {
        return Err(http_err(
            StatusCode::BAD_REQUEST,
            format!("repository path {:?} must be absolute", req.path),
        ));
    }
    let check = tokio::process::Command::from(crate::base::proc::command("git"))
        .arg("-C")
        .arg(&path)
        .args(["rev-parse", "--git-dir"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .await
        .context("running git rev-parse")?;
    if !check.status.success() {
        return Err(http_err(StatusCode::BAD_REQUEST, format!("{} is not a git repository", path.display())));
    }
    let (name, p) = (req.name.clone(), path.to_string_lossy().into_owned());
    db(&app, move |s| s.add_repo(&name, &p, store::now_ms())).await?;
    json_response(StatusCode::CREATED, &serde_json::json!({"name": req.name, "path": req.path}))
}

pub(super) async fn list_repos(State(app): State<Shared>, _: AdminToken) -> HttpResult<Response> {
    let repos = db(&app, |s| s.repos()).await?;
    json_response(StatusCode::OK, &serde_json::json!({ "repos": repos }))
}

/// `DELETE /api/repos?name=NAME`.
pub(super) async fn remove_repo(
    State(app): State<Shared>,
    _: AdminToken,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
) -> HttpResult<Response> {
    let q = query_params(query)?;
    let name = q.get("name").cloned().ok_or_else(|| http_err(StatusCode::BAD_REQUEST, "missing ?name="))?;
    let n = name.clone();
    if db(&app, move |s| s.remove_repo(&n)).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(http_err(StatusCode::NOT_FOUND, format!("repository {name:?} is not registered")))
    }
}

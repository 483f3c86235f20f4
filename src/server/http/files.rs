//! The files store: `GET /.executors/files/{bucket}/{key}` for a job whose payload references
//! the file, and the admin's `PUT /api/files/{bucket}/{key}` and `GET /api/files`. The bytes
//! live on disk under their SHA-256, the index in the store.

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::auth::{AdminToken, JobToken};
use super::{db, http_err, json_response, read_limited, App, HttpError, HttpResult, Shared};
use crate::server::store;

/// Checks a files-store bucket or key: plain path segments only.
fn file_name_ok(what: &str, s: &str) -> HttpResult<()> {
    let ok = !s.is_empty()
        && s.len() <= 1024
        && s.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || "-_.~@+=".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(http_err(StatusCode::BAD_REQUEST, format!("malformed {what} {s:?}")))
    }
}

/// The `{bucket}/{key}` of a files route, both checked by `file_name_ok` (400 otherwise). An
/// extractor so that it is answered before the credentials that follow it.
pub(super) struct FileKey {
    bucket: String,
    key: String,
}

#[axum::async_trait]
impl FromRequestParts<Shared> for FileKey {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        let (bucket, key) = Path::<(String, String)>::from_request_parts(parts, app)
            .await
            .map(|Path(p)| p)
            .map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("invalid path: {e}")))?;
        file_name_ok("bucket", &bucket)?;
        file_name_ok("key", &key)?;
        Ok(FileKey { bucket, key })
    }
}

fn file_blob_path(app: &App, sha256: &str) -> std::path::PathBuf {
    app.cfg.data_dir.join("files").join(sha256)
}

/// `GET`/`HEAD /.executors/files/{bucket}/{key}`: a file the job's own payload references.
pub(super) async fn files_get(
    State(app): State<Shared>,
    FileKey { bucket, key }: FileKey,
    caller: JobToken,
) -> HttpResult<Response> {
    let (b, k) = (bucket.clone(), key.clone());
    let (payload, file) = db(&app, move |s| Ok((s.payload(caller.id)?, s.file(&b, &k)?))).await?;
    let referenced = payload
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .and_then(|v| v.get("files").and_then(|f| f.as_object()).cloned())
        .map(|files| {
            files.values().any(|f| {
                f.get("bucket").and_then(|x| x.as_str()) == Some(bucket.as_str())
                    && f.get("key").and_then(|x| x.as_str()) == Some(key.as_str())
            })
        })
        .unwrap_or(false);
    if !referenced {
        return Err(http_err(StatusCode::FORBIDDEN, "the job does not reference this file"));
    }
    let Some((sha, size)) = file else {
        return Err(http_err(StatusCode::NOT_FOUND, format!("no file {bucket}/{key}")));
    };
    let f = tokio::fs::File::open(file_blob_path(&app, &sha))
        .await
        .with_context(|| format!("opening the stored file {bucket}/{key}"))?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::CONTENT_LENGTH, HeaderValue::from(size)),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(f)),
    )
        .into_response())
}

/// `PUT /api/files/{bucket}/{key}`: stores a file (admin), content-addressed on disk.
pub(super) async fn put_file(
    State(app): State<Shared>,
    _: AdminToken,
    FileKey { bucket, key }: FileKey,
    body: Body,
) -> HttpResult<Response> {
    let bytes = read_limited(body, app.cfg.artifact_max_bytes as usize).await?;
    let sha = hex::encode(Sha256::digest(&bytes));
    let dir = app.cfg.data_dir.join("files");
    let dest = file_blob_path(&app, &sha);
    let size = bytes.len() as i64;
    tokio::task::spawn_blocking(move || -> Result<()> {
        crate::base::fs::private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::base::fs::write_atomic(&dest, &bytes)
    })
    .await
    .map_err(|e| anyhow::anyhow!("file store task failed: {e}"))??;
    let (b, k, s2) = (bucket.clone(), key.clone(), sha.clone());
    db(&app, move |s| s.put_file(&b, &k, &s2, size, store::now_ms())).await?;
    json_response(
        StatusCode::CREATED,
        &serde_json::json!({"bucket": bucket, "key": key, "sha256": sha, "size": size}),
    )
}

pub(super) async fn list_files(State(app): State<Shared>, _: AdminToken) -> HttpResult<Response> {
    let files = db(&app, |s| s.files()).await?;
    json_response(StatusCode::OK, &serde_json::json!({ "files": files }))
}

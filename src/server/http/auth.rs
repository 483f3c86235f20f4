//! Authentication as axum extractors: the executors' shared secret (`ExecutorSecret`), a job's
//! caller on a queue route (`JobCaller`: the job's token or the shared secret), a job's token on
//! the git and files routes (`JobToken`), the admin token (`AdminToken`), and the admin or
//! read-only metrics token (`MetricsReader`). A handler names the one it needs among its
//! arguments; extractors run in argument order, so a handler lists them in the order its checks
//! are answered.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::{db, http_err, path_param, HttpError, HttpResult, Shared};
use crate::protocol;
use crate::server::store;

pub(super) fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

/// Constant-time comparison (of digests, so the length of the secret does not leak either).
pub(super) fn secret_matches(given: &str, want: &[u8; 32]) -> bool {
    let got = digest(given.as_bytes());
    got.iter().zip(want.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// `Authorization: <scheme> <token>`; anything else is 401.
fn parse_auth(headers: &HeaderMap) -> HttpResult<(String, String)> {
    let unauthorized = || http_err(StatusCode::UNAUTHORIZED, "missing or malformed Authorization header");
    let value = headers.get(header::AUTHORIZATION).ok_or_else(unauthorized)?;
    let value = value.to_str().map_err(|_| unauthorized())?;
    let mut parts = value.split(' ');
    let (Some(scheme), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(unauthorized());
    };
    if scheme.is_empty() || token.is_empty() {
        return Err(unauthorized());
    }
    Ok((scheme.to_string(), token.to_string()))
}

/// The `X-Sourcegraph-Job-ID` and `X-Sourcegraph-Executor-Name` headers of a job route.
fn job_headers(headers: &HeaderMap) -> HttpResult<(i64, String)> {
    let id = headers
        .get(protocol::HEADER_JOB_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            http_err(StatusCode::BAD_REQUEST, "missing or non-integer X-Sourcegraph-Job-ID header")
        })?;
    let executor = headers
        .get(protocol::HEADER_EXECUTOR_NAME)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| http_err(StatusCode::BAD_REQUEST, "missing X-Sourcegraph-Executor-Name header"))?;
    Ok((id, executor))
}

/// The SHA-256 the store keeps of a job token given in hex; 401 when it is not hex.
fn token_hash(token: &str) -> HttpResult<String> {
    let raw = hex::decode(token).map_err(|_| http_err(StatusCode::UNAUTHORIZED, "invalid token"))?;
    Ok(store::sha256_hex(&raw))
}

/// A queue named by the `:queue` path segment that this server serves (404 otherwise).
pub(super) struct KnownQueue(pub String);

#[axum::async_trait]
impl FromRequestParts<Shared> for KnownQueue {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        let queue = path_param(Path::<String>::from_request_parts(parts, app).await)?;
        if app.cfg.queues.contains(&queue) {
            Ok(KnownQueue(queue))
        } else {
            Err(http_err(StatusCode::NOT_FOUND, format!("unknown queue {queue:?}")))
        }
    }
}

/// An executor: `Authorization: token-executor <shared secret>` (401 otherwise).
pub(super) struct ExecutorSecret;

#[axum::async_trait]
impl FromRequestParts<Shared> for ExecutorSecret {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        let (scheme, token) = parse_auth(&parts.headers)?;
        if scheme != protocol::SCHEME_EXECUTOR || !secret_matches(&token, &app.secret_digest) {
            return Err(http_err(StatusCode::UNAUTHORIZED, "invalid executor credentials"));
        }
        Ok(ExecutorSecret)
    }
}

/// The token of `Authorization: Bearer <token>`; 401 with `needs` for another scheme or none.
fn bearer(parts: &Parts, needs: &str) -> HttpResult<String> {
    let (scheme, token) = parse_auth(&parts.headers)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(http_err(StatusCode::UNAUTHORIZED, needs));
    }
    Ok(token)
}

/// The admin API's caller: `Authorization: Bearer <admin token>` (401 for another scheme, 403
/// for another token).
pub(super) struct AdminToken;

#[axum::async_trait]
impl FromRequestParts<Shared> for AdminToken {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        let token = bearer(parts, "the admin API needs Authorization: Bearer <admin token>")?;
        if !secret_matches(&token, &app.admin_digest) {
            return Err(http_err(StatusCode::FORBIDDEN, "invalid admin token"));
        }
        Ok(AdminToken)
    }
}

/// A reader of `/metrics` and `/api/queues`: `Authorization: Bearer <token>` with the admin
/// token or the read-only metrics token (an autoscaler's, which opens nothing else).
pub(super) struct MetricsReader;

#[axum::async_trait]
impl FromRequestParts<Shared> for MetricsReader {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        let token = bearer(parts, "metrics need Authorization: Bearer <metrics or admin token>")?;
        let metrics = app.metrics_digest.as_ref().is_some_and(|d| secret_matches(&token, d));
        if !metrics && !secret_matches(&token, &app.admin_digest) {
            return Err(http_err(StatusCode::FORBIDDEN, "invalid metrics token"));
        }
        Ok(MetricsReader)
    }
}

/// The caller of a job route under a served queue (`KnownQueue` first): the job and executor
/// headers with either the job's token (`Bearer`, which must be that job's in that queue) or
/// the shared secret, from an executor that has heartbeated.
pub(super) struct JobCaller {
    pub id: i64,
    pub executor: String,
}

#[axum::async_trait]
impl FromRequestParts<Shared> for JobCaller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        job_caller(parts, app, false).await
    }
}

/// The caller of markComplete: a [`JobCaller`], or the retry of a completion that committed
/// (its answer lost with the connection), whose job's token is spent: the completed job still
/// knows the token's digest, and the retry is answered as the first call was.
pub(super) struct CompletingCaller(pub JobCaller);

#[axum::async_trait]
impl FromRequestParts<Shared> for CompletingCaller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        job_caller(parts, app, true).await.map(CompletingCaller)
    }
}

async fn job_caller(parts: &mut Parts, app: &Shared, completed_ok: bool) -> HttpResult<JobCaller> {
    let KnownQueue(queue) = KnownQueue::from_request_parts(parts, app).await?;
    let headers = &parts.headers;
    let (scheme, token) = parse_auth(headers)?;
    let (id, executor) = job_headers(headers)?;
    let bearer = scheme.eq_ignore_ascii_case("bearer");
    if !bearer && scheme != protocol::SCHEME_EXECUTOR {
        return Err(http_err(StatusCode::UNAUTHORIZED, format!("unknown Authorization scheme {scheme:?}")));
    }
    let hash = if bearer { Some(token_hash(&token)?) } else { None };
    // One store round trip for both lookups.
    let name = executor.clone();
    let (found, known) = db(app, move |s| {
        let found = match hash {
            Some(h) => match s.job_for_token(&h)? {
                None if completed_ok => {
                    s.completed_with_token(id, &h)?.map(|queue| (id, queue, String::new()))
                }
                found => found,
            },
            None => None,
        };
        Ok((found, s.executor_known(&name)?))
    })
    .await?;
    if bearer {
        let Some((token_job, token_queue, _repo)) = found else {
            return Err(http_err(StatusCode::UNAUTHORIZED, "invalid token"));
        };
        if token_job != id || token_queue != queue {
            return Err(http_err(StatusCode::FORBIDDEN, "invalid token"));
        }
    } else if !secret_matches(&token, &app.secret_digest) {
        return Err(http_err(StatusCode::FORBIDDEN, "invalid executor credentials"));
    }
    if !known {
        return Err(http_err(
            StatusCode::UNAUTHORIZED,
            format!("unknown executor {executor:?}; heartbeat first"),
        ));
    }
    Ok(JobCaller { id, executor })
}

/// The caller of a route outside a queue (git, files): `Authorization: Bearer <job token>` with
/// the job and executor headers; the shared secret does not open the files routes (the git
/// routes take it as the contract's fallback: [`GitCaller`]).
pub(super) struct JobToken {
    pub id: i64,
    /// The repository of the token's job.
    pub repository: String,
}

/// The caller of the git routes: a job's token (which reads only its job's repository), or the
/// contract's fallback for callers without one (Sourcegraph's `test-vm`): `token-executor
/// <secret>` from an executor that has heartbeated, which reads any served repository.
pub(super) enum GitCaller {
    Job(JobToken),
    Executor,
}

#[axum::async_trait]
impl FromRequestParts<Shared> for GitCaller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        let (scheme, token) = parse_auth(&parts.headers)?;
        if scheme != protocol::SCHEME_EXECUTOR {
            return JobToken::from_request_parts(parts, app).await.map(GitCaller::Job);
        }
        let (_id, executor) = job_headers(&parts.headers)?;
        if !secret_matches(&token, &app.secret_digest) {
            return Err(http_err(StatusCode::FORBIDDEN, "invalid executor credentials"));
        }
        let name = executor.clone();
        if !db(app, move |s| s.executor_known(&name)).await? {
            return Err(http_err(
                StatusCode::UNAUTHORIZED,
                format!("unknown executor {executor:?}; heartbeat first"),
            ));
        }
        Ok(GitCaller::Executor)
    }
}

#[axum::async_trait]
impl FromRequestParts<Shared> for JobToken {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> HttpResult<Self> {
        let (scheme, token) = parse_auth(&parts.headers)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(http_err(
                StatusCode::UNAUTHORIZED,
                "this route needs the job's token (Authorization: Bearer)",
            ));
        }
        let (id, _executor) = job_headers(&parts.headers)?;
        let hash = token_hash(&token)?;
        let Some((token_job, _queue, repository)) = db(app, move |s| s.job_for_token(&hash)).await? else {
            return Err(http_err(StatusCode::UNAUTHORIZED, "invalid token"));
        };
        if token_job != id {
            return Err(http_err(StatusCode::FORBIDDEN, "invalid token"));
        }
        Ok(JobToken { id, repository })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_digest() {
        let want = digest(b"correct horse battery staple");
        assert!(secret_matches("correct horse battery staple", &want));
        assert!(!secret_matches("correct horse battery stapl", &want));
    }

    #[test]
    fn authorization_is_one_scheme_and_one_token() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(parse_auth(&headers("Bearer abc")).unwrap(), ("Bearer".into(), "abc".into()));
        for bad in ["Bearer", "Bearer  abc", "Bearer abc def", " abc"] {
            assert_eq!(parse_auth(&headers(bad)).unwrap_err().status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        assert_eq!(parse_auth(&HeaderMap::new()).unwrap_err().status, StatusCode::UNAUTHORIZED);
    }

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = axum::http::Request::builder().uri("/.executors/git/r/info/refs");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    async fn status<T: FromRequestParts<Shared, Rejection = HttpError>>(
        app: &Shared,
        headers: &[(&str, &str)],
    ) -> Option<StatusCode> {
        T::from_request_parts(&mut parts(headers), app).await.err().map(|e| e.status)
    }

    #[tokio::test]
    async fn the_executor_and_admin_extractors_answer_as_the_contract_says() {
        let app = super::super::App::for_tests();
        let secret = format!("token-executor {}", app.cfg.secret);
        let admin = format!("Bearer {}", app.cfg.admin_token);
        let auth = header::AUTHORIZATION.as_str();
        assert_eq!(status::<ExecutorSecret>(&app, &[(auth, &secret)]).await, None);
        assert_eq!(status::<ExecutorSecret>(&app, &[]).await, Some(StatusCode::UNAUTHORIZED));
        assert_eq!(status::<ExecutorSecret>(&app, &[(auth, &admin)]).await, Some(StatusCode::UNAUTHORIZED));
        assert_eq!(status::<AdminToken>(&app, &[(auth, &admin)]).await, None);
        assert_eq!(status::<AdminToken>(&app, &[(auth, &secret)]).await, Some(StatusCode::UNAUTHORIZED));
        let wrong = format!("bearer {}", app.cfg.secret);
        assert_eq!(status::<AdminToken>(&app, &[(auth, &wrong)]).await, Some(StatusCode::FORBIDDEN));
    }

    #[tokio::test]
    async fn a_job_token_opens_only_its_own_job() {
        let app = super::super::App::for_tests();
        let d = db(&app, |s| {
            s.submit("batches", "{}", "repo", 1)?;
            s.dequeue(&["batches".to_string()], "e", 2, |_| 1)
        })
        .await
        .unwrap()
        .unwrap();
        let (auth, id, name) =
            (header::AUTHORIZATION.as_str(), protocol::HEADER_JOB_ID, protocol::HEADER_EXECUTOR_NAME);
        let bearer = format!("Bearer {}", d.token);
        let job = d.id.to_string();
        let ok =
            JobToken::from_request_parts(&mut parts(&[(auth, &bearer), (id, &job), (name, "e")]), &app).await;
        let caller = ok.map_err(|e| e.message).unwrap();
        assert_eq!((caller.id, caller.repository.as_str()), (d.id, "repo"));
        let other = (d.id + 1).to_string();
        let cases: &[(&[(&str, &str)], StatusCode)] = &[
            (&[(auth, &bearer), (id, &other), (name, "e")], StatusCode::FORBIDDEN),
            (&[(auth, "Bearer 00ff"), (id, &job), (name, "e")], StatusCode::UNAUTHORIZED),
            (&[(auth, "Bearer zz"), (id, &job), (name, "e")], StatusCode::UNAUTHORIZED),
            (&[(auth, &bearer), (name, "e")], StatusCode::BAD_REQUEST),
            (&[(auth, &bearer), (id, &job)], StatusCode::BAD_REQUEST),
            (&[(auth, "token-executor x"), (id, &job), (name, "e")], StatusCode::UNAUTHORIZED),
        ];
        for (headers, want) in cases {
            assert_eq!(status::<JobToken>(&app, headers).await, Some(*want), "{headers:?}");
        }
    }
}

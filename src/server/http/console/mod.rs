//! The admin console under `/admin/`: server-rendered pages (executors, jobs, a job with its
//! live log, repositories, files), a sign-in with the admin token that opens a server-side
//! session (cookie: HttpOnly, SameSite=Strict, Secure under TLS, 12 h), a CSRF token on every
//! form that changes state, and strict security headers on every answer. CSS and the one script
//! (live logs) are compiled in.
//!
//! A page is load → view → render: a handler in `pages.rs` loads typed rows from the store,
//! `view.rs` turns them into what the page shows, and `render.rs` writes that as HTML with the
//! escaping `html::Html` builder. Handlers answer failures with `PageError` (here) through `?`;
//! the live log is `events.rs`. This file owns the sessions and the answers' headers.

mod ansi;
mod events;
mod html;
mod pages;
mod render;
mod view;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::time::Duration;

use super::{read_limited, HttpError, Shared};

pub(super) use events::job_events;
pub(super) use pages::{
    artifacts, asset, cancel, executors, files, home, job, jobs, repos, requeue, sign_in, sign_out,
};

/// How long a session lasts after sign-in.
pub(super) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
const COOKIE: &str = "executor_console";
/// The largest form body the console reads.
const FORM_LIMIT: usize = 16 * 1024;

/// One signed-in browser.
#[derive(Clone)]
struct Session {
    csrf: String,
}

/// The server-side sessions, in the store by the SHA-256 of the cookie's value (a leaked table
/// does not leak cookies): every replica on one PostgreSQL database knows every sign-in, and a
/// restart signs no one out.
pub(super) struct Sessions;

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut raw = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut raw);
    hex::encode(raw)
}

fn session_digest(id: &str) -> String {
    hex::encode(super::auth::digest(id.as_bytes()))
}

impl Sessions {
    /// Opens a session; returns (cookie value, CSRF token).
    async fn open(app: &Shared) -> super::HttpResult<(String, String)> {
        let (id, csrf) = (random_hex(32), random_hex(32));
        let now = crate::server::store::now_ms();
        let expires = now + SESSION_TTL.as_millis() as i64;
        let (digest, c) = (session_digest(&id), csrf.clone());
        super::db(app, move |s| s.open_session(&digest, &c, expires, now)).await?;
        Ok((id, csrf))
    }

    async fn get(app: &Shared, id: &str) -> super::HttpResult<Option<Session>> {
        let digest = session_digest(id);
        let now = crate::server::store::now_ms();
        let csrf = super::db(app, move |s| s.session(&digest, now)).await?;
        Ok(csrf.map(|csrf| Session { csrf }))
    }

    async fn close(app: &Shared, id: &str) -> super::HttpResult<()> {
        let digest = session_digest(id);
        super::db(app, move |s| s.close_session(&digest)).await
    }
}

/// The session cookie's value in the request, if any.
fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Constant-time equality of two strings' digests.
fn same(a: &str, b: &str) -> bool {
    let (x, y) = (super::auth::digest(a.as_bytes()), super::auth::digest(b.as_bytes()));
    x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

/// A signed-in browser: the pages' extractor. Without a live session the answer is a redirect
/// to the sign-in form.
pub(super) struct ConsoleSession {
    id: String,
    csrf: String,
}

#[axum::async_trait]
impl FromRequestParts<Shared> for ConsoleSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Response> {
        let id = cookie_value(&parts.headers).ok_or_else(|| see_other("/admin/"))?;
        let s = Sessions::get(app, &id).await.map_err(IntoResponse::into_response)?;
        let s = s.ok_or_else(|| see_other("/admin/"))?;
        Ok(ConsoleSession { id, csrf: s.csrf })
    }
}

impl ConsoleSession {
    /// Reads a form body and checks its `csrf` field against the session's (403 otherwise).
    async fn form(&self, body: Body) -> Result<HashMap<String, String>, PageError> {
        let bytes = read_limited(body, FORM_LIMIT).await.map_err(PageError::Api)?;
        let form: HashMap<String, String> = html::parse_form(&bytes).into_iter().collect();
        match form.get("csrf") {
            Some(token) if same(token, &self.csrf) => Ok(form),
            _ => Err(PageError::Refused {
                status: StatusCode::FORBIDDEN,
                title: "Refused",
                message: "missing or invalid CSRF token: reload the page and try again".into(),
            }),
        }
    }
}

/// Why a console request was not answered with the page it asked for. Each kind becomes the
/// answer the console has always given for it.
#[derive(Debug)]
pub(super) enum PageError {
    /// The store or the request failed: the error page, with the failure's status and nothing
    /// of its message.
    Failed(HttpError),
    /// A failure answered as the API answers it (a JSON error): sign-in, sign-out, a form's body
    /// and the live log, which no person reads as a page.
    Api(HttpError),
    /// A page of its own: not found, refused, not canceled.
    Refused { status: StatusCode, title: &'static str, message: String },
}

impl PageError {
    /// A 404 page for a job that does not exist.
    fn no_job(id: i64) -> PageError {
        PageError::Refused {
            status: StatusCode::NOT_FOUND,
            title: "Not found",
            message: format!("no job {id}"),
        }
    }
}

impl From<HttpError> for PageError {
    fn from(e: HttpError) -> PageError {
        PageError::Failed(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::Failed(e) => {
                let status = e.into_response().status();
                let message = format!("the console could not answer ({status})");
                page_response(status, render::message_page("Error", &message))
            }
            PageError::Api(e) => e.into_response(),
            PageError::Refused { status, title, message } => {
                page_response(status, render::message_page(title, &message))
            }
        }
    }
}

/// What a console handler answers.
type PageResult = Result<Response, PageError>;

/// The headers every console answer carries.
fn secure(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
}

/// An HTML page with the console's headers.
fn page_response(status: StatusCode, body: String) -> Response {
    let mut resp =
        (status, [(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"))], body)
            .into_response();
    secure(&mut resp);
    resp
}

/// 303 See Other to a console path.
fn see_other(location: &'static str) -> Response {
    see_other_to(location.to_string())
}

fn see_other_to(location: String) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    secure(&mut resp);
    resp
}

/// The `Set-Cookie` value that opens (`Some`) or ends (`None`) a session.
fn set_cookie(value: Option<&str>, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    match value {
        Some(v) => format!(
            "{COOKIE}={v}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            SESSION_TTL.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_open_close_and_compare() {
        let app = crate::server::http::App::for_tests();
        let (id, csrf) = Sessions::open(&app).await.unwrap();
        assert_eq!((id.len(), csrf.len()), (64, 64));
        assert_eq!(Sessions::get(&app, &id).await.unwrap().map(|x| x.csrf), Some(csrf.clone()));
        assert!(Sessions::get(&app, &csrf).await.unwrap().is_none());
        Sessions::close(&app, &id).await.unwrap();
        assert!(Sessions::get(&app, &id).await.unwrap().is_none());
        assert!(same("abc", "abc") && !same("abc", "abd"));
    }

    async fn answer(e: PageError) -> (StatusCode, Option<String>, String) {
        let resp = e.into_response();
        let kind = resp.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string());
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, kind, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn page_errors_answer_as_the_console_always_did() {
        let html = Some("text/html; charset=utf-8".to_string());
        let failed = super::super::http_err(StatusCode::SERVICE_UNAVAILABLE, "store <secret> detail");
        let (status, kind, body) = answer(PageError::Failed(failed)).await;
        assert_eq!((status, &kind), (StatusCode::SERVICE_UNAVAILABLE, &html));
        assert!(body.contains("the console could not answer (503 Service Unavailable)"), "{body}");
        assert!(!body.contains("secret"), "the error page shows no detail: {body}");

        let (status, kind, body) = answer(PageError::no_job(7)).await;
        assert_eq!((status, &kind), (StatusCode::NOT_FOUND, &html));
        assert!(
            body.contains("<title>Not found · executor queue</title>") && body.contains("no job 7"),
            "{body}"
        );

        let api = super::super::http_err(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        let (status, kind, body) = answer(PageError::Api(api)).await;
        assert_eq!((status, kind.as_deref()), (StatusCode::PAYLOAD_TOO_LARGE, Some("application/json")));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"], "body too large");
    }

    #[test]
    fn the_cookie_is_found_among_others_and_set_strictly() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; executor_console=xyz; b=2"));
        assert_eq!(cookie_value(&h).as_deref(), Some("xyz"));
        let c = set_cookie(Some("v"), true);
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/admin", "Max-Age=43200"] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!set_cookie(Some("v"), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}

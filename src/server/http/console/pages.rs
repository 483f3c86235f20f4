//! The console's handlers: each loads what its page needs from the store, builds the view
//! (`view.rs`) and renders it (`render.rs`); failures leave through `?` as a `PageError`.
//! Sign-in and sign-out, executors, jobs (filters and keyset paging), a job (cancel, requeue,
//! artifacts), repositories, files and the embedded assets.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use std::collections::HashMap;
use std::time::Instant;

use super::view::{executor_groups, JobView, JobsView, PAGE_SIZE};
use super::{
    page_response, render, see_other, see_other_to, set_cookie, ConsoleSession, PageError, PageResult,
    FORM_LIMIT,
};
use crate::server::http::{db, job_id_param, path_param, query_params, read_limited, Shared};
use crate::server::store::{self, CancelResult, JobFilter, JobState, RequeueResult};

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// An HTML page answered with 200.
fn ok(html: String) -> PageResult {
    Ok(page_response(StatusCode::OK, html))
}

/// `GET /admin/`: the jobs when signed in, else the sign-in form.
pub(in crate::server::http) async fn home(State(app): State<Shared>, headers: HeaderMap) -> PageResult {
    let session = match super::cookie_value(&headers) {
        Some(id) => super::Sessions::get(&app, &id).await.map_err(PageError::Api)?,
        None => None,
    };
    match session {
        Some(_) => Ok(see_other("/admin/jobs")),
        None => ok(render::sign_in_page(None)),
    }
}

/// `POST /admin/sign-in` with `token`: opens a session on the right admin token.
pub(in crate::server::http) async fn sign_in(State(app): State<Shared>, body: Body) -> PageResult {
    let bytes = read_limited(body, FORM_LIMIT).await.map_err(PageError::Api)?;
    let token = super::html::parse_form(&bytes)
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
        .unwrap_or_default();
    if !super::super::auth::secret_matches(&token, &app.admin_digest) {
        return Ok(page_response(StatusCode::FORBIDDEN, render::sign_in_page(Some("invalid admin token"))));
    }
    let (id, _csrf) = super::Sessions::open(&app).await.map_err(PageError::Api)?;
    let mut resp = see_other("/admin/jobs");
    if let Ok(v) = HeaderValue::from_str(&set_cookie(Some(&id), app.cfg.tls.is_some())) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// `POST /admin/sign-out`: ends the session.
pub(in crate::server::http) async fn sign_out(
    State(app): State<Shared>,
    s: ConsoleSession,
    body: Body,
) -> PageResult {
    s.form(body).await?;
    super::Sessions::close(&app, &s.id).await.map_err(PageError::Api)?;
    let mut resp = see_other("/admin/");
    if let Ok(v) = HeaderValue::from_str(&set_cookie(None, app.cfg.tls.is_some())) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// `GET /admin/assets/{name}`: the embedded stylesheet and script.
pub(in crate::server::http) async fn asset(name: Result<Path<String>, PathRejection>) -> PageResult {
    let (body, kind) = match path_param(name).as_deref() {
        Ok("console.css") => (CSS, "text/css; charset=utf-8"),
        Ok("console.js") => (JS, "text/javascript; charset=utf-8"),
        _ => {
            return Err(PageError::Refused {
                status: StatusCode::NOT_FOUND,
                title: "Not found",
                message: "no such asset".into(),
            })
        }
    };
    let mut resp =
        (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static(kind))], body).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    super::secure(&mut resp);
    Ok(resp)
}

/// `GET /admin/executors`: active executors, then the inactive ones.
pub(in crate::server::http) async fn executors(State(app): State<Shared>, s: ConsoleSession) -> PageResult {
    let active = app.cfg.active_window.as_millis() as i64;
    let (rows, running) =
        db(&app, move |st| Ok((st.executors(store::now_ms(), active)?, st.running_by_executor()?))).await?;
    let figures: HashMap<String, Vec<String>> = {
        let m = app.executor_metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .map(|(name, (_, text))| (name.clone(), crate::server::metrics::executor_figures(text)))
            .collect()
    };
    ok(render::executors_page(&executor_groups(&rows, &running, &figures), &s.csrf))
}

/// `GET /admin/jobs?queue=&state=&repository=&before=`: 50 jobs, newest first, with the time
/// the store and the rendering took in `Server-Timing`.
pub(in crate::server::http) async fn jobs(
    State(app): State<Shared>,
    s: ConsoleSession,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> PageResult {
    let q = query_params(query)?;
    let nonempty = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let filter = JobFilter {
        queue: nonempty("queue").filter(|x| app.cfg.queues.contains(x)),
        state: nonempty("state").and_then(|x| JobState::from_name(&x)),
        repository: nonempty("repository"),
        before: nonempty("before").and_then(|x| x.parse().ok()),
    };
    let started = Instant::now();
    let f = filter.clone();
    let rows = db(&app, move |st| st.job_page(&f, PAGE_SIZE + 1)).await?;
    let db_ms = started.elapsed().as_secs_f64() * 1000.0;
    let render_started = Instant::now();
    let view = JobsView::new(&app.cfg.queues, filter, rows, chrono::Utc::now());
    let body = render::jobs_page(&view, &s.csrf);
    let render_ms = render_started.elapsed().as_secs_f64() * 1000.0;
    let mut resp = page_response(StatusCode::OK, body);
    if let Ok(v) = HeaderValue::from_str(&format!("db;dur={db_ms:.3}, render;dur={render_ms:.3}")) {
        resp.headers_mut().insert("server-timing", v);
    }
    Ok(resp)
}

/// `GET /admin/jobs/{id}`.
pub(in crate::server::http) async fn job(
    State(app): State<Shared>,
    s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
) -> PageResult {
    let id = job_id_param(id)?;
    let found = db(&app, move |st| match st.job(id)? {
        Some(job) => Ok(Some((job, st.logs(id)?, st.kept_on(id)?))),
        None => Ok(None),
    })
    .await?;
    let (job, logs, kept) = found.ok_or_else(|| PageError::no_job(id))?;
    let mut view = JobView::new(job, logs, chrono::Utc::now()).map_err(|e| PageError::Failed(e.into()))?;
    view.kept = kept.map(|k| k.message);
    ok(render::job_page(&view, &s.csrf))
}

/// `GET /admin/jobs/{id}/artifacts`: the download, for the session.
pub(in crate::server::http) async fn artifacts(
    State(app): State<Shared>,
    _s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
) -> PageResult {
    let id = job_id_param(id)?;
    let mut resp = super::super::admin::artifacts_of(&app, id).await?;
    let name = format!("attachment; filename=\"job-{id}-artifacts.tar.gz\"");
    if let Ok(v) = HeaderValue::from_str(&name) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    super::secure(&mut resp);
    Ok(resp)
}

/// The job id in a console form's path, once the form passed its CSRF check.
async fn form_job_id(
    s: &ConsoleSession,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<i64, PageError> {
    let id = job_id_param(id)?;
    s.form(body).await?;
    Ok(id)
}

/// `POST /admin/jobs/{id}/cancel` (CSRF).
pub(in crate::server::http) async fn cancel(
    State(app): State<Shared>,
    s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> PageResult {
    let id = form_job_id(&s, id, body).await?;
    match db(&app, move |st| st.cancel(id, store::now_ms())).await? {
        CancelResult::NotFound => Err(PageError::no_job(id)),
        CancelResult::AlreadyFinal(state) => Err(PageError::Refused {
            status: StatusCode::CONFLICT,
            title: "Not canceled",
            message: format!("job {id} already finished: it is {state}"),
        }),
        CancelResult::Done(_) => {
            app.logs_changed.notify_waiters();
            Ok(see_other_to(format!("/admin/jobs/{id}")))
        }
    }
}

/// `POST /admin/jobs/{id}/requeue` (CSRF): a finished job back to queued.
pub(in crate::server::http) async fn requeue(
    State(app): State<Shared>,
    s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> PageResult {
    let id = form_job_id(&s, id, body).await?;
    match db(&app, move |st| st.requeue(id)).await? {
        RequeueResult::NotFound => Err(PageError::no_job(id)),
        RequeueResult::NotFinal(state) => Err(PageError::Refused {
            status: StatusCode::CONFLICT,
            title: "Not requeued",
            message: format!("job {id} has not finished: it is {state}"),
        }),
        RequeueResult::Done(_) => {
            app.jobs_changed.notify_waiters();
            app.logs_changed.notify_waiters();
            Ok(see_other_to(format!("/admin/jobs/{id}")))
        }
    }
}

/// `GET /admin/repos`: the registered repositories.
pub(in crate::server::http) async fn repos(State(app): State<Shared>, s: ConsoleSession) -> PageResult {
    let rows = db(&app, |st| st.repos()).await?;
    ok(render::repos_page(&rows, &s.csrf))
}

/// `GET /admin/files`: the files store's index (never the contents).
pub(in crate::server::http) async fn files(State(app): State<Shared>, s: ConsoleSession) -> PageResult {
    let rows = db(&app, |st| st.files()).await?;
    ok(render::files_page(&rows, &s.csrf))
}

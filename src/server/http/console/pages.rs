//! The console's handlers and pages: sign-in and sign-out, executors, jobs (filters and keyset
//! paging), a job (steps, log, live events, cancel, requeue, artifacts), repositories, files and
//! the embedded assets.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::ansi::{Ansi, Segment};
use super::html::{url_encode, Html};
use super::{page_response, see_other, see_other_to, set_cookie, ConsoleSession, FORM_LIMIT};
use crate::server::http::{db, job_id_param, path_param, query_params, read_limited, Shared};
use crate::server::store::{self, CancelResult, JobFilter, JobState, RequeueResult, StoredLogEntry};

/// Jobs on one page of the jobs list.
pub const PAGE_SIZE: i64 = 50;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The page frame: head, navigation (with the sign-out form when signed in), then `body`.
fn frame(title: &str, session: Option<&ConsoleSession>, body: Html) -> String {
    let mut h = Html::document();
    h.open("html", &[("lang", "en")]).open("head", &[]);
    h.void("meta", &[("charset", "utf-8")]);
    h.void("meta", &[("name", "viewport"), ("content", "width=device-width, initial-scale=1")]);
    h.elem("title", &[], &format!("{title} · executor queue"));
    h.void("link", &[("rel", "stylesheet"), ("href", "/admin/assets/console.css")]);
    h.open("script", &[("src", "/admin/assets/console.js"), ("defer", "defer")]).close("script");
    h.close("head").open("body", &[]);
    h.open("header", &[]).elem("span", &[("class", "brand")], "executor queue");
    if let Some(s) = session {
        h.open("nav", &[]);
        for (href, name) in [
            ("/admin/jobs", "Jobs"),
            ("/admin/executors", "Executors"),
            ("/admin/repos", "Repositories"),
            ("/admin/files", "Files"),
        ] {
            h.elem("a", &[("href", href)], name);
        }
        h.close("nav");
        h.open("form", &[("method", "post"), ("action", "/admin/sign-out"), ("class", "inline")]);
        h.void("input", &[("type", "hidden"), ("name", "csrf"), ("value", &s.csrf)]);
        h.elem("button", &[("type", "submit"), ("id", "sign-out")], "Sign out");
        h.close("form");
    }
    h.close("header").open("main", &[]).elem("h1", &[], title).append(body).close("main");
    h.close("body").close("html");
    h.finish()
}

/// A page with one message (errors, refusals).
pub(super) fn message_page(title: &str, message: &str) -> String {
    let mut b = Html::fragment();
    b.elem("p", &[("class", "message")], message);
    b.open("p", &[]).elem("a", &[("href", "/admin/")], "Back to the console").close("p");
    frame(title, None, b)
}

fn sign_in_page(error: Option<&str>) -> String {
    let mut b = Html::fragment();
    if let Some(e) = error {
        b.elem("p", &[("class", "error"), ("id", "sign-in-error")], e);
    }
    b.open("form", &[("method", "post"), ("action", "/admin/sign-in"), ("class", "sign-in")]);
    b.elem("label", &[("for", "token")], "Admin token");
    b.void(
        "input",
        &[
            ("type", "password"),
            ("id", "token"),
            ("name", "token"),
            ("autocomplete", "current-password"),
            ("required", "required"),
        ],
    );
    b.elem("button", &[("type", "submit"), ("id", "sign-in")], "Sign in");
    b.close("form");
    frame("Sign in", None, b)
}

/// `GET /admin/`: the jobs when signed in, else the sign-in form.
pub(in crate::server::http) async fn home(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let session = match super::cookie_value(&headers) {
        Some(id) => match super::Sessions::get(&app, &id).await {
            Ok(s) => s,
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    match session {
        Some(_) => see_other("/admin/jobs"),
        None => page_response(StatusCode::OK, sign_in_page(None)),
    }
}

/// `POST /admin/sign-in` with `token`: opens a session on the right admin token.
pub(in crate::server::http) async fn sign_in(State(app): State<Shared>, body: Body) -> Response {
    let bytes = match read_limited(body, FORM_LIMIT).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let token = super::html::parse_form(&bytes)
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
        .unwrap_or_default();
    if !super::super::auth::secret_matches(&token, &app.admin_digest) {
        return page_response(StatusCode::FORBIDDEN, sign_in_page(Some("invalid admin token")));
    }
    let (id, _csrf) = match super::Sessions::open(&app).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let mut resp = see_other("/admin/jobs");
    if let Ok(v) = HeaderValue::from_str(&set_cookie(Some(&id), app.cfg.tls.is_some())) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `POST /admin/sign-out`: ends the session.
pub(in crate::server::http) async fn sign_out(
    State(app): State<Shared>,
    s: ConsoleSession,
    body: Body,
) -> Response {
    if let Err(refused) = s.form(body).await {
        return refused;
    }
    if let Err(e) = super::Sessions::close(&app, &s.id).await {
        return e.into_response();
    }
    let mut resp = see_other("/admin/");
    if let Ok(v) = HeaderValue::from_str(&set_cookie(None, app.cfg.tls.is_some())) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `GET /admin/assets/{name}`: the embedded stylesheet and script.
pub(in crate::server::http) async fn asset(name: Result<Path<String>, PathRejection>) -> Response {
    let (body, kind) = match path_param(name).as_deref() {
        Ok("console.css") => (CSS, "text/css; charset=utf-8"),
        Ok("console.js") => (JS, "text/javascript; charset=utf-8"),
        _ => return page_response(StatusCode::NOT_FOUND, message_page("Not found", "no such asset")),
    };
    let mut resp =
        (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static(kind))], body).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    super::secure(&mut resp);
    resp
}

fn error_page(e: crate::server::http::HttpError) -> Response {
    let resp = e.into_response();
    let status = resp.status();
    page_response(status, message_page("Error", &format!("the console could not answer ({status})")))
}

/// `2026-01-02 03:04:05` from the store's RFC 3339 time.
fn when(t: Option<&str>) -> String {
    match t {
        Some(t) => t.replacen('T', " ", 1).trim_end_matches('Z').split('.').next().unwrap_or(t).to_string(),
        None => "—".into(),
    }
}

fn duration_between(start: Option<&str>, end: Option<&str>) -> String {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
    let (Some(a), Some(b)) =
        (start.and_then(parse), end.map(parse).unwrap_or_else(|| Some(chrono::Utc::now().into())))
    else {
        return "—".into();
    };
    match (b - a).to_std() {
        Ok(d) => crate::base::units::format_duration(Duration::from_millis(d.as_millis() as u64)),
        Err(_) => "—".into(),
    }
}

fn state_badge(h: &mut Html, state: JobState, id: Option<&'static str>) {
    let class = format!("state state-{}", state.as_str());
    match id {
        Some(id) => h.elem("span", &[("class", &class), ("id", id)], state.as_str()),
        None => h.elem("span", &[("class", &class)], state.as_str()),
    };
}

fn job_link(h: &mut Html, id: i64) {
    h.elem("a", &[("href", &format!("/admin/jobs/{id}"))], &format!("#{id}"));
}

/// `GET /admin/executors`: active executors, then the inactive ones.
pub(in crate::server::http) async fn executors(State(app): State<Shared>, s: ConsoleSession) -> Response {
    let active = app.cfg.active_window.as_millis() as i64;
    let found =
        db(&app, move |st| Ok((st.executors(store::now_ms(), active)?, st.running_by_executor()?))).await;
    let (rows, running) = match found {
        Ok(v) => v,
        Err(e) => return error_page(e),
    };
    let figures: HashMap<String, Vec<String>> = {
        let m = app.executor_metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .map(|(name, (_, text))| (name.clone(), crate::server::metrics::executor_figures(text)))
            .collect()
    };
    let mut b = Html::fragment();
    for (title, want, id) in [("Active", true, "active-executors"), ("Inactive", false, "inactive-executors")]
    {
        let group: Vec<_> = rows.iter().filter(|r| r.active == want).collect();
        b.open("section", &[("id", id)]).elem("h2", &[], &format!("{title} ({})", group.len()));
        if group.is_empty() {
            b.elem("p", &[("class", "empty")], "none");
            b.close("section");
            continue;
        }
        b.open("table", &[]).open("thead", &[]).open("tr", &[]);
        for col in
            ["Name", "Queues", "OS / arch", "Versions", "First seen", "Last seen", "Running jobs", "Figures"]
        {
            b.elem("th", &[], col);
        }
        b.close("tr").close("thead").open("tbody", &[]);
        for r in group {
            let i = &r.info;
            b.open("tr", &[("class", "executor")]);
            b.elem("td", &[("class", "name")], &i.hostname);
            let queues = if i.queue_names.is_empty() {
                i.queue_name.clone().unwrap_or_default()
            } else {
                i.queue_names.join(", ")
            };
            b.elem("td", &[], &queues);
            b.elem("td", &[], &format!("{} / {}", i.os, i.architecture));
            let mut versions = Vec::new();
            for (name, v) in [
                ("executor", &i.executor_version),
                ("git", &i.git_version),
                ("docker", &i.docker_version),
                ("ignite", &i.ignite_version),
                ("src-cli", &i.src_cli_version),
            ] {
                if !v.is_empty() {
                    versions.push(format!("{name} {v}"));
                }
            }
            b.elem("td", &[], &versions.join(", "));
            b.elem("td", &[], &when(Some(&r.first_seen_at)));
            b.elem("td", &[], &when(Some(&r.last_seen_at)));
            b.open("td", &[]);
            for id in running.get(&i.hostname).map(Vec::as_slice).unwrap_or_default() {
                job_link(&mut b, *id);
                b.text(" ");
            }
            b.close("td");
            b.open("td", &[("class", "figures")]);
            for f in figures.get(&i.hostname).map(Vec::as_slice).unwrap_or_default() {
                b.elem("div", &[], f);
            }
            b.close("td").close("tr");
        }
        b.close("tbody").close("table").close("section");
    }
    page_response(StatusCode::OK, frame("Executors", Some(&s), b))
}

/// `GET /admin/jobs?queue=&state=&repository=&before=`: 50 jobs, newest first.
pub(in crate::server::http) async fn jobs(
    State(app): State<Shared>,
    s: ConsoleSession,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let q = match query_params(query) {
        Ok(q) => q,
        Err(e) => return error_page(e),
    };
    let nonempty = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let mut filter = JobFilter {
        queue: nonempty("queue").filter(|x| app.cfg.queues.contains(x)),
        state: nonempty("state").and_then(|x| JobState::from_name(&x)),
        repository: nonempty("repository"),
        before: nonempty("before").and_then(|x| x.parse().ok()),
    };
    let started = Instant::now();
    let f = filter.clone();
    let rows = match db(&app, move |st| st.job_page(&f, PAGE_SIZE + 1)).await {
        Ok(r) => r,
        Err(e) => return error_page(e),
    };
    let db_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut b = Html::fragment();
    b.open("form", &[("method", "get"), ("action", "/admin/jobs"), ("class", "filters")]);
    b.elem("label", &[("for", "f-queue")], "Queue");
    b.open("select", &[("id", "f-queue"), ("name", "queue")]).elem("option", &[("value", "")], "any");
    for name in &app.cfg.queues {
        if filter.queue.as_ref() == Some(name) {
            b.elem("option", &[("value", name), ("selected", "selected")], name);
        } else {
            b.elem("option", &[("value", name)], name);
        }
    }
    b.close("select");
    b.elem("label", &[("for", "f-state")], "State");
    b.open("select", &[("id", "f-state"), ("name", "state")]).elem("option", &[("value", "")], "any");
    for st in JobState::ALL {
        if filter.state == Some(st) {
            b.elem("option", &[("value", st.as_str()), ("selected", "selected")], st.as_str());
        } else {
            b.elem("option", &[("value", st.as_str())], st.as_str());
        }
    }
    b.close("select");
    b.elem("label", &[("for", "f-repository")], "Repository");
    let repo = filter.repository.clone().unwrap_or_default();
    b.void("input", &[("id", "f-repository"), ("name", "repository"), ("value", &repo)]);
    b.elem("button", &[("type", "submit")], "Filter");
    b.close("form");
    let more = rows.len() as i64 > PAGE_SIZE;
    let rows = &rows[..rows.len().min(PAGE_SIZE as usize)];
    if rows.is_empty() {
        b.elem("p", &[("class", "empty")], "no jobs");
    } else {
        b.open("table", &[("id", "jobs")]).open("thead", &[]).open("tr", &[]);
        for col in
            ["Job", "State", "Queue", "Repository", "Executor", "Created", "Started", "Finished", "Duration"]
        {
            b.elem("th", &[], col);
        }
        b.close("tr").close("thead").open("tbody", &[]);
        for r in rows {
            let j = &r.row;
            b.open("tr", &[("class", "job")]).open("td", &[]);
            job_link(&mut b, j.id);
            b.close("td").open("td", &[]);
            state_badge(&mut b, j.state, None);
            b.close("td");
            b.elem("td", &[], &j.queue);
            b.elem("td", &[("class", "repo")], &repo_at(&j.repository_name, &r.commit));
            b.elem("td", &[], j.executor_name.as_deref().unwrap_or("—"));
            b.elem("td", &[], &when(Some(&j.created_at)));
            b.elem("td", &[], &when(j.started_at.as_deref()));
            b.elem("td", &[], &when(j.finished_at.as_deref()));
            b.elem("td", &[], &duration_between(j.started_at.as_deref(), j.finished_at.as_deref()));
            b.close("tr");
        }
        b.close("tbody").close("table");
    }
    b.open("p", &[("class", "paging")]);
    let base = filter_query(&filter);
    b.elem("a", &[("href", &format!("/admin/jobs?{base}"))], "Newest");
    if more {
        filter.before = rows.last().map(|r| r.row.id);
        b.text(" · ");
        b.elem("a", &[("href", &format!("/admin/jobs?{}", filter_query(&filter))), ("id", "older")], "Older");
    }
    b.close("p");
    let render_started = Instant::now();
    let body = frame("Jobs", Some(&s), b);
    let render_ms = render_started.elapsed().as_secs_f64() * 1000.0;
    let mut resp = page_response(StatusCode::OK, body);
    if let Ok(v) = HeaderValue::from_str(&format!("db;dur={db_ms:.3}, render;dur={render_ms:.3}")) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}

fn filter_query(f: &JobFilter) -> String {
    let mut parts = Vec::new();
    if let Some(q) = &f.queue {
        parts.push(format!("queue={}", url_encode(q)));
    }
    if let Some(s) = f.state {
        parts.push(format!("state={}", s.as_str()));
    }
    if let Some(r) = &f.repository {
        parts.push(format!("repository={}", url_encode(r)));
    }
    if let Some(b) = f.before {
        parts.push(format!("before={b}"));
    }
    parts.join("&")
}

fn repo_at(repo: &str, commit: &str) -> String {
    match (repo.is_empty(), commit.is_empty()) {
        (true, _) => "—".into(),
        (false, true) => repo.to_string(),
        (false, false) => format!(
            "{repo}@{}",
            &commit[..commit.char_indices().nth(12).map(|(i, _)| i).unwrap_or(commit.len())]
        ),
    }
}

/// Writes styled segments into `h` as text and `<span class>`s.
fn segments(h: &mut Html, segs: &[Segment]) {
    for s in segs {
        if s.class.is_empty() {
            h.text(&s.text);
        } else {
            h.elem("span", &[("class", &s.class)], &s.text);
        }
    }
}

fn exit_text(code: Option<i32>) -> String {
    code.map(|c| format!("exit {c}")).unwrap_or_else(|| "running".into())
}

fn duration_text(ms: Option<i64>) -> String {
    ms.map(|ms| crate::base::units::format_duration(Duration::from_millis(ms.max(0) as u64)))
        .unwrap_or_default()
}

/// `GET /admin/jobs/{id}`.
pub(in crate::server::http) async fn job(
    State(app): State<Shared>,
    s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match job_id_param(id) {
        Ok(id) => id,
        Err(e) => return error_page(e),
    };
    let found = db(&app, move |st| match st.job(id)? {
        Some(job) => Ok(Some((job, st.logs(id)?))),
        None => Ok(None),
    })
    .await;
    let (job, logs) = match found {
        Ok(Some(v)) => v,
        Ok(None) => {
            return page_response(StatusCode::NOT_FOUND, message_page("Not found", &format!("no job {id}")))
        }
        Err(e) => return error_page(e),
    };
    // Redacted as the admin API shows it: no redactedValues, no dockerAuthConfig, no file contents.
    let payload = match super::super::admin::admin_payload(&job.payload) {
        Ok(p) => p,
        Err(e) => return error_page(e.into()),
    };
    let j = &job.row;
    let mut b = Html::fragment();
    b.open("dl", &[("class", "facts")]);
    b.elem("dt", &[], "State").open("dd", &[]);
    state_badge(&mut b, j.state, Some("job-state"));
    if j.cancel && !j.state.is_final() {
        b.elem("span", &[("class", "note")], " cancel requested");
    }
    b.close("dd");
    let commit = payload.get("commit").and_then(|c| c.as_str()).unwrap_or_default();
    for (k, v) in [
        ("Queue", j.queue.clone()),
        ("Repository", repo_at(&j.repository_name, commit)),
        ("Executor", j.executor_name.clone().unwrap_or_else(|| "—".into())),
        ("Created", when(Some(&j.created_at))),
        ("Started", when(j.started_at.as_deref())),
        ("Finished", when(j.finished_at.as_deref())),
        ("Duration", duration_between(j.started_at.as_deref(), j.finished_at.as_deref())),
        ("Resets / failures", format!("{} / {}", j.num_resets, j.num_failures)),
    ] {
        b.elem("dt", &[], k).elem("dd", &[], &v);
    }
    if let Some(m) = &j.failure_message {
        b.elem("dt", &[], "Failure").elem("dd", &[("id", "failure")], m);
    }
    b.elem("dt", &[], "Artifacts").open("dd", &[]);
    match &job.artifacts {
        Some(a) => {
            b.elem("a", &[("href", &format!("/admin/jobs/{id}/artifacts")), ("id", "artifacts")], "download");
            b.text(&format!(" ({} bytes, sha256 {})", a.bytes, a.sha256));
        }
        None => {
            b.text("none");
        }
    }
    b.close("dd").close("dl");
    b.open("div", &[("class", "actions")]);
    let (action, label, button_id) = if j.state.is_final() {
        (format!("/admin/jobs/{id}/requeue"), "Requeue", "requeue")
    } else {
        (format!("/admin/jobs/{id}/cancel"), "Cancel", "cancel")
    };
    b.open("form", &[("method", "post"), ("action", &action), ("class", "inline")]);
    b.void("input", &[("type", "hidden"), ("name", "csrf"), ("value", &s.csrf)]);
    b.elem("button", &[("type", "submit"), ("id", button_id)], label);
    b.close("form").close("div");

    b.elem("h2", &[], "Steps");
    b.open("table", &[("id", "steps")]).open("thead", &[]).open("tr", &[]);
    for col in ["Key", "Image", "Command"] {
        b.elem("th", &[], col);
    }
    b.close("tr").close("thead").open("tbody", &[]);
    let strings = |v: Option<&serde_json::Value>| -> String {
        v.and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" && "))
            .unwrap_or_default()
    };
    let empty = Vec::new();
    for (steps, kind) in [("dockerSteps", "docker"), ("cliSteps", "cli")] {
        for (i, st) in payload.get(steps).and_then(|v| v.as_array()).unwrap_or(&empty).iter().enumerate() {
            let key = st.get("key").and_then(|k| k.as_str()).filter(|k| !k.is_empty()).map(str::to_string);
            b.open("tr", &[]);
            b.elem("td", &[], &key.unwrap_or_else(|| format!("{kind}.{i}")));
            b.elem("td", &[], st.get("image").and_then(|x| x.as_str()).unwrap_or("src-cli"));
            let cmd = if kind == "docker" { strings(st.get("commands")) } else { strings(st.get("command")) };
            b.elem("td", &[("class", "command")], &cmd);
            b.close("tr");
        }
    }
    b.close("tbody").close("table");
    if let Some(files) = payload.get("files").and_then(|f| f.as_object()).filter(|f| !f.is_empty()) {
        b.elem("h2", &[], "Files");
        b.open("ul", &[("class", "files")]);
        for name in files.keys() {
            b.elem("li", &[], name);
        }
        b.close("ul");
    }

    b.elem("h2", &[], "Log");
    let events = if j.state.is_final() { String::new() } else { format!("/admin/jobs/{id}/events") };
    let mut attrs: Vec<(&'static str, &str)> = vec![("id", "log")];
    if !events.is_empty() {
        attrs.push(("data-events", &events));
    }
    b.open("div", &attrs);
    for e in &logs {
        entry_html(&mut b, e);
    }
    b.close("div");
    page_response(StatusCode::OK, frame(&format!("Job {id}"), Some(&s), b))
}

/// One log entry as the page shows it; `console.js` builds the same markup for new entries.
fn entry_html(b: &mut Html, e: &StoredLogEntry) {
    let id = format!("entry-{}", e.entry_id);
    b.open("section", &[("class", "entry"), ("id", &id)]).open("h3", &[]);
    b.elem("span", &[("class", "key")], &e.entry.key);
    b.text(" ");
    b.elem("span", &[("class", "exit")], &exit_text(e.entry.exit_code));
    b.text(" ");
    b.elem("span", &[("class", "duration")], &duration_text(e.entry.duration_ms));
    b.close("h3").open("pre", &[("class", "out")]);
    segments(b, &Ansi::new().feed(e.entry.out.as_deref().unwrap_or("")));
    b.close("pre").close("section");
}

/// What an event stream sent of one entry.
struct Sent {
    meta: (String, Option<i32>, Option<i64>),
    out_len: usize,
    out_sha: [u8; 32],
    ansi: Ansi,
}

struct EventState {
    app: Shared,
    id: i64,
    sent: HashMap<i64, Sent>,
    last_state: Option<JobState>,
    pending: VecDeque<bytes::Bytes>,
    done: bool,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

fn sse(event: &str, data: &serde_json::Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

fn segments_json(segs: Vec<Segment>) -> serde_json::Value {
    serde_json::Value::Array(segs.into_iter().map(|s| serde_json::json!([s.class, s.text])).collect())
}

/// The event for an entry's current state, if it changed since the last one sent.
fn entry_event(sent: &mut HashMap<i64, Sent>, e: StoredLogEntry) -> Option<bytes::Bytes> {
    use sha2::Digest;
    let digest = |b: &[u8]| -> [u8; 32] { sha2::Sha256::digest(b).into() };
    let out = e.entry.out.unwrap_or_default();
    let meta = (e.entry.key.clone(), e.entry.exit_code, e.entry.duration_ms);
    let extends = sent.get(&e.entry_id).is_some_and(|p| {
        out.len() >= p.out_len
            && out.is_char_boundary(p.out_len)
            && digest(&out.as_bytes()[..p.out_len]) == p.out_sha
    });
    let (reset, segs) = match sent.get_mut(&e.entry_id) {
        Some(p) if extends => {
            if p.out_len == out.len() && p.meta == meta {
                return None;
            }
            (false, p.ansi.feed(&out[p.out_len..]))
        }
        _ => {
            let mut ansi = Ansi::new();
            let segs = ansi.feed(&out);
            sent.insert(e.entry_id, Sent { meta: meta.clone(), out_len: 0, out_sha: [0; 32], ansi });
            (true, segs)
        }
    };
    if let Some(p) = sent.get_mut(&e.entry_id) {
        p.meta = meta;
        p.out_len = out.len();
        p.out_sha = digest(out.as_bytes());
    }
    Some(sse(
        "entry",
        &serde_json::json!({
            "entry": e.entry_id,
            "key": e.entry.key,
            "exit": exit_text(e.entry.exit_code),
            "duration": duration_text(e.entry.duration_ms),
            "reset": reset,
            "segments": segments_json(segs),
        }),
    ))
}

async fn event_step(mut st: EventState) -> Option<(Result<bytes::Bytes, std::io::Error>, EventState)> {
    loop {
        if let Some(b) = st.pending.pop_front() {
            return Some((Ok(b), st));
        }
        if st.done {
            return None;
        }
        let app = st.app.clone();
        let notified = app.logs_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let id = st.id;
        let (logs, state) = match db(&app, move |s| Ok((s.logs(id)?, s.state(id)?))).await {
            Ok(v) => v,
            Err(e) => return Some((Err(std::io::Error::other(e.message)), EventState { done: true, ..st })),
        };
        for e in logs {
            if let Some(ev) = entry_event(&mut st.sent, e) {
                st.pending.push_back(ev);
            }
        }
        let finished = state.map(JobState::is_final).unwrap_or(true);
        if state != st.last_state {
            st.last_state = state;
            let name = state.map(|s| s.as_str()).unwrap_or("gone");
            st.pending.push_back(sse("state", &serde_json::json!({"state": name, "final": finished})));
        }
        if finished || *st.shutdown.borrow() {
            st.done = true;
            continue;
        }
        if st.pending.is_empty() {
            tokio::select! {
                // A short pause gathers a burst of appends into one read.
                _ = &mut notified => tokio::time::sleep(Duration::from_millis(20)).await,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = st.shutdown.changed() => {}
            }
        }
    }
}

/// `GET /admin/jobs/{id}/events`: server-sent events: `entry` (an entry's new output as styled
/// segments, whole with `reset` the first time), `state` (the job's state; the stream ends
/// after a final one).
pub(in crate::server::http) async fn job_events(
    State(app): State<Shared>,
    _s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match job_id_param(id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let shutdown = app.shutdown.subscribe();
    let st = EventState {
        app,
        id,
        sent: HashMap::new(),
        last_state: None,
        pending: VecDeque::new(),
        done: false,
        shutdown,
    };
    let stream = futures_util::stream::unfold(st, event_step);
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"))],
        Body::from_stream(stream),
    )
        .into_response();
    super::secure(&mut resp);
    resp
}

/// `GET /admin/jobs/{id}/artifacts`: the download, for the session.
pub(in crate::server::http) async fn artifacts(
    State(app): State<Shared>,
    _s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match job_id_param(id) {
        Ok(id) => id,
        Err(e) => return error_page(e),
    };
    match super::super::admin::artifacts_of(&app, id).await {
        Ok(mut resp) => {
            let name = format!("attachment; filename=\"job-{id}-artifacts.tar.gz\"");
            if let Ok(v) = HeaderValue::from_str(&name) {
                resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            super::secure(&mut resp);
            resp
        }
        Err(e) => error_page(e),
    }
}

/// The job id in a console form's path, once the form passed its CSRF check.
async fn form_job_id(
    s: &ConsoleSession,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<i64, Response> {
    let id = job_id_param(id).map_err(error_page)?;
    s.form(body).await?;
    Ok(id)
}

/// `POST /admin/jobs/{id}/cancel` (CSRF).
pub(in crate::server::http) async fn cancel(
    State(app): State<Shared>,
    s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    let id = match form_job_id(&s, id, body).await {
        Ok(id) => id,
        Err(refused) => return refused,
    };
    match db(&app, move |st| st.cancel(id, store::now_ms())).await {
        Ok(CancelResult::NotFound) => {
            page_response(StatusCode::NOT_FOUND, message_page("Not found", &format!("no job {id}")))
        }
        Ok(CancelResult::AlreadyFinal(state)) => page_response(
            StatusCode::CONFLICT,
            message_page("Not canceled", &format!("job {id} already finished: it is {state}")),
        ),
        Ok(CancelResult::Done(_)) => {
            app.logs_changed.notify_waiters();
            see_other_to(format!("/admin/jobs/{id}"))
        }
        Err(e) => error_page(e),
    }
}

/// `POST /admin/jobs/{id}/requeue` (CSRF): a finished job back to queued.
pub(in crate::server::http) async fn requeue(
    State(app): State<Shared>,
    s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    let id = match form_job_id(&s, id, body).await {
        Ok(id) => id,
        Err(refused) => return refused,
    };
    match db(&app, move |st| st.requeue(id)).await {
        Ok(RequeueResult::NotFound) => {
            page_response(StatusCode::NOT_FOUND, message_page("Not found", &format!("no job {id}")))
        }
        Ok(RequeueResult::NotFinal(state)) => page_response(
            StatusCode::CONFLICT,
            message_page("Not requeued", &format!("job {id} has not finished: it is {state}")),
        ),
        Ok(RequeueResult::Done(_)) => {
            app.jobs_changed.notify_waiters();
            app.logs_changed.notify_waiters();
            see_other_to(format!("/admin/jobs/{id}"))
        }
        Err(e) => error_page(e),
    }
}

fn row_table(b: &mut Html, id: &'static str, cols: &[&str], rows: Vec<Vec<String>>) {
    if rows.is_empty() {
        b.elem("p", &[("class", "empty")], "none");
        return;
    }
    b.open("table", &[("id", id)]).open("thead", &[]).open("tr", &[]);
    for c in cols {
        b.elem("th", &[], c);
    }
    b.close("tr").close("thead").open("tbody", &[]);
    for r in rows {
        b.open("tr", &[]);
        for cell in r {
            b.elem("td", &[], &cell);
        }
        b.close("tr");
    }
    b.close("tbody").close("table");
}

/// `GET /admin/repos`: the registered repositories.
pub(in crate::server::http) async fn repos(State(app): State<Shared>, s: ConsoleSession) -> Response {
    let rows = match db(&app, |st| st.repos()).await {
        Ok(r) => r,
        Err(e) => return error_page(e),
    };
    let mut b = Html::fragment();
    let rows = rows.into_iter().map(|r| vec![r.name, r.path, when(Some(&r.added_at))]).collect();
    row_table(&mut b, "repos", &["Name", "Path", "Added"], rows);
    page_response(StatusCode::OK, frame("Repositories", Some(&s), b))
}

/// `GET /admin/files`: the files store's index (never the contents).
pub(in crate::server::http) async fn files(State(app): State<Shared>, s: ConsoleSession) -> Response {
    let rows = match db(&app, |st| st.files()).await {
        Ok(r) => r,
        Err(e) => return error_page(e),
    };
    let mut b = Html::fragment();
    let rows = rows
        .into_iter()
        .map(|r| vec![r.bucket, r.key, r.size.to_string(), r.sha256, when(Some(&r.created_at))])
        .collect();
    row_table(&mut b, "files", &["Bucket", "Key", "Bytes", "SHA-256", "Stored"], rows);
    page_response(StatusCode::OK, frame("Files", Some(&s), b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_log_text_stays_text() {
        let mut b = Html::fragment();
        let out = "<script>alert(1)</script>\x1b[31m\"><img src=x onerror=alert(1)>\x1b]8;;javascript:alert(1)\x07x";
        let e = StoredLogEntry {
            entry_id: 1,
            entry: crate::protocol::ExecutionLogEntry {
                key: "<b>k</b>".into(),
                out: Some(out.into()),
                ..Default::default()
            },
        };
        entry_html(&mut b, &e);
        let html = b.finish();
        assert!(!html.contains("<script>") && !html.contains("<img") && !html.contains("<b>"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
        assert!(
            html.contains("<span class=\"fg-1\">&quot;&gt;&lt;img src=x onerror=alert(1)&gt;x</span>"),
            "{html}"
        );
    }

    #[test]
    fn events_send_an_entry_whole_then_what_it_gained() {
        let mut sent = HashMap::new();
        let at = |out: &str, exit: Option<i32>| StoredLogEntry {
            entry_id: 2,
            entry: crate::protocol::ExecutionLogEntry {
                key: "k".into(),
                out: Some(out.into()),
                exit_code: exit,
                ..Default::default()
            },
        };
        let data = |b: Option<bytes::Bytes>| -> serde_json::Value {
            let text = String::from_utf8(b.unwrap().to_vec()).unwrap();
            serde_json::from_str(text.split("data: ").nth(1).unwrap().trim()).unwrap()
        };
        let first = data(entry_event(&mut sent, at("a\x1b[3", None)));
        assert_eq!(
            (first["reset"].as_bool(), first["segments"].clone()),
            (Some(true), serde_json::json!([["", "a"]]))
        );
        assert!(entry_event(&mut sent, at("a\x1b[3", None)).is_none());
        let more = data(entry_event(&mut sent, at("a\x1b[32mb", Some(0))));
        assert_eq!((more["reset"].as_bool(), more["exit"].as_str()), (Some(false), Some("exit 0")));
        assert_eq!(more["segments"], serde_json::json!([["fg-2", "b"]]));
        let replaced = data(entry_event(&mut sent, at("z", Some(0))));
        assert_eq!(
            (replaced["reset"].as_bool(), replaced["segments"].clone()),
            (Some(true), serde_json::json!([["", "z"]]))
        );
    }
}

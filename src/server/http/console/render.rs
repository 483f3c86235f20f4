//! The console's renderers: pure functions from a view (`view.rs`) to a page's HTML, written
//! with the escaping `html::Html` builder so no job-controlled text can become markup. Times
//! and durations are formatted here, at the edge. `console.js` builds the same markup as
//! `entry` for the entries of the live log.

use chrono::{DateTime, Utc};
use std::time::Duration;

use super::ansi::{Ansi, Segment};
use super::html::Html;
use super::view::{ExecutorGroup, JobView, JobsView, Times};
use crate::base::units::format_duration;
use crate::server::store::{FileRow, JobState, RepoRow, StoredLogEntry};

/// The page frame: head, navigation (with the sign-out form carrying `csrf` when signed in),
/// then `body`.
pub(super) fn frame(title: &str, csrf: Option<&str>, body: Html) -> String {
    let mut h = Html::document();
    h.open("html", &[("lang", "en")]).open("head", &[]);
    h.void("meta", &[("charset", "utf-8")]);
    h.void("meta", &[("name", "viewport"), ("content", "width=device-width, initial-scale=1")]);
    h.elem("title", &[], &format!("{title} · executor queue"));
    h.void("link", &[("rel", "stylesheet"), ("href", "/admin/assets/console.css")]);
    h.open("script", &[("src", "/admin/assets/console.js"), ("defer", "defer")]).close("script");
    h.close("head").open("body", &[]);
    h.open("header", &[]).elem("span", &[("class", "brand")], "executor queue");
    if let Some(csrf) = csrf {
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
        h.void("input", &[("type", "hidden"), ("name", "csrf"), ("value", csrf)]);
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

/// The sign-in form, with the reason the last try failed.
pub(super) fn sign_in_page(error: Option<&str>) -> String {
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

/// `2026-01-02 03:04:05`, or a dash when unset.
pub(super) fn when(t: Option<&DateTime<Utc>>) -> String {
    match t {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => "—".into(),
    }
}

fn duration(d: Option<Duration>) -> String {
    d.map(format_duration).unwrap_or_else(|| "—".into())
}

/// What an entry's header says of its end: `exit N`, or `running`.
pub(super) fn exit_text(code: Option<i32>) -> String {
    code.map(|c| format!("exit {c}")).unwrap_or_else(|| "running".into())
}

/// How long an entry ran, or nothing while it runs.
pub(super) fn duration_text(ms: Option<i64>) -> String {
    ms.map(|ms| format_duration(Duration::from_millis(ms.max(0) as u64))).unwrap_or_default()
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

/// The executors page.
pub(super) fn executors_page(groups: &[ExecutorGroup], csrf: &str) -> String {
    let mut b = Html::fragment();
    for g in groups {
        b.open("section", &[("id", g.id)]).elem("h2", &[], &format!("{} ({})", g.title, g.executors.len()));
        if g.executors.is_empty() {
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
        for e in &g.executors {
            b.open("tr", &[("class", "executor")]);
            b.elem("td", &[("class", "name")], &e.name);
            b.elem("td", &[], &e.queues);
            b.elem("td", &[], &e.platform);
            b.elem("td", &[], &e.versions);
            b.elem("td", &[], &when(Some(&e.first_seen)));
            b.elem("td", &[], &when(Some(&e.last_seen)));
            b.open("td", &[]);
            for id in &e.running {
                job_link(&mut b, *id);
                b.text(" ");
            }
            b.close("td");
            b.open("td", &[("class", "figures")]);
            for f in &e.figures {
                b.elem("div", &[], f);
            }
            b.close("td").close("tr");
        }
        b.close("tbody").close("table").close("section");
    }
    frame("Executors", Some(csrf), b)
}

fn times_cells(b: &mut Html, t: &Times) {
    b.elem("td", &[], &when(Some(&t.created)));
    b.elem("td", &[], &when(t.started.as_ref()));
    b.elem("td", &[], &when(t.finished.as_ref()));
    b.elem("td", &[], &duration(t.duration));
}

/// The jobs page: the filters, a page of jobs, the links to the newest and the next page.
pub(super) fn jobs_page(v: &JobsView, csrf: &str) -> String {
    let mut b = Html::fragment();
    b.open("form", &[("method", "get"), ("action", "/admin/jobs"), ("class", "filters")]);
    b.elem("label", &[("for", "f-queue")], "Queue");
    b.open("select", &[("id", "f-queue"), ("name", "queue")]).elem("option", &[("value", "")], "any");
    for name in &v.queues {
        if v.filter.queue.as_ref() == Some(name) {
            b.elem("option", &[("value", name), ("selected", "selected")], name);
        } else {
            b.elem("option", &[("value", name)], name);
        }
    }
    b.close("select");
    b.elem("label", &[("for", "f-state")], "State");
    b.open("select", &[("id", "f-state"), ("name", "state")]).elem("option", &[("value", "")], "any");
    for st in JobState::ALL {
        if v.filter.state == Some(st) {
            b.elem("option", &[("value", st.as_str()), ("selected", "selected")], st.as_str());
        } else {
            b.elem("option", &[("value", st.as_str())], st.as_str());
        }
    }
    b.close("select");
    b.elem("label", &[("for", "f-repository")], "Repository");
    let repo = v.filter.repository.clone().unwrap_or_default();
    b.void("input", &[("id", "f-repository"), ("name", "repository"), ("value", &repo)]);
    b.elem("button", &[("type", "submit")], "Filter");
    b.close("form");
    if v.rows.is_empty() {
        b.elem("p", &[("class", "empty")], "no jobs");
    } else {
        b.open("table", &[("id", "jobs")]).open("thead", &[]).open("tr", &[]);
        for col in
            ["Job", "State", "Queue", "Repository", "Executor", "Created", "Started", "Finished", "Duration"]
        {
            b.elem("th", &[], col);
        }
        b.close("tr").close("thead").open("tbody", &[]);
        for r in &v.rows {
            b.open("tr", &[("class", "job")]).open("td", &[]);
            job_link(&mut b, r.id);
            b.close("td").open("td", &[]);
            state_badge(&mut b, r.state, None);
            b.close("td");
            b.elem("td", &[], &r.queue);
            b.elem("td", &[("class", "repo")], r.repo.as_deref().unwrap_or("—"));
            b.elem("td", &[], r.executor.as_deref().unwrap_or("—"));
            times_cells(&mut b, &r.times);
            b.close("tr");
        }
        b.close("tbody").close("table");
    }
    b.open("p", &[("class", "paging")]);
    b.elem("a", &[("href", &v.newest)], "Newest");
    if let Some(older) = &v.older {
        b.text(" · ");
        b.elem("a", &[("href", older), ("id", "older")], "Older");
    }
    b.close("p");
    frame("Jobs", Some(csrf), b)
}

/// The job page: its facts, the cancel or requeue form, its steps and files, and its log (live
/// while the job runs).
pub(super) fn job_page(v: &JobView, csrf: &str) -> String {
    let id = v.id;
    let mut b = Html::fragment();
    b.open("dl", &[("class", "facts")]);
    b.elem("dt", &[], "State").open("dd", &[]);
    state_badge(&mut b, v.state, Some("job-state"));
    if v.cancel_requested {
        b.elem("span", &[("class", "note")], " cancel requested");
    }
    b.close("dd");
    let t = &v.times;
    for (k, text) in [
        ("Queue", v.queue.clone()),
        ("Repository", v.repo.clone().unwrap_or_else(|| "—".into())),
        ("Executor", v.executor.clone().unwrap_or_else(|| "—".into())),
        ("Created", when(Some(&t.created))),
        ("Started", when(t.started.as_ref())),
        ("Finished", when(t.finished.as_ref())),
        ("Duration", duration(t.duration)),
        ("Resets / failures", format!("{} / {}", v.num_resets, v.num_failures)),
    ] {
        b.elem("dt", &[], k).elem("dd", &[], &text);
    }
    if let Some(m) = &v.failure {
        b.elem("dt", &[], "Failure").elem("dd", &[("id", "failure")], m);
    }
    if let Some(m) = &v.kept {
        b.elem("dt", &[], "Debug").elem("dd", &[("id", "kept")], m);
    }
    b.elem("dt", &[], "Artifacts").open("dd", &[]);
    match &v.artifacts {
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
    let (action, label, button_id) = if v.state.is_final() {
        (format!("/admin/jobs/{id}/requeue"), "Requeue", "requeue")
    } else {
        (format!("/admin/jobs/{id}/cancel"), "Cancel", "cancel")
    };
    b.open("form", &[("method", "post"), ("action", &action), ("class", "inline")]);
    b.void("input", &[("type", "hidden"), ("name", "csrf"), ("value", csrf)]);
    b.elem("button", &[("type", "submit"), ("id", button_id)], label);
    b.close("form").close("div");

    b.elem("h2", &[], "Steps");
    b.open("table", &[("id", "steps")]).open("thead", &[]).open("tr", &[]);
    for col in ["Key", "Image", "Command"] {
        b.elem("th", &[], col);
    }
    b.close("tr").close("thead").open("tbody", &[]);
    for s in &v.steps {
        b.open("tr", &[]);
        b.elem("td", &[], &s.key);
        b.elem("td", &[], &s.image);
        b.elem("td", &[("class", "command")], &s.command);
        b.close("tr");
    }
    b.close("tbody").close("table");
    if !v.files.is_empty() {
        b.elem("h2", &[], "Files");
        b.open("ul", &[("class", "files")]);
        for name in &v.files {
            b.elem("li", &[], name);
        }
        b.close("ul");
    }

    b.elem("h2", &[], "Log");
    let events = format!("/admin/jobs/{id}/events");
    let mut attrs: Vec<(&'static str, &str)> = vec![("id", "log")];
    if v.live() {
        attrs.push(("data-events", &events));
    }
    b.open("div", &attrs);
    for e in &v.logs {
        entry(&mut b, e);
    }
    b.close("div");
    frame(&format!("Job {id}"), Some(csrf), b)
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

/// One log entry as the page shows it; `console.js` builds the same markup for new entries.
fn entry(b: &mut Html, e: &StoredLogEntry) {
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

/// The repositories page.
pub(super) fn repos_page(rows: &[RepoRow], csrf: &str) -> String {
    let mut b = Html::fragment();
    let rows = rows.iter().map(|r| vec![r.name.clone(), r.path.clone(), when(Some(&r.added_at))]).collect();
    row_table(&mut b, "repos", &["Name", "Path", "Added"], rows);
    frame("Repositories", Some(csrf), b)
}

/// The files page: the files store's index (never the contents).
pub(super) fn files_page(rows: &[FileRow], csrf: &str) -> String {
    let mut b = Html::fragment();
    let rows = rows
        .iter()
        .map(|r| {
            vec![
                r.bucket.clone(),
                r.key.clone(),
                r.size.to_string(),
                r.sha256.clone(),
                when(Some(&r.created_at)),
            ]
        })
        .collect();
    row_table(&mut b, "files", &["Bucket", "Key", "Bytes", "SHA-256", "Stored"], rows);
    frame("Files", Some(csrf), b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::http::console::view::tests::{row, t};
    use crate::server::http::console::view::{executor_groups, JobsView, StepView};
    use crate::server::store::{ArtifactInfo, JobFilter, JobPageRow};

    fn log(id: i64, key: &str, out: &str, exit: Option<i32>, ms: Option<i64>) -> StoredLogEntry {
        StoredLogEntry {
            entry_id: id,
            entry: crate::protocol::ExecutionLogEntry {
                key: key.into(),
                out: Some(out.into()),
                exit_code: exit,
                duration_ms: ms,
                ..Default::default()
            },
        }
    }

    fn job(state: JobState) -> JobView {
        let times = Times {
            created: t("2026-01-02T03:04:05.678Z"),
            started: Some(t("2026-01-02T03:04:06Z")),
            finished: None,
            duration: Some(Duration::from_secs(61)),
        };
        JobView {
            id: 42,
            state,
            cancel_requested: false,
            queue: "batches".into(),
            repo: Some("<img src=x onerror=alert(1)>@abc".into()),
            executor: None,
            times,
            num_resets: 1,
            num_failures: 2,
            failure: Some("\"><script>alert(1)</script>".into()),
            artifacts: None,
            steps: vec![StepView {
                key: "docker.0".into(),
                image: "alpine".into(),
                command: "a && b<c".into(),
            }],
            files: vec!["<b>f</b>".into()],
            logs: vec![log(1, "step.0", "hello\n", Some(0), Some(1500)), log(2, "step.1", "", None, None)],
            kept: None,
        }
    }

    #[test]
    fn a_kept_job_shows_where_and_the_command() {
        let mut v = job(JobState::Failed);
        v.kept = Some(
            "kept for debugging on <h> until 2026-01-02T03:04:05Z: run `executor debug 42` on that host"
                .into(),
        );
        let html = job_page(&v, "c");
        assert!(
            html.contains("id=\"kept\"") && html.contains("run `executor debug 42` on that host"),
            "{html}"
        );
        assert!(!html.contains("<h>") && html.contains("&lt;h&gt;"), "{html}");
        assert!(!job_page(&job(JobState::Failed), "c").contains("id=\"kept\""));
    }

    #[test]
    fn hostile_log_text_stays_text() {
        let mut b = Html::fragment();
        let out = "<script>alert(1)</script>\x1b[31m\"><img src=x onerror=alert(1)>\x1b]8;;javascript:alert(1)\x07x";
        entry(&mut b, &log(1, "<b>k</b>", out, None, None));
        let html = b.finish();
        assert!(!html.contains("<script>") && !html.contains("<img") && !html.contains("<b>"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
        assert!(
            html.contains("<span class=\"fg-1\">&quot;&gt;&lt;img src=x onerror=alert(1)&gt;x</span>"),
            "{html}"
        );
    }

    #[test]
    fn a_job_page_escapes_what_the_job_controls() {
        let html = job_page(&job(JobState::Processing), "tok\"en");
        assert!(!html.contains("<script>") && !html.contains("<img") && !html.contains("<b>f"), "{html}");
        assert!(html.contains("<dd>&lt;img src=x onerror=alert(1)&gt;@abc</dd>"), "{html}");
        assert!(html.contains("<dd id=\"failure\">&quot;&gt;&lt;script&gt;"), "{html}");
        assert!(html.contains("<td class=\"command\">a &amp;&amp; b&lt;c</td>"), "{html}");
        assert!(html.contains("<li>&lt;b&gt;f&lt;/b&gt;</li>"), "{html}");
        assert!(html.contains("name=\"csrf\" value=\"tok&quot;en\""), "{html}");
        assert!(html.contains("<title>Job 42 · executor queue</title>"), "{html}");
    }

    #[test]
    fn a_job_page_shows_its_state_times_and_log() {
        let html = job_page(&job(JobState::Processing), "c");
        assert!(
            html.contains("<span class=\"state state-processing\" id=\"job-state\">processing</span>"),
            "{html}"
        );
        assert!(html.contains("<dt>Created</dt><dd>2026-01-02 03:04:05</dd>"), "{html}");
        assert!(html.contains("<dt>Finished</dt><dd>—</dd>"), "{html}");
        assert!(html.contains("<dt>Duration</dt><dd>1m1s</dd>"), "{html}");
        assert!(html.contains("<dt>Resets / failures</dt><dd>1 / 2</dd>"), "{html}");
        assert!(html.contains("<dd>none</dd>"), "no artifacts: {html}");
        assert!(
            html.contains(
                "<section class=\"entry\" id=\"entry-1\"><h3><span class=\"key\">step.0</span> \
                 <span class=\"exit\">exit 0</span> <span class=\"duration\">1.5s</span></h3>\
                 <pre class=\"out\">hello\n</pre></section>"
            ),
            "{html}"
        );
        assert!(
            html.contains("<span class=\"exit\">running</span> <span class=\"duration\"></span>"),
            "{html}"
        );
        // A running job's log is live and its form cancels it.
        assert!(html.contains("<div id=\"log\" data-events=\"/admin/jobs/42/events\">"), "{html}");
        assert!(
            html.contains("action=\"/admin/jobs/42/cancel\"") && html.contains("id=\"cancel\""),
            "{html}"
        );

        let mut done = job(JobState::Failed);
        done.cancel_requested = false;
        done.artifacts = Some(ArtifactInfo { bytes: 10, sha256: "ab".into() });
        let html = job_page(&done, "c");
        assert!(html.contains("<span class=\"state state-failed\" id=\"job-state\">failed</span>"), "{html}");
        assert!(html.contains("<div id=\"log\">") && !html.contains("data-events"), "{html}");
        assert!(
            html.contains("action=\"/admin/jobs/42/requeue\"") && html.contains("id=\"requeue\""),
            "{html}"
        );
        assert!(
            html.contains(
                "<a href=\"/admin/jobs/42/artifacts\" id=\"artifacts\">download</a> (10 bytes, sha256 ab)"
            ),
            "{html}"
        );
    }

    #[test]
    fn the_jobs_page_lists_rows_and_keeps_the_filters() {
        let filter =
            JobFilter { state: Some(JobState::Queued), repository: Some("\"x".into()), ..Default::default() };
        let mut r = row(9, JobState::Queued);
        r.repository_name = String::new();
        r.executor_name = Some("<exec>".into());
        let v = JobsView::new(
            &["batches".into(), "codeintel".into()],
            filter,
            vec![JobPageRow { row: r, commit: String::new() }],
            t("2026-01-02T03:04:08Z"),
        );
        let html = jobs_page(&v, "c");
        assert!(html.contains("<option value=\"queued\" selected=\"selected\">queued</option>"), "{html}");
        assert!(html.contains("<option value=\"codeintel\">codeintel</option>"), "{html}");
        assert!(html.contains("name=\"repository\" value=\"&quot;x\""), "{html}");
        assert!(
            html.contains(
                "<tr class=\"job\"><td><a href=\"/admin/jobs/9\">#9</a></td><td><span class=\"state state-queued\">\
                 queued</span></td><td>batches</td><td class=\"repo\">—</td><td>&lt;exec&gt;</td>\
                 <td>2026-01-02 03:04:05</td><td>2026-01-02 03:04:06</td><td>—</td><td>2s</td></tr>"
            ),
            "{html}"
        );
        assert!(
            html.contains("<a href=\"/admin/jobs?state=queued&amp;repository=%22x\">Newest</a>"),
            "{html}"
        );
        assert!(!html.contains("id=\"older\""), "{html}");
        let empty = JobsView::new(&[], JobFilter::default(), vec![], Utc::now());
        assert!(jobs_page(&empty, "c").contains("<p class=\"empty\">no jobs</p>"));
    }

    #[test]
    fn the_other_pages_render_their_rows() {
        let at = t("2026-01-02T03:04:05.999Z");
        let repos = [RepoRow { name: "<r>".into(), path: "/srv/r".into(), added_at: at }];
        let html = repos_page(&repos, "c");
        assert!(
            html.contains("<tr><td>&lt;r&gt;</td><td>/srv/r</td><td>2026-01-02 03:04:05</td></tr>"),
            "{html}"
        );
        let files =
            [FileRow { bucket: "b".into(), key: "k".into(), sha256: "ff".into(), size: 3, created_at: at }];
        let html = files_page(&files, "c");
        assert!(
            html.contains("<td>b</td><td>k</td><td>3</td><td>ff</td><td>2026-01-02 03:04:05</td>"),
            "{html}"
        );
        assert!(files_page(&[], "c").contains("<p class=\"empty\">none</p>"));
        let groups = executor_groups(&[], &Default::default(), &Default::default());
        let html = executors_page(&groups, "c");
        assert!(
            html.contains("<section id=\"active-executors\"><h2>Active (0)</h2><p class=\"empty\">none</p>")
        );
        let html = message_page("Not found", "no job <1>");
        assert!(
            html.contains("<p class=\"message\">no job &lt;1&gt;</p>") && !html.contains("sign-out"),
            "{html}"
        );
        assert!(
            sign_in_page(Some("invalid admin token")).contains("id=\"sign-in-error\">invalid admin token<")
        );
    }
}

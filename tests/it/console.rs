//! The admin console (`/admin/`) against a real coordinator on loopback: sign-in, sessions and
//! CSRF over plain HTTP, then in headless Chromium driven through chromedriver's WebDriver API
//! (a tiny client below): executors turning up and going inactive, a log following live, cancel
//! and requeue from the page, and hostile job text staying inert. Screenshots of each page go to
//! `$CARGO_TARGET_TMPDIR/console-screenshots/` (the path is printed).

use crate::common::{self, wait_until};
use crate::coordinator::Coordinator;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A ureq agent that does not follow redirects, so that a test sees the 303s.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().redirects(0).timeout(Duration::from_secs(30)).build()
}

/// (status, headers of interest, body) of a console request with an optional cookie and form.
fn call(
    c: &Coordinator,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> (u16, ureq::Response) {
    let mut req = agent().request(method, &format!("{}{path}", c.url));
    if let Some(k) = cookie {
        req = req.set("Cookie", k);
    }
    let r = match form {
        Some(f) => req.set("Content-Type", "application/x-www-form-urlencoded").send_string(f),
        None => req.call(),
    };
    match r {
        Ok(resp) => (resp.status(), resp),
        Err(ureq::Error::Status(code, resp)) => (code, resp),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn form_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Signs in over HTTP; returns the `Cookie` header value.
fn sign_in(c: &Coordinator) -> String {
    let (code, resp) =
        call(c, "POST", "/admin/sign-in", None, Some(&format!("token={}", form_value(&c.admin_token))));
    assert_eq!(code, 303);
    let set = resp.header("set-cookie").expect("a session cookie").to_string();
    set.split(';').next().unwrap().to_string()
}

/// The CSRF token in a page's hidden field.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_string()
}

#[test]
fn console_needs_the_admin_token_and_refuses_forms_without_csrf() {
    let c = Coordinator::start();
    // Pages need a session.
    for path in ["/admin/jobs", "/admin/executors", "/admin/jobs/1", "/admin/repos", "/admin/files"] {
        let (code, resp) = call(&c, "GET", path, None, None);
        assert_eq!((code, resp.header("location")), (303, Some("/admin/")), "{path}");
    }
    let (code, resp) = call(&c, "GET", "/admin/jobs", Some("executor_console=forged"), None);
    assert_eq!((code, resp.header("location")), (303, Some("/admin/")));
    let (code, resp) = call(&c, "GET", "/admin/", None, None);
    assert_eq!(code, 200);
    let form = resp.into_string().unwrap();
    assert!(form.contains("type=\"password\"") && !form.contains(&c.admin_token));

    // A wrong token is refused without a cookie; the executors' secret is not the admin token.
    for wrong in ["wrong-token-0123456789abcdef".to_string(), c.secret.clone(), String::new()] {
        let (code, resp) =
            call(&c, "POST", "/admin/sign-in", None, Some(&format!("token={}", form_value(&wrong))));
        assert_eq!(code, 403);
        assert!(resp.header("set-cookie").is_none());
        assert!(resp.into_string().unwrap().contains("invalid admin token"));
    }
    let (code, resp) =
        call(&c, "POST", "/admin/sign-in", None, Some(&format!("token={}", form_value(&c.admin_token))));
    assert_eq!((code, resp.header("location")), (303, Some("/admin/jobs")));
    let set = resp.header("set-cookie").unwrap().to_string();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age=43200"] {
        assert!(set.contains(part), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();

    let id = c.submit(Coordinator::simple_job());
    let (code, resp) = call(&c, "GET", &format!("/admin/jobs/{id}"), Some(&cookie), None);
    assert_eq!(code, 200);
    let csp = resp.header("content-security-policy").unwrap_or_default().to_string();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert_eq!(resp.header("x-frame-options"), Some("DENY"));
    assert_eq!(resp.header("referrer-policy"), Some("no-referrer"));
    let page = resp.into_string().unwrap();
    assert!(!page.contains(&c.admin_token), "the admin token is never on a page");
    assert!(!page.contains("<script>") && page.contains("<script src=\"/admin/assets/console.js\""));
    let csrf = csrf_of(&page);

    // State changes need the session's CSRF token.
    let cancel = format!("/admin/jobs/{id}/cancel");
    for body in ["", "csrf=", "csrf=0000", "other=1"] {
        assert_eq!(call(&c, "POST", &cancel, Some(&cookie), Some(body)).0, 403, "{body:?}");
    }
    assert_eq!(c.job(id)["state"], "queued", "a refused cancel changes nothing");
    assert_eq!(
        call(&c, "POST", &cancel, None, Some(&format!("csrf={csrf}"))).1.header("location"),
        Some("/admin/")
    );
    assert_eq!(c.job(id)["state"], "queued");
    let (code, resp) = call(&c, "POST", &cancel, Some(&cookie), Some(&format!("csrf={csrf}")));
    assert_eq!((code, resp.header("location")), (303, Some(format!("/admin/jobs/{id}").as_str())));
    assert_eq!(c.job(id)["state"], "canceled");
    let requeue = format!("/admin/jobs/{id}/requeue");
    assert_eq!(call(&c, "POST", &requeue, Some(&cookie), Some("")).0, 403);
    assert_eq!(c.job(id)["state"], "canceled");
    assert_eq!(call(&c, "POST", &requeue, Some(&cookie), Some(&format!("csrf={csrf}"))).0, 303);
    assert_eq!(c.job(id)["state"], "queued");
    assert_eq!(call(&c, "POST", &requeue, Some(&cookie), Some(&format!("csrf={csrf}"))).0, 409, "not final");

    // A second session has its own CSRF token; sign-out needs it and ends only its session.
    let other = sign_in(&c);
    let (_, resp) = call(&c, "GET", "/admin/jobs", Some(&other), None);
    let other_csrf = csrf_of(&resp.into_string().unwrap());
    assert_ne!(other_csrf, csrf);
    assert_eq!(
        call(&c, "POST", "/admin/sign-out", Some(&cookie), Some(&format!("csrf={other_csrf}"))).0,
        403
    );
    assert_eq!(call(&c, "POST", "/admin/sign-out", Some(&cookie), Some(&format!("csrf={csrf}"))).0, 303);
    assert_eq!(call(&c, "GET", "/admin/jobs", Some(&cookie), None).0, 303, "signed out");
    assert_eq!(call(&c, "GET", "/admin/jobs", Some(&other), None).0, 200);

    // Filters and paging over more than a page.
    for _ in 0..60 {
        c.submit(json!({"repositoryName": "github.com/acme/paged", "commit": "abc",
            "dockerSteps": [{"image": "alpine", "commands": ["true"], "dir": "", "env": []}]}));
    }
    let (_, resp) = call(&c, "GET", "/admin/jobs?repository=github.com%2Facme%2Fpaged", Some(&other), None);
    assert!(resp.header("server-timing").is_some_and(|t| t.starts_with("db;dur=")));
    let page = resp.into_string().unwrap();
    assert_eq!(page.matches("<tr class=\"job\">").count(), 50);
    let older = page.split("href=\"/admin/jobs?").find(|s| s.contains("id=\"older\"")).unwrap();
    let older = older.split('"').next().unwrap().replace("&amp;", "&");
    assert!(older.contains("repository=github.com%2Facme%2Fpaged&before="), "{older}");
    let (_, resp) = call(&c, "GET", &format!("/admin/jobs?{older}"), Some(&other), None);
    let page = resp.into_string().unwrap();
    assert_eq!(page.matches("<tr class=\"job\">").count(), 10);
    assert!(!page.contains(&format!("href=\"/admin/jobs/{id}\"")), "other repositories are filtered out");

    // The executors page shows figures from the metrics each executor's heartbeats carry.
    let ex = c.executor("exec-figures");
    let metrics = "executor_jobs_total{queue=\"batches\",outcome=\"completed\"} 7\n\
                   executor_jobs_running 1\n\
                   executor_step_duration_seconds_sum{runtime=\"oci\",result=\"ok\"} 6\n\
                   executor_step_duration_seconds_count{runtime=\"oci\",result=\"ok\"} 4\n";
    let (code, body) = ex.post(
        "batches/heartbeat",
        &json!({"executorName": "exec-figures", "version": "V2", "jobIds": [], "os": "linux",
                "architecture": "amd64", "executorVersion": "0.1.0", "prometheusMetrics": metrics}),
    );
    assert_eq!(code, 200, "{body}");
    let (_, resp) = call(&c, "GET", "/admin/executors", Some(&other), None);
    let page = resp.into_string().unwrap();
    let row = page.split("<tr class=\"executor\">").find(|r| r.contains("exec-figures")).unwrap();
    for want in ["jobs: 7 completed", "running: 1", "steps: 4, mean 1.50 s"] {
        assert!(row.contains(want), "{want:?} in {row}");
    }
}

/// chromedriver with one headless Chromium session; both end on drop.
struct Browser {
    driver: Child,
    url: String,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts chromedriver and Chromium on loopback; `None` (a skip) without them.
    fn start(test: &str) -> Option<Browser> {
        let (Ok(driver), Ok(chromium)) = (which::which("chromedriver"), which::which("chromium")) else {
            common::skip(test, "chromium", "chromium and chromedriver are not installed");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(driver)
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into(), "--log-level=SEVERE".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        let mut b =
            Browser { driver: child, url: format!("http://127.0.0.1:{port}"), _profile: profile, shots };
        wait_until("chromedriver to listen", Duration::from_secs(20), || {
            agent().get(&format!("{}/status", b.url)).call().is_ok()
        });
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-default-apps",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--metrics-recording-only",
            // Belt and braces for "loopback only": no name resolves, and any non-loopback
            // connection would go to a proxy that is not there.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", b._profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args}}}});
        let session = b.raw("POST", "/session", Some(caps));
        let id = session["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {session}"));
        b.url = format!("{}/session/{id}", b.url);
        Some(b)
    }

    /// A WebDriver command; returns its `value` (errors are values with an `error` field).
    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let req = agent().request(method, &format!("{}{path}", self.url));
        let r = match body {
            Some(b) => req.send_string(&b.to_string()),
            None => req.call(),
        };
        let text = match r {
            Ok(resp) => resp.into_string().unwrap(),
            Err(ureq::Error::Status(_, resp)) => resp.into_string().unwrap(),
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        };
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("WebDriver answer {text:?}: {e}"));
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let v = self.raw(method, path, body);
        assert!(v.get("error").is_none(), "WebDriver {method} {path}: {v}");
        v
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn current_url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }

    fn find(&self, css: &str) -> Option<String> {
        let v = self.raw("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        if v.get("error").is_some_and(|e| e != "no such element") {
            panic!("WebDriver find {css:?}: {v}");
        }
        v[ELEMENT].as_str().map(str::to_string)
    }

    fn element(&self, css: &str) -> String {
        self.find(css).unwrap_or_else(|| panic!("no element {css:?} on {}", self.current_url()))
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.cmd("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.cmd("POST", &format!("/element/{id}/value"), Some(json!({ "text": text })));
    }

    /// Runs `script` in the page (WebDriver scripts are not subject to the page's CSP).
    fn script(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// The text content of the first element matching `css` ("" when there is none).
    fn text(&self, css: &str) -> String {
        let js = format!("var e = document.querySelector({}); return e ? e.textContent : '';", json!(css));
        self.script(&js).as_str().unwrap_or_default().to_string()
    }

    /// Whether a JavaScript dialog (alert, confirm, prompt) is open.
    fn dialog_open(&self) -> bool {
        let v = self.raw("GET", "/alert/text", None);
        match v.get("error").and_then(|e| e.as_str()) {
            Some("no such alert") => false,
            Some(other) => panic!("GET alert/text: {other}: {v}"),
            None => true,
        }
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let png = self.cmd("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }

    fn sign_in(&self, c: &Coordinator) {
        self.goto(&format!("{}/admin/", c.url));
        self.type_into("#token", &c.admin_token);
        self.click("#sign-in");
        wait_until("the jobs page after sign-in", Duration::from_secs(10), || {
            self.current_url().ends_with("/admin/jobs")
        });
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = agent().delete(&self.url).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn entry(name: &str, id: i64, key: &str, out: &str) -> Value {
    json!({"executorName": name, "jobId": id, "key": key, "command": ["sh", "-c", "x"],
           "startTime": "2024-01-02T03:04:05Z", "out": out})
}

fn append(name: &str, id: i64, key: &str, out: &str) -> Value {
    let mut e = entry(name, id, key, out);
    e["entryId"] = json!(1);
    e["append"] = json!(true);
    e
}

#[test]
fn console_in_a_browser_shows_executors_and_follows_a_live_log() {
    let Some(b) = Browser::start("console_in_a_browser_shows_executors_and_follows_a_live_log") else {
        return;
    };
    let c = Coordinator::start_with(&["--active-window", "3s"]);
    let repo = tempfile::tempdir().unwrap();
    common::sh(repo.path(), "git init -q . && git commit -q --allow-empty -m init");
    let (code, body) = c.request(
        "POST",
        "/api/repos",
        Some(&c.admin_auth()),
        Some(&json!({"name": "github.com/acme/widgets", "path": repo.path()}).to_string()),
    );
    assert_eq!(code, 201, "{body}");

    // Pages need the session: the browser lands on the sign-in form.
    b.goto(&format!("{}/admin/executors", c.url));
    assert!(b.current_url().ends_with("/admin/"), "{}", b.current_url());
    b.screenshot("sign-in");
    b.type_into("#token", "not-the-admin-token-0123456789");
    b.click("#sign-in");
    // The click returns before the answer's page is there: wait for it, as the other clicks do.
    wait_until("the sign-in answer", Duration::from_secs(5), || !b.text("#sign-in-error").is_empty());
    assert_eq!(b.text("#sign-in-error"), "invalid admin token");
    assert!(b.current_url().ends_with("/admin/sign-in"));
    b.sign_in(&c);

    // An executor shows up after its first heartbeat.
    let ex = c.executor("exec-live-1");
    ex.heartbeat("batches", &[]);
    b.goto(&format!("{}/admin/executors", c.url));
    assert!(b.text("#active-executors").contains("exec-live-1"), "{}", b.text("main"));
    assert!(b.text("#active-executors").contains("linux / amd64"));

    let id = c.submit(json!({"repositoryName": "github.com/acme/widgets", "commit": "0123456789abcdef0123",
        "dockerSteps": [{"key": "build", "image": "alpine", "commands": ["make"], "dir": "", "env": []}]}));
    let job = ex.dequeue("batches", "").expect("the job");
    ex.heartbeat("batches", &[id]);
    let (code, _) = ex.job_call(
        "batches",
        &job,
        "addExecutionLogEntry",
        entry("exec-live-1", id, "step.docker.build", "line one\n"),
    );
    assert_eq!(code, 200);
    ex.heartbeat("batches", &[id]);
    b.goto(&format!("{}/admin/executors", c.url));
    assert!(b.text("#active-executors").contains(&format!("#{id}")), "its running job is listed");
    b.screenshot("executors");

    // The job page follows the log while the step runs, without reloading.
    b.goto(&format!("{}/admin/jobs/{id}", c.url));
    assert_eq!(b.text("#entry-1 pre"), "line one\n");
    assert_eq!(b.text("#job-state"), "processing");
    b.script("window.stillTheSamePage = true; return null;");
    let mut delays = Vec::new();
    for (i, chunk) in
        ["\x1b[32mline two\x1b[0m\n", "line three\n", "\x1b[1;31mline four\x1b[0m\n"].iter().enumerate()
    {
        let sent = Instant::now();
        let (code, body) = ex.job_call(
            "batches",
            &job,
            "updateExecutionLogEntry",
            append("exec-live-1", id, "step.docker.build", chunk),
        );
        assert_eq!(code, 204, "{body}");
        let want = ["line two", "line three", "line four"][i];
        wait_until(&format!("{want:?} on the page"), Duration::from_secs(5), || {
            b.text("#entry-1 pre").contains(want)
        });
        delays.push(sent.elapsed());
    }
    eprintln!("console live log: append to page in {delays:?}");
    assert_eq!(b.text("#entry-1 pre"), "line one\nline two\nline three\nline four\n");
    assert_eq!(b.text("#entry-1 pre .fg-2"), "line two");
    assert_eq!(b.text("#entry-1 pre .fg-1.bold"), "line four");
    assert_eq!(b.text("#entry-1 .exit"), "running");
    assert_eq!(b.script("return window.stillTheSamePage === true;"), json!(true), "no reload");
    b.screenshot("job-running");

    // A step printing fast: every chunk arrives, in order, whatever bursts the stream gathers.
    let mut want = b.text("#entry-1 pre");
    let burst = Instant::now();
    for i in 0..300 {
        let chunk = format!("\x1b[3{}mfast {i}\x1b[0m\n", i % 8);
        want.push_str(&format!("fast {i}\n"));
        let (code, _) = ex.job_call(
            "batches",
            &job,
            "updateExecutionLogEntry",
            append("exec-live-1", id, "step.docker.build", &chunk),
        );
        assert_eq!(code, 204);
    }
    wait_until("the burst on the page", Duration::from_secs(10), || {
        b.text("#entry-1 pre").len() >= want.len()
    });
    eprintln!("console live log: 300 appends sent and shown in {:?}", burst.elapsed());
    assert_eq!(b.text("#entry-1 pre"), want);
    assert_eq!(b.script("return document.querySelectorAll('#entry-1 pre .fg-5').length;"), json!(37));

    // A second step and the end of the job arrive live too.
    let (code, _) = ex.job_call(
        "batches",
        &job,
        "addExecutionLogEntry",
        entry("exec-live-1", id, "step.docker.test", "ok\n"),
    );
    assert_eq!(code, 200);
    wait_until("the second step", Duration::from_secs(5), || b.text("#entry-2 .key") == "step.docker.test");
    let mut done = append("exec-live-1", id, "step.docker.build", "");
    done["exitCode"] = json!(0);
    done["durationMs"] = json!(1500);
    assert_eq!(ex.job_call("batches", &job, "updateExecutionLogEntry", done).0, 204);
    wait_until("exit 0 of the first step", Duration::from_secs(5), || b.text("#entry-1 .exit") == "exit 0");
    assert_eq!(b.text("#entry-1 .duration"), "1.5s");
    assert_eq!(ex.mark("batches", &job, "markComplete", ""), 204);
    wait_until("the completed state", Duration::from_secs(5), || b.text("#job-state") == "completed");
    assert!(!b.dialog_open());
    b.screenshot("job-completed");

    b.goto(&format!("{}/admin/jobs", c.url));
    assert!(b.text("#jobs").contains("github.com/acme/widgets@0123456789ab"), "{}", b.text("#jobs"));
    b.screenshot("jobs");
    b.goto(&format!("{}/admin/repos", c.url));
    assert!(b.text("#repos").contains("github.com/acme/widgets"));
    b.screenshot("repos");
    b.goto(&format!("{}/admin/files", c.url));
    b.screenshot("files");

    // Without heartbeats it turns inactive after the active window (3 s here).
    b.goto(&format!("{}/admin/executors", c.url));
    wait_until("the executor to turn inactive", Duration::from_secs(20), || {
        b.script("location.reload(); return null;");
        std::thread::sleep(Duration::from_millis(200));
        b.text("#inactive-executors").contains("exec-live-1")
    });
    assert!(!b.text("#active-executors").contains("exec-live-1"));
    b.screenshot("executors-inactive");

    // Sign-out ends the session.
    b.click("#sign-out");
    wait_until("the sign-in form", Duration::from_secs(5), || b.find("#token").is_some());
    b.goto(&format!("{}/admin/jobs", c.url));
    assert!(b.current_url().ends_with("/admin/"));
}

#[test]
fn console_in_a_browser_cancels_requeues_and_keeps_hostile_text_inert() {
    let Some(b) = Browser::start("console_in_a_browser_cancels_requeues_and_keeps_hostile_text_inert") else {
        return;
    };
    let c = Coordinator::start();
    let script = "<script>alert(1)</script>";
    let img = "\"><img src=x onerror=alert(1)>";
    let link = "javascript:alert(1)";
    let id = c.submit(json!({"repositoryName": script, "commit": img,
        "dockerSteps": [{"key": img, "image": script, "commands": [link], "dir": "", "env": []}]}));
    let ex = c.executor("exec-hostile");
    ex.heartbeat("batches", &[]);
    let job = ex.dequeue("batches", "").expect("the job");
    // Output with markup, an OSC 8 hyperlink to javascript:, a window title, colours and a
    // cursor movement: only the text and the colour survive.
    let out = format!(
        "{script}\n\x1b[31m{img}\x1b[0m\n\x1b]8;;{link}\x07click me\x1b]8;;\x07\n\x1b]0;pwned\x07\x1b[2J\x1b[Hend {link}\n"
    );
    let plain = format!("{script}\n{img}\nclick me\nend {link}\n");
    assert_eq!(
        ex.job_call("batches", &job, "addExecutionLogEntry", entry("exec-hostile", id, script, &out)).0,
        200
    );
    b.sign_in(&c);
    b.goto(&format!("{}/admin/jobs/{id}", c.url));
    let inert = |b: &Browser| {
        assert!(!b.dialog_open(), "a dialog opened");
        assert_eq!(b.script("return document.images.length;"), json!(0), "no image element");
        assert_eq!(b.script("return document.scripts.length;"), json!(1), "only the console's script");
        assert_eq!(
            b.script("return document.querySelectorAll('#log a').length;"),
            json!(0),
            "no link in the log"
        );
        assert_eq!(b.script("return document.title;"), json!(format!("Job {id} · executor queue")));
    };
    inert(&b);
    assert_eq!(b.text("#entry-1 pre"), plain);
    assert_eq!(b.text("#entry-1 pre .fg-1"), img);
    assert_eq!(b.text("#entry-1 .key"), script);
    assert!(b.text("main").contains(&format!("{script}@")), "the repository shows as text");
    assert!(b.text("#steps").contains(img) && b.text("#steps").contains(link));
    // The same through the live path (console.js).
    let (code, _) =
        ex.job_call("batches", &job, "updateExecutionLogEntry", append("exec-hostile", id, script, &out));
    assert_eq!(code, 204);
    wait_until("the appended output", Duration::from_secs(5), || b.text("#entry-1 pre").len() > plain.len());
    assert_eq!(b.text("#entry-1 pre"), format!("{plain}{plain}"));
    inert(&b);
    b.goto(&format!("{}/admin/jobs", c.url));
    inert_list(&b, script, img);
    b.goto(&format!("{}/admin/jobs/{id}", c.url));
    b.screenshot("job-hostile");

    // Cancel from the page: the next heartbeat carries it within 2 s.
    let clicked = Instant::now();
    b.click("#cancel");
    let mut cancel_ids = Value::Null;
    wait_until("the cancel in a heartbeat", Duration::from_secs(2), || {
        cancel_ids = ex.heartbeat("batches", &[id])["cancelIds"].clone();
        cancel_ids == json!([id.to_string()])
    });
    eprintln!("console cancel: click to heartbeat cancelIds in {:?}", clicked.elapsed());
    wait_until("the page after cancel", Duration::from_secs(5), || {
        b.text("main").contains("cancel requested")
    });
    assert_eq!(ex.mark("batches", &job, "markFailed", "canceled"), 204);
    wait_until("the canceled state", Duration::from_secs(5), || {
        b.script("location.reload(); return null;");
        std::thread::sleep(Duration::from_millis(100));
        b.text("#job-state") == "canceled"
    });
    b.screenshot("job-canceled");

    // Requeue: queued again, and an executor runs it again.
    b.click("#requeue");
    wait_until("the queued state", Duration::from_secs(5), || b.text("#job-state") == "queued");
    assert_eq!(c.job(id)["state"], "queued");
    let again = ex.dequeue("batches", "").expect("the requeued job");
    assert_eq!(again["id"], id);
    assert_ne!(again["token"], job["token"], "a new run with a new token");
    inert(&b);

    // The dialog check sees a dialog when there is one.
    b.script("setTimeout(function () { alert('probe'); }, 0); return null;");
    wait_until("the probe dialog", Duration::from_secs(5), || b.dialog_open());
    b.cmd("POST", "/alert/dismiss", Some(json!({})));
    assert!(!b.dialog_open());
}

fn inert_list(b: &Browser, script: &str, img: &str) {
    assert!(!b.dialog_open());
    assert_eq!(b.script("return document.images.length;"), json!(0));
    assert_eq!(b.text("#jobs td.repo"), format!("{script}@{}", &img[..12]));
}

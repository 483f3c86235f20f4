//! Behind `scripts/bench-console`: `fill DIR N` writes N jobs straight into a coordinator's store
//! (a third canceled, over 100 repositories and both default queues); `measure` signs in to a
//! running coordinator and times the console's jobs page (a page of 50: the first, a filtered
//! one and one deep in the table by keyset) from its `Server-Timing` header and on the client,
//! next to `GET /api/jobs?limit=50` and `executor queue jobs --json --limit 50` for the same page.
//!
//! Environment of `measure`: BENCH_URL, BENCH_ADMIN_TOKEN, BENCH_BIN (the executor binary),
//! BENCH_ROUNDS (200).

use std::time::{Duration, Instant};

fn p50(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fill(dir: &str, n: i64) -> Result<(), Box<dyn std::error::Error>> {
    let mut store = executor::server::store::Store::open(std::path::Path::new(dir))?;
    let started = Instant::now();
    let now = executor::server::store::now_ms();
    for i in 0..n {
        let queue = if i % 2 == 0 { "batches" } else { "codeintel" };
        let repo = format!("github.com/acme/repo-{}", i % 100);
        let payload = format!(
            r#"{{"version":2,"repositoryName":"{repo}","commit":"{:040x}","dockerSteps":[{{"image":"alpine","commands":["make"],"dir":"","env":[]}}]}}"#,
            i
        );
        let id = store.submit(queue, &payload, &repo, now + i)?;
        if i % 3 == 0 {
            store.cancel(id, now + i)?;
        }
    }
    println!("filled {n} jobs in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn measure() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("BENCH_URL")?;
    let token = std::env::var("BENCH_ADMIN_TOKEN")?;
    let bin = std::env::var("BENCH_BIN")?;
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(200);
    let agent = ureq::AgentBuilder::new().redirects(0).timeout(Duration::from_secs(30)).build();
    let resp = agent
        .post(&format!("{url}/admin/sign-in"))
        .set("Content-Type", "application/x-www-form-urlencoded")
        .send_string(&format!("token={token}"))?;
    let cookie =
        resp.header("set-cookie").ok_or("no session cookie")?.split(';').next().unwrap_or("").to_string();
    let newest: i64 = {
        let body = agent
            .get(&format!("{url}/api/jobs?limit=1"))
            .set("Authorization", &format!("Bearer {token}"))
            .call()?;
        let v: serde_json::Value = serde_json::from_str(&body.into_string()?)?;
        v["jobs"][0]["id"].as_i64().ok_or("no jobs")?
    };
    let deep = newest / 2;
    println!("jobs page of 50, {rounds} rounds, p50 in ms (server = Server-Timing db + render):");
    for (name, query) in [
        ("newest", String::new()),
        ("state=canceled", "state=canceled".to_string()),
        ("queue=codeintel&repository", "queue=codeintel&repository=github.com%2Facme%2Frepo-7".to_string()),
        ("deep (before=N/2)", format!("before={deep}")),
    ] {
        let (mut server, mut client) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            let resp = agent.get(&format!("{url}/admin/jobs?{query}")).set("Cookie", &cookie).call()?;
            let timing = resp.header("server-timing").unwrap_or_default().to_string();
            let body = resp.into_string()?;
            client.push(t.elapsed().as_secs_f64() * 1000.0);
            if !body.contains("<tr class=\"job\">") {
                return Err(format!("no jobs on the page for {query:?}").into());
            }
            let ms: f64 = timing
                .split(',')
                .filter_map(|p| p.split("dur=").nth(1))
                .filter_map(|d| d.trim().parse::<f64>().ok())
                .sum();
            server.push(ms);
        }
        println!("  console {name:<28} server {:>7.2}   client {:>7.2}", p50(server), p50(client));
    }
    let mut api = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        agent
            .get(&format!("{url}/api/jobs?limit=50"))
            .set("Authorization", &format!("Bearer {token}"))
            .call()?
            .into_string()?;
        api.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!("  GET /api/jobs?limit=50 (JSON)              client {:>7.2}", p50(api));
    let mut cli = Vec::new();
    for _ in 0..rounds.min(50) {
        let t = Instant::now();
        let out = std::process::Command::new(&bin)
            .args(["queue", "jobs", "--json", "--limit", "50"])
            .env("EXECUTOR_FRONTEND_URL", &url)
            .env("EXECUTOR_QUEUE_ADMIN_TOKEN", &token)
            .output()?;
        if !out.status.success() {
            return Err(format!("queue jobs failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        cli.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!("  executor queue jobs --json --limit 50      process {:>6.2}", p50(cli));
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("fill") => {
            let dir = args.get(2).ok_or("usage: bench_console fill DIR N")?;
            let n = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(100_000);
            fill(dir, n)
        }
        Some("measure") => measure(),
        _ => Err("usage: bench_console fill DIR N | measure".into()),
    }
}

//! Load generator behind `scripts/bench-queue`: measures a running coordinator with K concurrent
//! clients on loopback. Prints a baseline (an authenticated no-op request), dequeue-to-markComplete
//! cycles per second with p50/p99 dequeue latency, and long-poll pickup latency.
//!
//! Environment: BENCH_URL, BENCH_SECRET, BENCH_ADMIN_TOKEN, BENCH_CLIENTS (16), BENCH_JOBS (4000),
//! BENCH_PICKUPS (50), BENCH_TENANTS (16: the jobs' `tenant`s, in turn, which the coordinator's
//! fair order takes turns across). BENCH_URL may list several replicas of one coordinator, comma-separated:
//! client `w` then talks to replica `w mod n`, submits go round the replicas, and each pickup's
//! waiting dequeue is on another replica than its submit (the wake-up crosses replicas).

use std::sync::Mutex;
use std::time::{Duration, Instant};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).max_idle_connections_per_host(4).build()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let urls: Vec<String> = env("BENCH_URL", "").split(',').map(str::to_string).collect();
    let url = urls[0].clone();
    let replica = |i: usize| urls[i % urls.len()].clone();
    let secret = env("BENCH_SECRET", "");
    let admin = env("BENCH_ADMIN_TOKEN", "");
    let clients: usize = env("BENCH_CLIENTS", "16").parse()?;
    let jobs: usize = env("BENCH_JOBS", "4000").parse()?;
    let pickups: usize = env("BENCH_PICKUPS", "50").parse()?;
    let tenants: usize = env("BENCH_TENANTS", "16").parse::<usize>()?.max(1);
    if url.is_empty() || secret.is_empty() || admin.is_empty() {
        return Err("set BENCH_URL, BENCH_SECRET and BENCH_ADMIN_TOKEN (scripts/bench-queue does)".into());
    }
    let exec_auth = format!("token-executor {secret}");
    let admin_auth = format!("Bearer {admin}");
    let job = r#"{"dockerSteps":[{"key":"b","image":"alpine","commands":["true"],"dir":"","env":[]}]}"#;
    println!("coordinator {}, {clients} clients, {jobs} jobs of {tenants} tenants", urls.join(" "));

    // Baseline: the same number of authenticated requests that touch no job (GET test/auth).
    let lat = Mutex::new(Vec::new());
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..clients {
            let (lat, exec_auth, url) = (&lat, &exec_auth, replica(w));
            s.spawn(move || {
                let a = agent();
                let mut mine = Vec::new();
                for _ in 0..(jobs * 2 / clients) {
                    let t0 = Instant::now();
                    let r =
                        a.get(&format!("{url}/.executors/test/auth")).set("Authorization", exec_auth).call();
                    assert!(r.is_ok(), "test/auth failed");
                    mine.push(t0.elapsed());
                }
                lat.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
            });
        }
    });
    let elapsed = t.elapsed();
    let mut l = lat.into_inner().unwrap_or_else(|e| e.into_inner());
    l.sort();
    println!(
        "baseline  GET test/auth: {:.0} requests/s (= {:.0} two-request cycles/s), p50 {:.2} ms, p99 {:.2} ms",
        l.len() as f64 / elapsed.as_secs_f64(),
        l.len() as f64 / 2.0 / elapsed.as_secs_f64(),
        pct(&l, 0.5),
        pct(&l, 0.99)
    );

    // Submit the jobs.
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..clients {
            let (admin_auth, url) = (&admin_auth, replica(w));
            s.spawn(move || {
                let a = agent();
                for i in 0..(jobs / clients) {
                    let tenant = (w * (jobs / clients) + i) % tenants;
                    let body = job
                        .replace("{\"dockerSteps\"", &format!("{{\"tenant\":\"t{tenant}\",\"dockerSteps\""));
                    let r = a
                        .post(&format!("{url}/api/jobs"))
                        .set("Authorization", admin_auth)
                        .set("Content-Type", "application/json")
                        .send_string(&body);
                    assert!(r.is_ok(), "submit failed");
                }
            });
        }
    });
    let submitted = jobs / clients * clients;
    println!("submit    {:.0} jobs/s", submitted as f64 / t.elapsed().as_secs_f64());

    // Dequeue -> markComplete cycles.
    let lat = Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..clients {
            let (lat, done, exec_auth, url) = (&lat, &done, &exec_auth, replica(w));
            s.spawn(move || {
                let a = agent();
                let name = format!("bench-{w}");
                let hb = format!(r#"{{"executorName":"{name}","version":"V2"}}"#);
                let r = a
                    .post(&format!("{url}/.executors/queue/batches/heartbeat"))
                    .set("Authorization", exec_auth)
                    .send_string(&hb);
                assert!(r.is_ok(), "heartbeat failed");
                let deq = format!(r#"{{"executorName":"{name}","version":"5.2.0"}}"#);
                let mut mine = Vec::new();
                loop {
                    let t0 = Instant::now();
                    let Ok(resp) = a
                        .post(&format!("{url}/.executors/queue/batches/dequeue"))
                        .set("Authorization", exec_auth)
                        .send_string(&deq)
                    else {
                        panic!("dequeue failed");
                    };
                    mine.push(t0.elapsed());
                    if resp.status() == 204 {
                        break;
                    }
                    let text = resp.into_string().unwrap_or_default();
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    let (id, token) = (v["id"].as_i64().unwrap_or(0), v["token"].as_str().unwrap_or(""));
                    let r = a
                        .post(&format!("{url}/.executors/queue/batches/markComplete"))
                        .set("Authorization", &format!("Bearer {token}"))
                        .set("X-Sourcegraph-Job-ID", &id.to_string())
                        .set("X-Sourcegraph-Executor-Name", &name)
                        .send_string(&format!(r#"{{"executorName":"{name}","jobId":{id}}}"#));
                    assert!(r.is_ok(), "markComplete failed");
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                lat.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
            });
        }
    });
    let elapsed = t.elapsed();
    let mut l = lat.into_inner().unwrap_or_else(|e| e.into_inner());
    l.sort();
    let done = done.into_inner();
    assert_eq!(done, submitted, "every job completed once");
    println!(
        "cycles    dequeue+markComplete: {:.0} cycles/s ({done} jobs in {:.2} s), dequeue p50 {:.2} ms, p99 {:.2} ms",
        done as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        pct(&l, 0.5),
        pct(&l, 0.99)
    );

    // Long-poll pickup: job submitted -> waiting dequeue answered.
    let a = agent();
    let mut pick = Vec::new();
    for p in 0..pickups {
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        let submit_url = replica(p);
        let waiter = {
            let (url, exec_auth) = (replica(p + 1), exec_auth.clone());
            std::thread::spawn(move || {
                let a = agent();
                tx.send(Instant::now()).ok();
                let r = a
                    .post(&format!("{url}/.executors/queue/codeintel/dequeue?wait=30s"))
                    .set("Authorization", &exec_auth)
                    .send_string(r#"{"executorName":"bench-0","version":"5.2.0"}"#);
                let answered = Instant::now();
                (r.map(|r| r.status()).unwrap_or(0), answered)
            })
        };
        rx.recv()?;
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        let r = a
            .post(&format!("{submit_url}/api/jobs"))
            .set("Authorization", &admin_auth)
            .set("Content-Type", "application/json")
            .send_string(&job.replace("{\"dockerSteps\"", "{\"queue\":\"codeintel\",\"dockerSteps\""));
        assert!(r.is_ok(), "submit failed");
        let (status, answered) = waiter.join().map_err(|_| "waiter panicked")?;
        assert_eq!(status, 200, "long poll did not get the job");
        pick.push(answered.saturating_duration_since(t0));
    }
    pick.sort();
    println!(
        "pickup    long-poll (submit sent -> dequeue answered), {} runs: p50 {:.2} ms, p99 {:.2} ms",
        pick.len(),
        pct(&pick, 0.5),
        pct(&pick, 0.99)
    );
    println!("goals     >= 1000 cycles/s; dequeue p99 < 10 ms at 16 clients; pickup p50 < 20 ms");
    Ok(())
}

//! Schema-driven fuzz of the HTTP API: schemathesis (PyPI, in the venv that
//! `scripts/api-fuzz-venv.sh` makes) reads `/openapi.json` of a real daemon
//! with real VMs and sends what it generates from it: valid and invalid
//! bodies, parameters and sequences (it creates sandboxes and uses their
//! ids). The daemon must answer every request, never with a server error,
//! and be alive and healthy at the end.
//!
//! The 5xx that are answers and not faults: the authenticated proxy's 502
//! when nothing listens on the port (it is a gateway, and the upstream
//! refused), and the spec's 503 for a sandbox not ready (still starting, or
//! stopped), which the fuzzer's two workers cause by racing each other.
//!
//! Bounded for CI: `BHATTI_API_FUZZ_SECS` (default 120) of generation,
//! `BHATTI_API_FUZZ_EXAMPLES` (default 20) cases per operation and phase,
//! `BHATTI_API_FUZZ_SEED` (default fixed, so CI runs are repeatable).
//! It prints one line of figures: `API FUZZ: ...`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{workspace, TestDaemon};
use serde_json::Value;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One request schemathesis sent and what came back.
struct Exchange {
    label: String,
    method: String,
    uri: String,
    status: Option<u16>,
    body: String,
}

/// Every exchange in schemathesis' NDJSON event stream, each once.
fn exchanges(ndjson: &std::path::Path) -> Vec<Exchange> {
    let file = std::fs::File::open(ndjson).expect("ndjson report");
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.expect("read report");
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let Some(rec) = event.pointer("/ScenarioFinished/recorder") else {
            continue;
        };
        let label = rec["label"].as_str().unwrap_or_default().to_string();
        let Some(interactions) = rec["interactions"].as_object() else {
            continue;
        };
        for (case, i) in interactions {
            if !seen.insert(case.clone()) {
                continue;
            }
            let resp = &i["response"];
            let body = resp
                .pointer("/content/$base64")
                .and_then(Value::as_str)
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            out.push(Exchange {
                label: label.clone(),
                method: i["request"]["method"].as_str().unwrap_or("?").to_string(),
                uri: i["request"]["uri"].as_str().unwrap_or("?").to_string(),
                status: resp["status_code"].as_u64().map(|s| s as u16),
                body,
            });
        }
    }
    out
}

/// A 5xx that is the right answer rather than a fault: the proxy's 502
/// naming the port nothing listens on (a HEAD's answer has no body).
fn expected_5xx(x: &Exchange) -> bool {
    let path = x.uri.split('?').next().unwrap_or_default();
    let proxy_502 = x.status == Some(502)
        && path.contains("/proxy/")
        && (x.body.contains("not listening") || (x.method == "HEAD" && x.body.is_empty()));
    // The spec's "503 sandbox not ready": schemathesis' two workers race
    // each other (one execs in a sandbox the other is still creating or
    // stopping), and this is the answer the spec gives for that.
    let not_ready = x.status == Some(503)
        && (x.body.contains("is still starting") || x.body.contains("is not running (status"));
    proxy_502 || not_ready
}

#[test]
fn schemathesis_finds_no_server_errors() {
    let st = workspace().join("target/api-fuzz-venv/bin/schemathesis");
    assert!(
        st.exists(),
        "{} is missing: run `bash scripts/api-fuzz-venv.sh` (scripts/test.sh does)",
        st.display()
    );
    let secs = env_or("BHATTI_API_FUZZ_SECS", 120);
    let examples = env_or("BHATTI_API_FUZZ_EXAMPLES", 20);
    let seed = env_or("BHATTI_API_FUZZ_SEED", 20261129);

    // Rate limits off: the fuzz is about answers, not 429s. Small caps: at
    // most 2 VMs of 512 MB at once, whatever it creates.
    let mut d = TestDaemon::start_with(
        "fuzz",
        "api_create_per_min: 0\napi_write_per_min: 0\napi_read_per_min: 0\n",
    );
    let key = d.create_user(
        "fuzz",
        &[
            "--max-sandboxes",
            "2",
            "--max-cpus",
            "1",
            "--max-memory",
            "512",
        ],
    );
    let work = d.data_dir.path().join("schemathesis");
    std::fs::create_dir_all(&work).expect("work dir");
    let ndjson = work.join("events.ndjson");

    let started = Instant::now();
    let mut child = Command::new(&st)
        .current_dir(&work)
        .args(["--no-color", "run"])
        .arg(format!("{}/openapi.json", d.url))
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--checks", "not_a_server_error"])
        .args(["--max-examples", &examples.to_string()])
        .args(["--max-time", &secs.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--workers", "2", "--request-timeout", "60"])
        .args(["--report", "ndjson", "--report-ndjson-path"])
        .arg(&ndjson)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(work.join("stdout.txt")).expect("stdout file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run schemathesis");
    // A hang (of the daemon or of a request) shows as a run that does not end.
    let deadline = started + Duration::from_secs(secs + 240);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait schemathesis") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "schemathesis still running after {} s; the daemon or a request hangs",
                started.elapsed().as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let elapsed = started.elapsed();
    let summary = std::fs::read_to_string(work.join("stdout.txt")).unwrap_or_default();

    let xs = exchanges(&ndjson);
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for x in &xs {
        let k = x.status.map_or("none".to_string(), |s| s.to_string());
        *by_status.entry(k).or_default() += 1;
    }
    let faults: Vec<&Exchange> = xs
        .iter()
        .filter(|x| x.status.is_none_or(|s| s >= 500) && !expected_5xx(x))
        .collect();
    let operations: HashSet<&str> = xs.iter().map(|x| x.label.as_str()).collect();
    println!(
        "API FUZZ: {} requests over {} operations in {:.0} s (seed {seed}, schemathesis exit {}); \
         statuses {by_status:?}; server errors {} (+{} answers: proxy 502 nothing listening, 503 not ready)",
        xs.len(),
        operations.len(),
        elapsed.as_secs_f64(),
        status.code().unwrap_or(-1),
        faults.len(),
        xs.iter().filter(|x| expected_5xx(x)).count(),
    );

    // The daemon is alive and answers.
    assert!(d.is_running(), "the daemon exited during the fuzz");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let health = rt.block_on(reqwest::get(format!("{}/health", d.url)));
    assert!(
        health.as_ref().is_ok_and(|r| r.status() == 200),
        "health after the fuzz: {health:?}"
    );
    assert!(
        xs.len() > 100,
        "schemathesis sent only {} requests:\n{summary}",
        xs.len()
    );
    if !faults.is_empty() {
        // The faults themselves end the message: CI shows a failure's tail.
        eprintln!(
            "schemathesis said (last 40 lines):\n{}",
            summary
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        let shown: Vec<String> = faults
            .iter()
            .take(8)
            .map(|x| {
                format!(
                    "{} {} -> {:?} {}",
                    x.method,
                    x.uri,
                    x.status,
                    x.body.chars().take(200).collect::<String>()
                )
            })
            .collect();
        panic!(
            "{} requests got a server error or no answer:\n{}",
            faults.len(),
            shown.join("\n")
        );
    }
    d.stop();
}

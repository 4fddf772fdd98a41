//! `dryrun serve` end to end: a real server process, real HTTP on loopback, real runs.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::server::{SECRET, Server, get, hook, hook_signed, sign, wait_done};
use common::*;

/// A blueprints root with extra fixtures: `slow.yaml` (passes after ~1.5 s), `stuck.yaml`
/// (its service never becomes healthy), the demo (symlinked), and a symlink that escapes.
fn fixture_root() -> tempfile::TempDir {
    let d = state_dir();
    let r = d.path();
    std::os::unix::fs::symlink(root().join("blueprints/demo"), r.join("demo")).unwrap();
    std::os::unix::fs::symlink("/etc", r.join("escape")).unwrap();
    std::fs::create_dir_all(r.join("releases/slow")).unwrap();
    std::fs::write(
        r.join("releases/slow/dryrun-release.yaml"),
        "version: \"1.5\"\ninstall:\n  - name: wait\n    run: sleep 1.5\n",
    )
    .unwrap();
    std::fs::create_dir_all(r.join("releases/quick")).unwrap();
    std::fs::write(
        r.join("releases/quick/dryrun-release.yaml"),
        "version: \"1.0\"\ninstall:\n  - name: wait\n    run: sleep 0.2\n",
    )
    .unwrap();
    std::fs::write(
        r.join("slow.yaml"),
        "name: slow\nresources:\n  job:\n    type: service\n",
    )
    .unwrap();
    std::fs::create_dir_all(r.join("releases/stuck")).unwrap();
    std::fs::write(
        r.join("releases/stuck/dryrun-release.yaml"),
        "version: \"0.0\"\nstart: exec sleep 120\nhealth:\n  http: /healthz\n  timeout: 120s\n",
    )
    .unwrap();
    std::fs::write(
        r.join("stuck.yaml"),
        "name: stuck\nresources:\n  app:\n    type: service\n    ready_timeout: 120s\n",
    )
    .unwrap();
    d
}

/// A loopback receiver for callbacks and notifications: records (headers, body).
async fn receiver() -> (String, Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>>) {
    let got: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push((headers, body));
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhook_runs_the_demo_and_the_callback_gets_a_signed_summary() {
    require_demo_shop();
    let (cb, got) = receiver().await;
    let srv = Server::start(&format!(
        "[callbacks]\nallow = [\"{cb}/\"]\nbackoff = \"50ms\"\n[notify]\nurl = \"{cb}/slack\"\n"
    ));
    let body = format!(
        r#"{{"blueprint":"demo/shop.yaml","release":"demo/releases/v2","callback_url":"{cb}/done"}}"#
    );
    let (code, v) = hook(&srv.url, &body, "delivery-1").await;
    assert_eq!(code, 202, "{v}");
    let run_id = v["run_id"].as_str().unwrap().to_string();
    assert!(
        v["status_url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/v1/runs/{run_id}"))
    );
    let done = wait_done(&srv.url, &run_id, Duration::from_secs(60)).await;
    assert_eq!(done["run"]["status"], "passed", "{done}");
    assert_eq!(done["run"]["trigger"], "webhook");
    assert_eq!(done["report"]["release"]["version"], "2.0.0");
    assert_eq!(done["report"]["left_behind"].as_array().unwrap().len(), 0);
    // The callback arrives signed with the shared secret.
    let start = std::time::Instant::now();
    while got
        .lock()
        .unwrap()
        .iter()
        .all(|(_, b)| !b.contains(&run_id))
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no callback");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (headers, cb_body) = got
        .lock()
        .unwrap()
        .iter()
        .find(|(_, b)| b.contains(&run_id))
        .cloned()
        .unwrap();
    let sig = headers
        .get("x-hub-signature-256")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(dryrun::server::signature::verify(
        SECRET.as_bytes(),
        cb_body.as_bytes(),
        &sig
    ));
    let summary: serde_json::Value = serde_json::from_str(&cb_body).unwrap();
    assert_eq!(summary["status"], "passed");
    assert_eq!(summary["run_id"], run_id.as_str());
    assert!(!cb_body.contains(SECRET));
    // A passing run sends no failure notification.
    assert!(
        got.lock()
            .unwrap()
            .iter()
            .all(|(_, b)| !b.contains("\"text\""))
    );
    // JUnit, logs, dashboard, metrics.
    let junit = reqwest::get(format!("{}/v1/runs/{run_id}/junit.xml", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(junit.contains("<testsuite"));
    let logs = reqwest::get(format!("{}/v1/runs/{run_id}/logs", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(logs.contains("==> app.install.migrate.log <=="), "{logs}");
    let page = reqwest::get(format!("{}/runs/{run_id}", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("shop-db-2026-11-21T0300Z") && page.contains("class=\"status passed\""));
    let metrics = reqwest::get(format!("{}/metrics", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dryrun_runs_total{status=\"passed\",trigger=\"webhook\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("dryrun_stage_duration_seconds_bucket"));
    assert_nothing_left(srv.state(), &run_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_oversized_and_escaping_requests_create_no_run() {
    let fixtures = fixture_root();
    let mut srv = Server::start_with_root(fixtures.path(), "");
    let url = srv.url.clone();
    let client = reqwest::Client::new();
    let good = r#"{"blueprint":"slow.yaml","release":"releases/slow"}"#;
    // Forged signature, missing signature, stale timestamp.
    let r = client
        .post(format!("{url}/v1/hooks/dryrun"))
        .header("x-hub-signature-256", sign(b"something else"))
        .header("x-dryrun-delivery", "f1")
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(format!("{url}/v1/hooks/dryrun"))
        .header("x-dryrun-delivery", "f2")
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let old = (chrono::Utc::now().timestamp() - 301).to_string();
    let r = client
        .post(format!("{url}/v1/hooks/dryrun"))
        .header("x-hub-signature-256", sign(good.as_bytes()))
        .header("x-dryrun-delivery", "f3")
        .header("x-dryrun-timestamp", old)
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // 2 MiB body.
    let big = format!(
        r#"{{"blueprint":"slow.yaml","release":"releases/slow","params":{{"x":"{}"}}}}"#,
        "a".repeat(2 << 20)
    );
    let r = client
        .post(format!("{url}/v1/hooks/dryrun"))
        .header("x-hub-signature-256", sign(big.as_bytes()))
        .header("x-dryrun-delivery", "f4")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Paths escaping the root: absolute, `..`, through a symlink; a missing blueprint.
    for (bp, want) in [
        ("/etc/hostname", 400),
        ("../slow.yaml", 400),
        ("demo/../../x.yaml", 400),
        ("escape/hostname", 400),
        ("nope.yaml", 422),
    ] {
        let body = format!(r#"{{"blueprint":"{bp}","release":"releases/slow"}}"#);
        let (code, v) = hook(&url, &body, &format!("p-{bp}")).await;
        assert_eq!(code, want, "{bp}: {v}");
    }
    let (code, _) = hook(
        &url,
        r#"{"blueprint":"slow.yaml","release":"/etc"}"#,
        "p-rel",
    )
    .await;
    assert_eq!(code, 400);
    // A baseline is a release like any other: the same root, the same refusals.
    for (baseline, want) in [
        ("/etc", 400),
        ("../releases/slow", 400),
        ("escape/hostname", 400),
        ("releases/nope", 422),
    ] {
        let body = format!(
            r#"{{"blueprint":"slow.yaml","release":"releases/slow","baseline":"{baseline}"}}"#
        );
        let (code, v) = hook(&url, &body, &format!("b-{baseline}")).await;
        assert_eq!(code, want, "{baseline}: {v}");
        if want == 422 {
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("baseline `releases/nope` not found"),
                "{v}"
            );
        }
    }
    // Callback URL not allowed (SSRF guard), unknown body field.
    let (code, _) = hook(&url, r#"{"blueprint":"slow.yaml","release":"releases/slow","callback_url":"http://169.254.169.254/"}"#, "p-cb").await;
    assert_eq!(code, 422);
    let (code, _) = hook(
        &url,
        r#"{"blueprint":"slow.yaml","release":"releases/slow","relase":"x"}"#,
        "p-field",
    )
    .await;
    assert_eq!(code, 400);
    // The run's provider, its worker and its queue state are the server's to choose: a body
    // naming them is refused, and nothing is queued.
    for (field, value) in [
        ("provider", r#""aws""#),
        ("schedule", r#""nightly""#),
        ("fire_at", r#""2026-01-01T00:00:00Z""#),
        ("trigger", r#""schedule""#),
        ("delivery", r#""other""#),
    ] {
        let (code, v) = hook(
            &url,
            &format!(r#"{{"blueprint":"slow.yaml","release":"releases/slow","{field}":{value}}}"#),
            &format!("p-{field}"),
        )
        .await;
        assert_eq!(code, 400, "{field}: {v}");
    }
    assert_eq!(
        get(&format!("{url}/v1/runs")).await["runs"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "no refused request may create a run"
    );
    assert!(run_ids(srv.state()).is_empty());
    // A replayed delivery starts nothing and answers with the original run.
    let (code, first) = hook(&url, good, "once").await;
    assert_eq!(code, 202);
    let (code, again) = hook(&url, good, "once").await;
    assert_eq!(code, 200);
    assert_eq!(again["run_id"], first["run_id"]);
    assert_eq!(again["duplicate"], true);
    // Delivery ids survive a restart.
    wait_done(
        &url,
        first["run_id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    srv.stop();
    srv.restart();
    let (code, third) = hook(&url, good, "once").await;
    assert_eq!(code, 200);
    assert_eq!(third["run_id"], first["run_id"]);
    assert_eq!(
        get(&format!("{url}/v1/runs")).await["runs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_and_sigterm_tears_down_running_runs() {
    let fixtures = fixture_root();
    let mut srv = Server::start_with_root(fixtures.path(), "concurrency = 1\nqueue_limit = 1\n");
    let url = srv.url.clone();
    let stuck = r#"{"blueprint":"stuck.yaml","release":"releases/stuck"}"#;
    let (code, a) = hook(&url, stuck, "q1").await;
    assert_eq!(code, 202);
    let a = a["run_id"].as_str().unwrap().to_string();
    // Wait until the first run holds the environment (running), then queue one more.
    let start = std::time::Instant::now();
    while get(&format!("{url}/v1/runs/{a}")).await["run"]["status"] != "running" {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, b) = hook(&url, stuck, "q2").await;
    assert_eq!(code, 202);
    let b = b["run_id"].as_str().unwrap().to_string();
    let (code, full) = hook(&url, stuck, "q3").await;
    assert_eq!(code, 429, "{full}");
    // Let the first run's service start, then stop the server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, stderr) = srv.stop();
    assert_eq!(code, Some(0), "{stderr}");
    srv.restart();
    let ra = get(&format!("{url}/v1/runs/{a}")).await;
    assert_eq!(ra["run"]["status"], "error", "{ra}");
    assert!(
        ra["report"]["failure"]
            .as_str()
            .unwrap()
            .contains("server shutdown"),
        "{ra}"
    );
    assert_eq!(ra["report"]["left_behind"].as_array().unwrap().len(), 0);
    // The queued run was accepted: it stays queued across the restart and runs now.
    let rb = get(&format!("{url}/v1/runs/{b}")).await;
    let st = rb["run"]["status"].as_str().unwrap();
    assert!(st == "queued" || st == "running", "{rb}");
    assert_nothing_left(srv.state(), &a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_runs_survive_a_crash_of_the_server_and_run_after_the_restart() {
    let fixtures = fixture_root();
    let mut srv = Server::start_with_root(fixtures.path(), "concurrency = 1\n");
    let url = srv.url.clone();
    let mut ids = Vec::new();
    for i in 0..40 {
        // The last one names a baseline: it is still queued at the crash, and the request
        // kept with its row must bring the baseline back after the restart.
        let body = if i == 39 {
            r#"{"blueprint":"slow.yaml","release":"releases/quick","baseline":"releases/quick"}"#
        } else {
            r#"{"blueprint":"slow.yaml","release":"releases/quick"}"#
        };
        let (code, v) = hook(&url, body, &format!("crash-{i}")).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["run_id"].as_str().unwrap().to_string());
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 40, "run ids are distinct");
    tokio::time::sleep(Duration::from_millis(500)).await;
    srv.crash();
    srv.restart();
    // Every accepted run ends; only what was executing at the crash is interrupted.
    let mut by_status: std::collections::BTreeMap<String, usize> = Default::default();
    for id in &ids {
        let done = wait_done(&url, id, Duration::from_secs(120)).await;
        *by_status
            .entry(done["run"]["status"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let interrupted = by_status.get("interrupted").copied().unwrap_or(0);
    assert!(interrupted <= 1, "{by_status:?}");
    assert_eq!(
        by_status.get("passed").copied().unwrap_or(0) + interrupted,
        40,
        "{by_status:?}"
    );
    for id in &ids {
        assert_nothing_left(srv.state(), id);
    }
    let last = get(&format!("{url}/v1/runs/{}", ids[39])).await;
    let b = &last["report"]["baseline"];
    assert_eq!(b["run_id"], format!("{}-baseline", ids[39]), "{last:#}");
    assert_eq!(b["status"], "passed", "{b:#}");
    assert_nothing_left(srv.state(), &format!("{}-baseline", ids[39]));
    // A delivery accepted before the crash is still recognised after it.
    let (code, again) = hook(
        &url,
        r#"{"blueprint":"slow.yaml","release":"releases/quick"}"#,
        "crash-7",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(again["run_id"], ids[7].as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_fires_and_history_survives_a_restart() {
    require_demo_shop();
    let mut srv = Server::start(
        "[[schedule]]\nname = \"nightly-shop\"\ncron = \"*/2 * * * * *\"\ntimezone = \"Europe/Berlin\"\nblueprint = \"demo/shop.yaml\"\nrelease = \"demo/releases/v2\"\nbaseline = \"demo/releases/v2\"\n",
    );
    let url = srv.url.clone();
    let start = std::time::Instant::now();
    let run_id = loop {
        let runs = get(&format!("{url}/v1/runs?status=passed")).await;
        if let Some(r) = runs["runs"].as_array().unwrap().first() {
            break r["run_id"].as_str().unwrap().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the schedule never produced a passing run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let run = get(&format!("{url}/v1/runs/{run_id}")).await;
    assert_eq!(run["run"]["trigger"], "schedule");
    assert_eq!(run["run"]["schedule"], "nightly-shop");
    // The entry's baseline was rehearsed first, on its own copy of the same backup.
    let b = &run["report"]["baseline"];
    assert_eq!(b["run_id"], format!("{run_id}-baseline"), "{b:#}");
    assert_eq!(b["status"], "passed", "{b:#}");
    assert!(!b["checks"].as_array().unwrap().is_empty(), "{b:#}");
    assert_nothing_left(srv.state(), &format!("{run_id}-baseline"));
    srv.stop();
    // Restart without the schedule: history is still there, with the trend.
    std::fs::write(
        &srv.config,
        std::fs::read_to_string(&srv.config)
            .unwrap()
            .split("[[schedule]]")
            .next()
            .unwrap(),
    )
    .unwrap();
    srv.restart();
    let run = get(&format!("{url}/v1/runs/{run_id}")).await;
    assert_eq!(run["run"]["status"], "passed");
    let trend = get(&format!("{url}/v1/trend?blueprint=shop")).await;
    let points = trend["points"].as_array().unwrap();
    assert!(!points.is_empty());
    assert!(
        points[0]["restore_ms"].is_i64() && points[0]["backup_age_s"].is_i64(),
        "{trend}"
    );
    let index = reqwest::get(format!("{url}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(index.contains("Rehearsal trend") && index.contains(&run_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_progress_when_the_server_dies_is_marked_interrupted_and_cleaned_at_restart() {
    let fixtures = fixture_root();
    let mut srv = Server::start_with_root(fixtures.path(), "");
    let url = srv.url.clone();
    let (code, v) = hook(
        &url,
        r#"{"blueprint":"stuck.yaml","release":"releases/stuck"}"#,
        "crash-1",
    )
    .await;
    assert_eq!(code, 202);
    let run_id = v["run_id"].as_str().unwrap().to_string();
    // Wait until the service process runs, then kill the server.
    let start = std::time::Instant::now();
    while dryrun::process::find_tagged(&run_id, None).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "service never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.crash();
    assert!(
        !dryrun::process::find_tagged(&run_id, None).is_empty(),
        "the orphan should outlive the crash"
    );
    srv.restart();
    let run = get(&format!("{url}/v1/runs/{run_id}")).await;
    assert_eq!(run["run"]["status"], "interrupted", "{run}");
    assert!(
        run["run"]["failure"]
            .as_str()
            .unwrap()
            .contains("cleaned up"),
        "{run}"
    );
    assert_nothing_left(srv.state(), &run_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_webhook_runs_on_one_environment_never_overlap() {
    let fixtures = fixture_root();
    let srv = Server::start_with_root(fixtures.path(), "");
    let url = srv.url.clone();
    // A CLI run of `slow` on the same state directory holds the environment for ~1.5 s.
    let mut cli = std::process::Command::new(bin())
        .env("DRYRUN_STATE_DIR", srv.state())
        .args([
            "run",
            fixtures.path().join("slow.yaml").to_str().unwrap(),
            "--release",
            fixtures.path().join("releases/slow").to_str().unwrap(),
            "-q",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while dryrun::lease::holder(&dryrun::state::StateDir::new(srv.state()), "local:slow").is_none()
    {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, v) = hook(
        &url,
        r#"{"blueprint":"slow.yaml","release":"releases/quick"}"#,
        "overlap-1",
    )
    .await;
    assert_eq!(code, 202);
    let web = v["run_id"].as_str().unwrap().to_string();
    assert!(cli.wait().unwrap().success());
    let done = wait_done(&url, &web, Duration::from_secs(30)).await;
    assert_eq!(done["run"]["status"], "passed");
    let runs = get(&format!("{url}/v1/runs")).await;
    let cli_run = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["trigger"] == "cli")
        .expect("the CLI run is in the shared history")
        .clone();
    let cli_end: chrono::DateTime<chrono::Utc> =
        cli_run["finished_at"].as_str().unwrap().parse().unwrap();
    let web_start: chrono::DateTime<chrono::Utc> =
        done["run"]["started_at"].as_str().unwrap().parse().unwrap();
    assert!(
        web_start >= cli_end,
        "the webhook run started at {web_start} before the CLI run ended at {cli_end}"
    );
    let _ = Path::new(".");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_run_and_old_backup_send_a_slack_compatible_notification() {
    require_demo_shop();
    let (recv, got) = receiver().await;
    let srv = Server::start(&format!(
        "[notify]\nurl = \"{recv}/slack\"\nmax_backup_age = \"1h\"\n"
    ));
    let (code, v) = hook(
        &srv.url,
        r#"{"blueprint":"demo/shop.yaml","release":"demo/releases/v3"}"#,
        "notify-1",
    )
    .await;
    assert_eq!(code, 202);
    let run_id = v["run_id"].as_str().unwrap().to_string();
    let done = wait_done(&srv.url, &run_id, Duration::from_secs(60)).await;
    assert_eq!(done["run"]["status"], "failed");
    assert!(
        done["run"]["failure"]
            .as_str()
            .unwrap()
            .contains("UNIQUE constraint failed")
    );
    let start = std::time::Instant::now();
    let text = loop {
        if let Some((_, body)) = got
            .lock()
            .unwrap()
            .iter()
            .find(|(h, _)| {
                h.get("content-type")
                    .is_some_and(|c| c.to_str().unwrap().contains("json"))
            })
            .cloned()
        {
            break serde_json::from_str::<serde_json::Value>(&body).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no notification");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.contains("FAILED") && text.contains(&run_id), "{text}");
    assert!(
        text.contains("UNIQUE constraint failed"),
        "the notification quotes the failure: {text}"
    );
    assert!(
        text.contains("the latest backup of shop-db (shop-db-2026-11-21T0300Z) is"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_webhook_and_schedule_racing_for_one_environment_run_one_at_a_time() {
    let fixtures = fixture_root();
    let srv = Server::start_with_root(
        fixtures.path(),
        "[[schedule]]\nname = \"race\"\ncron = \"*/3 * * * * *\"\nblueprint = \"slow.yaml\"\nrelease = \"releases/slow\"\n",
    );
    let url = srv.url.clone();
    // Three CLI runs, three webhooks and the every-second schedule, all at once.
    let mut clis = Vec::new();
    for _ in 0..3 {
        clis.push(
            std::process::Command::new(bin())
                .env("DRYRUN_STATE_DIR", srv.state())
                .args([
                    "run",
                    fixtures.path().join("slow.yaml").to_str().unwrap(),
                    "--release",
                    fixtures.path().join("releases/slow").to_str().unwrap(),
                    "-q",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let mut hooks = Vec::new();
    for i in 0..3 {
        let (code, v) = hook(
            &url,
            r#"{"blueprint":"slow.yaml","release":"releases/quick"}"#,
            &format!("race-{i}"),
        )
        .await;
        assert_eq!(code, 202, "{v}");
        hooks.push(v["run_id"].as_str().unwrap().to_string());
    }
    for mut c in clis {
        assert!(c.wait().unwrap().success());
    }
    for id in &hooks {
        wait_done(&url, id, Duration::from_secs(60)).await;
    }
    let start = std::time::Instant::now();
    while get(&format!(
        "{url}/v1/runs?blueprint=slow&status=passed&limit=1000"
    ))
    .await["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["trigger"] != "schedule")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no scheduled run finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every run of the environment, from the shared history: no two overlap.
    let runs = get(&format!("{url}/v1/runs?blueprint=slow&limit=1000")).await;
    let mut spans: Vec<(
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        String,
    )> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["finished_at"].is_string()
                && r["started_at"].is_string()
                && r["status"] != "cancelled"
        })
        .map(|r| {
            (
                r["started_at"].as_str().unwrap().parse().unwrap(),
                r["finished_at"].as_str().unwrap().parse().unwrap(),
                format!(
                    "{} {}",
                    r["trigger"].as_str().unwrap(),
                    r["run_id"].as_str().unwrap()
                ),
            )
        })
        .collect();
    spans.sort();
    let triggers: std::collections::BTreeSet<String> = spans
        .iter()
        .map(|s| s.2.split(' ').next().unwrap().to_string())
        .collect();
    assert!(
        triggers.contains("cli") && triggers.contains("webhook") && triggers.contains("schedule"),
        "{triggers:?}"
    );
    assert!(spans.len() >= 7, "{spans:?}");
    for w in spans.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "{} started before {} ended",
            w[1].2,
            w[0].2
        );
    }
    // The history agrees with the journals: every finished run has a journal and vice versa.
    let journals = run_ids(srv.state());
    for s in &spans {
        let id = s.2.split(' ').nth(1).unwrap();
        assert!(journals.iter().any(|j| j == id), "{id} has no journal");
    }
}

/// The webhook secret and a blueprint secret (the demo's API token) never leave the server: not
/// in its output, the API, the dashboard's pages, JUnit, logs, metrics, callbacks,
/// notifications, the history database or any file of its state directory, in any encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_secret_and_blueprint_secret_never_leave_the_server_in_any_form() {
    require_demo_shop();
    let secret = "wh+canary/Q7x=2Kp?z&9";
    let token = "tok+canary/3J8w=pL?e&7";
    let mut forms = canary_forms(secret);
    forms.extend(canary_forms(token));
    let (cb, got) = receiver().await;
    let mut srv = Server::start_with_env(
        &root().join("blueprints"),
        &format!(
            "[callbacks]\nallow = [\"{cb}/\"]\nbackoff = \"50ms\"\n[notify]\nurl = \"{cb}/slack\"\n"
        ),
        secret,
        &[("DEMO_API_TOKEN", token)],
    );
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for (n, release) in ["demo/releases/v2", "demo/releases/v3"].iter().enumerate() {
        let body = format!(
            r#"{{"blueprint":"demo/shop.yaml","release":"{release}","callback_url":"{cb}/done?n={n}"}}"#
        );
        let (code, v) = hook_signed(&srv.url, secret, &body, &format!("canary-{n}")).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["run_id"].as_str().unwrap().to_string());
    }
    // A request signed with a wrong secret is refused, and its error does not help either.
    let bad = client
        .post(format!("{}/v1/hooks/dryrun", srv.url))
        .header("x-hub-signature-256", sign(b"{}"))
        .header("x-dryrun-delivery", "canary-forged")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_no_canary("the 401 answer", &bad.bytes().await.unwrap(), &forms);
    let passed = wait_done(&srv.url, &ids[0], Duration::from_secs(60)).await;
    let failed = wait_done(&srv.url, &ids[1], Duration::from_secs(60)).await;
    assert_eq!(passed["run"]["status"], "passed", "{passed}");
    assert_eq!(failed["run"]["status"], "failed", "{failed}");
    // Two callbacks and one failure notification.
    let start = std::time::Instant::now();
    while got.lock().unwrap().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "callbacks missing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut pages = vec!["/".to_string(), "/v1/runs".into(), "/metrics".into()];
    for id in &ids {
        for p in ["/runs/", "/v1/runs/"] {
            pages.push(format!("{p}{id}"));
        }
        for p in ["junit.xml", "logs"] {
            pages.push(format!("/v1/runs/{id}/{p}"));
        }
    }
    for p in &pages {
        let r = client.get(format!("{}{p}", srv.url)).send().await.unwrap();
        assert!(r.status().is_success(), "{p}: {}", r.status());
        let headers = format!("{:?}", r.headers());
        assert_no_canary(&format!("headers of {p}"), headers.as_bytes(), &forms);
        assert_no_canary(p, &r.bytes().await.unwrap(), &forms);
    }
    for (headers, body) in got.lock().unwrap().iter() {
        assert_no_canary(
            "a callback's headers",
            format!("{headers:?}").as_bytes(),
            &forms,
        );
        assert_no_canary("a callback's body", body.as_bytes(), &forms);
    }
    let (_, stderr) = srv.stop();
    assert_no_canary("the server's stderr", stderr.as_bytes(), &forms);
    let files = assert_no_canary_in_dir(srv.state(), &forms);
    assert!(srv.state().join("history.sqlite").is_file());
    eprintln!(
        "searched {} pages, 3 callbacks, the server's output and {files} files for {} forms of 2 secrets: 0 hits",
        pages.len(),
        forms.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_queued_longer_than_queue_max_age_expires_at_restart_and_its_callback_says_so() {
    let fixtures = fixture_root();
    let (cb, got) = receiver().await;
    let mut srv = Server::start_with_root(
        fixtures.path(),
        &format!(
            "concurrency = 1\nqueue_max_age = \"1s\"\n[callbacks]\nallow = [\"{cb}/\"]\nbackoff = \"50ms\"\n"
        ),
    );
    let url = srv.url.clone();
    let stuck = r#"{"blueprint":"stuck.yaml","release":"releases/stuck"}"#;
    let (code, a) = hook(&url, stuck, "age-a").await;
    assert_eq!(code, 202);
    let a = a["run_id"].as_str().unwrap().to_string();
    let start = std::time::Instant::now();
    while get(&format!("{url}/v1/runs/{a}")).await["run"]["status"] != "running" {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = format!(
        r#"{{"blueprint":"stuck.yaml","release":"releases/stuck","callback_url":"{cb}/expired"}}"#
    );
    let (code, b) = hook(&url, &body, "age-b").await;
    assert_eq!(code, 202);
    let b = b["run_id"].as_str().unwrap().to_string();
    srv.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    srv.restart();
    // A worker claims the run (`running` for the moment it takes to look at its age) and then
    // ends it: wait for the end, not the claim.
    let start = std::time::Instant::now();
    let rb = loop {
        let rb = get(&format!("{url}/v1/runs/{b}")).await;
        if !matches!(rb["run"]["status"].as_str(), Some("queued" | "running")) {
            break rb;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{rb}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(rb["run"]["status"], "expired", "{rb}");
    assert!(
        rb["run"]["failure"]
            .as_str()
            .unwrap()
            .contains("longer than queue_max_age (1s)"),
        "{rb}"
    );
    let start = std::time::Instant::now();
    while !got
        .lock()
        .unwrap()
        .iter()
        .any(|(_, body)| body.contains(&b))
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no callback");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = got
        .lock()
        .unwrap()
        .iter()
        .find(|(_, body)| body.contains(&b))
        .cloned()
        .unwrap()
        .1;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["event"], "run.expired");
    assert_eq!(v["status"], "expired");
    assert!(
        !srv.state().join("runs").join(&b).exists(),
        "nothing was created"
    );
}

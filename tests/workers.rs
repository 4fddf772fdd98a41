//! Several `dryrun serve` workers on one PostgreSQL, each with its own state directory (as on
//! separate machines): every accepted run runs exactly once, one at a time per environment, a
//! delivery sent to two workers makes one run, a schedule every worker knows fires once, and a
//! worker killed with SIGKILL mid-run loses nothing — a survivor marks its runs interrupted
//! within the lease timeout and the others take its share of the queue; `dryrun cleanup` on the
//! dead worker's machine removes what it left.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::pg::ControlDb;
use common::server::{SECRET, Server, get};
use common::*;

/// Environments the webhooks spread over.
const ENVIRONMENTS: usize = 5;
/// Webhook deliveries (distinct ids).
const DELIVERIES: usize = 200;
/// The schedule fires every this many seconds.
const TICK_SECS: i64 = 2;

/// A blueprints root: environments `w-0`…`w-4` and `tick`, one release whose install step
/// writes `start`/`end` lines with the run id and a nanosecond clock to the environment's log.
fn blueprints(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("blueprints");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // `slow` takes 0.3 s; `sleepy` 9 s, longer than a short lease timeout plus a heartbeat.
    for (name, secs) in [("slow", "0.3"), ("sleepy", "9")] {
        std::fs::create_dir_all(root.join("releases").join(name)).unwrap();
        std::fs::write(
            root.join("releases").join(name).join("dryrun-release.yaml"),
            format!(
                "version: \"1.0.0\"\ninstall:\n  - name: record\n    run: 'echo start \"$DRYRUN_RUN_ID\" \"$(date +%s%N)\" >> \"$RAN_LOG\"; sleep {secs}; echo end \"$DRYRUN_RUN_ID\" \"$(date +%s%N)\" >> \"$RAN_LOG\"'\n"
            ),
        )
        .unwrap();
    }
    let envs = (0..ENVIRONMENTS)
        .map(|k| format!("w-{k}"))
        .chain(["tick".to_string()]);
    for name in envs {
        std::fs::write(
            root.join(format!("{name}.yaml")),
            format!(
                "name: {name}\nresources:\n  job:\n    type: service\n    env:\n      RAN_LOG: \"{}\"\n",
                logs.join(format!("{name}.log")).display()
            ),
        )
        .unwrap();
    }
    (root, logs)
}

/// One run as the install step saw it.
#[derive(Debug, Default, Clone)]
struct Ran {
    starts: Vec<i128>,
    ends: Vec<i128>,
}

fn read_log(path: &Path) -> BTreeMap<String, Ran> {
    let mut out: BTreeMap<String, Ran> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 3, "odd log line {line:?}");
        let t: i128 = f[2].parse().unwrap();
        let e = out.entry(f[1].to_string()).or_default();
        match f[0] {
            "start" => e.starts.push(t),
            "end" => e.ends.push(t),
            _ => panic!("odd log line {line:?}"),
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Row {
    run_id: String,
    environment: String,
    status: String,
    worker: Option<String>,
    delivery: Option<String>,
    schedule: Option<String>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    failure: Option<String>,
}

async fn rows(db: &tokio_postgres::Client) -> Vec<Row> {
    db.query(
        "SELECT run_id, environment, status, worker, delivery, schedule, started_at, finished_at, failure FROM dryrun_runs ORDER BY queued_at",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| Row {
        run_id: r.get(0),
        environment: r.get(1),
        status: r.get(2),
        worker: r.get(3),
        delivery: r.get(4),
        schedule: r.get(5),
        started_at: r.get(6),
        finished_at: r.get(7),
        failure: r.get(8),
    })
    .collect()
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// POSTs a signed delivery (`common::server::hook`); status and `run_id`.
async fn deliver(url: &str, body: &str, delivery: &str) -> (u16, Option<String>) {
    let (status, v) = common::server::hook(url, body, delivery).await;
    (status, v["run_id"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn three_workers_on_one_postgres_lose_nothing_when_one_is_killed() {
    if !have_postgres() {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    }
    let db = ControlDb::start();
    let dir = tempfile::tempdir().unwrap();
    let (root, logs) = blueprints(dir.path());
    let url = db.url();
    let config = format!(
        "concurrency = 2\nqueue_limit = 1000\n[[schedule]]\nname = \"tick\"\ncron = \"*/{TICK_SECS} * * * * *\"\nblueprint = \"tick.yaml\"\nrelease = \"releases/slow\"\n"
    );
    let env = [("DRYRUN_DATABASE_URL", url.as_str())];
    let mut workers: Vec<Server> = (0..3)
        .map(|_| Server::start_with_env(&root, &config, SECRET, &env))
        .collect();
    let client = db.client().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let urls: Vec<String> = workers.iter().map(|w| w.url.clone()).collect();

    // 200 deliveries round-robin over the workers; every 10th also sent, at the same moment,
    // to the next worker.
    let mut tasks = Vec::new();
    for i in 0..DELIVERIES {
        let body = format!(
            r#"{{"blueprint":"w-{}.yaml","release":"releases/slow"}}"#,
            i % ENVIRONMENTS
        );
        let delivery = format!("d-{i}");
        let mut to = vec![urls[i % 3].clone()];
        if i % 10 == 0 {
            to.push(urls[(i + 1) % 3].clone());
        }
        tasks.push(tokio::spawn(async move {
            let answers =
                futures_util::future::join_all(to.iter().map(|u| deliver(u, &body, &delivery)))
                    .await;
            (delivery, answers)
        }));
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut accepted: HashMap<String, String> = HashMap::new();
    let mut duplicates = 0;
    for t in tasks {
        let (delivery, answers) = t.await.unwrap();
        let new: Vec<&(u16, Option<String>)> = answers.iter().filter(|a| a.0 == 202).collect();
        assert_eq!(
            new.len(),
            1,
            "delivery {delivery}: exactly one worker accepts it: {answers:?}"
        );
        let run = new[0].1.clone().unwrap();
        for a in answers.iter().filter(|a| a.0 != 202) {
            assert_eq!(
                (a.0, a.1.as_deref()),
                (200, Some(run.as_str())),
                "delivery {delivery} sent twice: the second answer names the first run"
            );
            duplicates += 1;
        }
        accepted.insert(delivery, run);
    }
    assert_eq!(accepted.len(), DELIVERIES);
    assert_eq!(duplicates, DELIVERIES / 10);

    // Kill worker 1 while it runs something, after it has finished a few.
    let victim_pid = workers[1].pid().unwrap();
    let victim = format!("%/{victim_pid}/%");
    let of_victim = |status: &str| {
        format!(
            "SELECT count(*) FROM dryrun_runs WHERE status = '{status}' AND worker LIKE '{victim}'"
        )
    };
    let start = Instant::now();
    while count(&client, &of_victim("running")).await == 0
        || count(&client, &of_victim("passed")).await < 5
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "worker 1 never ran anything"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers[1].crash();
    let killed_at = Instant::now();
    let killed_runs: Vec<String> = client
        .query(&of_victim("running").replace("count(*)", "run_id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let killed_running = killed_runs.len();
    while count(&client, &of_victim("running")).await > 0 {
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "the killed worker's runs still say running after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let marked_after = killed_at.elapsed();
    eprintln!(
        "kill -9 of a worker with {killed_running} running run(s): recovered by a survivor after {:.1} s (default lease timeout)",
        marked_after.as_secs_f64()
    );

    // Everything else drains on the two survivors.
    let start = Instant::now();
    loop {
        let busy = count(
            &client,
            "SELECT count(*) FROM dryrun_runs WHERE status IN ('queued', 'running')",
        )
        .await;
        if busy == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "{busy} runs still queued or running after 240 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the survivors drained the queue {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    // Let the schedule fire a few more times on the survivors, then stop them gracefully.
    tokio::time::sleep(Duration::from_secs(u64::try_from(TICK_SECS * 2).unwrap())).await;
    for i in [0, 2] {
        let (code, err) = workers[i].stop();
        assert_eq!(code, Some(0), "worker {i} stopped gracefully:\n{err}");
        assert!(
            !err.contains(ControlDb::password()),
            "worker {i} printed the database password"
        );
    }

    let all = rows(&client).await;
    let webhook: Vec<&Row> = all.iter().filter(|r| r.delivery.is_some()).collect();
    let scheduled: Vec<&Row> = all.iter().filter(|r| r.schedule.is_some()).collect();
    assert_eq!(
        all.len(),
        webhook.len() + scheduled.len(),
        "only webhook and schedule runs"
    );

    // 0 lost, 0 extra: one run per accepted delivery, and it is the run the webhook named.
    assert_eq!(webhook.len(), DELIVERIES, "one run per delivery");
    for r in &webhook {
        assert_eq!(
            accepted.get(r.delivery.as_deref().unwrap()),
            Some(&r.run_id),
            "run {} is the one its delivery was answered with",
            r.run_id
        );
    }
    // Only runs the killed worker was executing ended interrupted; everything else passed —
    // a run it had claimed but not begun was queued again and run by another worker.
    let mut interrupted = Vec::new();
    for r in &all {
        match r.status.as_str() {
            "passed" => {}
            "interrupted" => {
                assert!(
                    r.worker
                        .as_deref()
                        .is_some_and(|w| w.contains(&format!("/{victim_pid}/"))),
                    "only the killed worker's runs are interrupted: {r:?}"
                );
                assert!(killed_runs.contains(&r.run_id), "{r:?}");
                let note = r.failure.as_deref().unwrap_or_default();
                assert!(
                    (note.contains("stopped during the run") && note.contains("dryrun cleanup"))
                        || note.contains("its journal is closed: nothing of the run remains"),
                    "the history says where its local resources are: {note}"
                );
                interrupted.push(r.clone());
            }
            other => panic!("run {} ended {other}: {:?}", r.run_id, r.failure),
        }
    }
    let requeued: Vec<&Row> = all
        .iter()
        .filter(|r| killed_runs.contains(&r.run_id) && r.status == "passed")
        .collect();
    for r in &requeued {
        assert!(
            !r.worker
                .as_deref()
                .unwrap_or_default()
                .contains(&format!("/{victim_pid}/")),
            "a run claimed by the killed worker passed: another worker ran it: {r:?}"
        );
    }
    assert_eq!(
        interrupted.len() + requeued.len(),
        killed_running,
        "every run the killed worker held ended interrupted or ran again elsewhere"
    );
    eprintln!(
        "of the killed worker's {killed_running} running run(s): {} interrupted, {} not yet begun and queued again",
        interrupted.len(),
        requeued.len()
    );
    let by_worker: BTreeMap<String, usize> = all.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.worker.clone().unwrap_or_default()).or_default() += 1;
        m
    });
    eprintln!(
        "{} runs ({} webhook, {} scheduled) by worker: {:?}; interrupted: {}",
        all.len(),
        webhook.len(),
        scheduled.len(),
        by_worker.values().collect::<Vec<_>>(),
        interrupted.len()
    );
    assert_eq!(by_worker.len(), 3, "every worker ran some: {by_worker:?}");
    // What the killed worker had accepted but not started, the others ran.
    let taken_over = webhook
        .iter()
        .filter(|r| {
            let i: usize = r.delivery.as_deref().unwrap()[2..].parse().unwrap();
            i % 3 == 1
                && !r
                    .worker
                    .as_deref()
                    .unwrap_or_default()
                    .contains(&format!("/{victim_pid}/"))
        })
        .count();
    eprintln!("runs accepted by the killed worker and run by the others: {taken_over}");
    assert!(taken_over > 0);

    // 0 run twice, no overlap: each run's install step ran once, and within an environment
    // one ran at a time — by the steps' own clocks and by the history's times.
    for name in (0..ENVIRONMENTS)
        .map(|k| format!("w-{k}"))
        .chain(["tick".to_string()])
    {
        let log = read_log(&logs.join(format!("{name}.log")));
        let mut spans: Vec<(i128, i128, String)> = Vec::new();
        for (id, ran) in &log {
            assert!(
                ran.starts.len() == 1 && ran.ends.len() <= 1,
                "run {id} ran {} times",
                ran.starts.len()
            );
            let end = ran.ends.first().copied().unwrap_or(i128::MAX);
            spans.push((ran.starts[0], end, id.clone()));
        }
        for r in all
            .iter()
            .filter(|r| r.environment == format!("local:{name}"))
        {
            if r.status == "passed" {
                assert!(
                    log.get(&r.run_id).is_some_and(|x| x.ends.len() == 1),
                    "passed run {} installed once, to the end",
                    r.run_id
                );
            }
        }
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "{name}: runs {} and {} overlapped",
                w[0].2,
                w[1].2
            );
        }
        let mut hist: Vec<(DateTime<Utc>, DateTime<Utc>, &str)> = all
            .iter()
            .filter(|r| r.environment == format!("local:{name}"))
            .map(|r| {
                (
                    r.started_at.unwrap(),
                    r.finished_at.unwrap(),
                    r.run_id.as_str(),
                )
            })
            .collect();
        hist.sort();
        for w in hist.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "{name}: history says runs {} and {} overlapped",
                w[0].2,
                w[1].2
            );
        }
    }

    // The schedule fired once per instant, every instant, across three then two workers.
    let fires: Vec<(DateTime<Utc>, String)> = client
        .query(
            "SELECT fire_at, run_id FROM dryrun_fires WHERE schedule = 'tick' ORDER BY fire_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        fires.len(),
        scheduled.len(),
        "one run per firing: {fires:?}"
    );
    assert!(fires.len() >= 5, "the schedule fired {} times", fires.len());
    for w in fires.windows(2) {
        assert_eq!(
            (w[1].0 - w[0].0).num_seconds(),
            TICK_SECS,
            "a firing was missed between {} and {}",
            w[0].0,
            w[1].0
        );
    }
    let fired: HashSet<&str> = fires.iter().map(|f| f.1.as_str()).collect();
    assert!(scheduled.iter().all(|r| fired.contains(r.run_id.as_str())));

    // On the dead worker's machine, `dryrun cleanup` removes what it left, and says so in the
    // shared history.
    let dead_state = workers[1].state().to_path_buf();
    for r in &interrupted {
        assert!(
            dead_state.join("copies").join(&r.run_id).exists()
                || dead_state.join("runs").join(&r.run_id).exists(),
            "the killed run {} left its state on its machine",
            r.run_id
        );
    }
    let out = run(dryrun(&dead_state)
        .env("DRYRUN_DATABASE_URL", &url)
        .args(["cleanup", "--all", "--yes"]));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "cleanup on the dead worker:\n{text}"
    );
    assert!(!text.contains(ControlDb::password()));
    for r in &interrupted {
        assert_nothing_left(&dead_state, &r.run_id);
        let note: Option<String> = client
            .query_one(
                "SELECT failure FROM dryrun_runs WHERE run_id = $1",
                &[&r.run_id],
            )
            .await
            .unwrap()
            .get(0);
        // Either the cleanup removed what the run had left, or the run had ended (its
        // journal closed) just before the kill and the survivor said nothing remains.
        assert!(
            note.as_deref()
                .is_some_and(|n| n.contains("later removed by `dryrun cleanup`")
                    || n.contains("its journal is closed: nothing of the run remains")),
            "the history records the cleanup: {note:?}"
        );
    }
    for w in &workers {
        for id in run_ids(w.state()) {
            assert_nothing_left(w.state(), &id);
        }
    }

    // Every worker — the restarted one too — lists all runs and shows them on its dashboard.
    for w in &mut workers {
        w.restart();
    }
    let total = all.len();
    let other_worker_run = &webhook
        .iter()
        .find(|r| {
            r.worker
                .as_deref()
                .is_some_and(|w| !w.contains(&format!("/{}/", workers[0].pid().unwrap())))
        })
        .unwrap()
        .run_id;
    for (i, w) in workers.iter().enumerate() {
        let v = get(&format!("{}/v1/runs?limit=1000", w.url)).await;
        let listed: HashSet<&str> = v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["run_id"].as_str())
            .collect();
        assert!(
            listed.len() >= total && all.iter().all(|r| listed.contains(r.run_id.as_str())),
            "worker {i} lists {} of {total} runs",
            listed.len()
        );
        let page = http
            .get(format!("{}/runs/{other_worker_run}", w.url))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status().as_u16(), 200);
        assert!(
            page.text()
                .await
                .unwrap()
                .contains(other_worker_run.as_str())
        );
    }
    // A delivery repeated now, to any worker, still names its first run.
    let (code, run) = deliver(
        &workers[1].url,
        r#"{"blueprint":"w-0.yaml","release":"releases/slow"}"#,
        "d-0",
    )
    .await;
    assert_eq!((code, run.as_ref()), (200, accepted.get("d-0")));
    let workers_seen = count(
        &client,
        "SELECT count(*) FROM dryrun_workers WHERE role = 'serve'",
    )
    .await;
    assert_eq!(workers_seen, 6, "three workers, each started twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_run_on_the_shared_database_keeps_its_lease_past_the_lease_timeout() {
    if !have_postgres() {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    }
    let db = ControlDb::start();
    let dir = tempfile::tempdir().unwrap();
    let (root, logs) = blueprints(dir.path());
    let url = db.url();
    let env = [("DRYRUN_DATABASE_URL", url.as_str())];
    // A worker quick to take others for dead: 5 s without a heartbeat.
    let worker = Server::start_with_env(&root, "lease_timeout = \"5s\"\n", SECRET, &env);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // Answered once the worker has opened the control database.
    http.get(format!("{}/healthz", worker.url))
        .send()
        .await
        .unwrap();
    let client = db.client().await;
    // A CLI run on another state directory (another machine), 9 s long.
    let cli_state = state_dir();
    let _reaper = Reaper(cli_state.path().to_path_buf());
    let cli = std::process::Command::new(bin())
        .env("DRYRUN_STATE_DIR", cli_state.path())
        .env("DRYRUN_DATABASE_URL", &url)
        .args(["run", "-q"])
        .arg(root.join("w-0.yaml"))
        .arg("--release")
        .arg(root.join("releases/sleepy"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let cli_run: String = loop {
        let r = client
            .query_opt(
                "SELECT run_id FROM dryrun_runs WHERE trigger = 'cli' AND status = 'running'",
                &[],
            )
            .await
            .unwrap();
        if let Some(r) = r {
            break r.get(0);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the CLI run never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A webhook run of the same environment waits for the CLI run, however long it takes.
    let (code, hooked) = deliver(
        &worker.url,
        r#"{"blueprint":"w-0.yaml","release":"releases/slow"}"#,
        "after-cli",
    )
    .await;
    assert_eq!(code, 202);
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = client
        .query_one(
            "SELECT status, failure FROM dryrun_runs WHERE run_id = $1",
            &[&cli_run],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, Option<String>>(1)),
        ("passed".to_string(), None),
        "the worker left the CLI run alone"
    );
    let hooked = hooked.unwrap();
    let done = common::server::wait_done(&worker.url, &hooked, Duration::from_secs(60)).await;
    assert_eq!(done["run"]["status"], "passed");
    let log = read_log(&logs.join("w-0.log"));
    let (cli_ran, hook_ran) = (&log[&cli_run], &log[&hooked]);
    assert!(
        cli_ran.ends[0] <= hook_ran.starts[0],
        "the webhook run started before the CLI run ended: {log:?}"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM dryrun_workers WHERE role = 'cli' AND stopped_by = 'itself'"
        )
        .await,
        1,
        "the CLI process says it stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_was_taken_for_dead_stops_its_runs_and_exits_with_failure() {
    use std::io::Read as _;
    if !have_postgres() {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    }
    let db = ControlDb::start();
    let dir = tempfile::tempdir().unwrap();
    let (root, _logs) = blueprints(dir.path());
    let url = db.url();
    let env = [("DRYRUN_DATABASE_URL", url.as_str())];
    let config = "lease_timeout = \"5s\"\n";
    let mut a = Server::start_with_env(&root, config, SECRET, &env);
    let (code, run) = deliver(
        &a.url,
        r#"{"blueprint":"w-1.yaml","release":"releases/sleepy"}"#,
        "frozen-1",
    )
    .await;
    assert_eq!(code, 202);
    let run = run.unwrap();
    let client = db.client().await;
    let start = Instant::now();
    while run_status(&client, &run).await != "running" {
        assert!(start.elapsed() < Duration::from_secs(30), "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut b = Server::start_with_env(&root, config, SECRET, &env);
    // Worker a freezes (SIGSTOP: a hung machine, a long GC pause, a cut network) mid-run.
    let a_pid = nix::unistd::Pid::from_raw(i32::try_from(a.pid().unwrap()).unwrap());
    nix::sys::signal::kill(a_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let frozen = Instant::now();
    while run_status(&client, &run).await == "running" {
        assert!(
            frozen.elapsed() < Duration::from_secs(30),
            "the frozen worker's run still says running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let marked = frozen.elapsed();
    // It wakes up: its next heartbeat finds it was taken for dead; it stops its run, tears
    // down what the run created on its machine, and exits with a failure.
    nix::sys::signal::kill(a_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let woke = Instant::now();
    let mut child = a.child.take().unwrap();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            woke.elapsed() < Duration::from_secs(40),
            "the worker taken for dead kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    eprintln!("--- worker a stderr\n{err}");
    eprintln!(
        "frozen worker's run recovered after {:.1} s; the worker exited {:.1} s after waking",
        marked.as_secs_f64(),
        woke.elapsed().as_secs_f64()
    );
    assert_eq!(exit.code(), Some(3), "{err}");
    assert!(err.contains("taken for dead"), "{err}");
    assert!(!err.contains(ControlDb::password()));
    assert_nothing_left(a.state(), &run);
    // The survivor's record stands: `interrupted` when the run had begun on a, or — when a
    // froze between the claim and the run's first step — `passed` on the survivor, which ran
    // it again. A's late outcome is refused either way (fenced on the run's owner).
    let row = client
        .query_one(
            "SELECT status, worker FROM dryrun_runs WHERE run_id = $1",
            &[&run],
        )
        .await
        .unwrap();
    let (final_status, owner): (String, Option<String>) = (row.get(0), row.get(1));
    let a_id = format!("/{}/", a_pid.as_raw());
    match final_status.as_str() {
        "interrupted" => assert!(owner.is_some_and(|w| w.contains(&a_id))),
        "passed" => assert!(owner.is_some_and(|w| !w.contains(&a_id))),
        other => panic!("the frozen worker's run ended {other}"),
    }
    let (code, err_b) = b.stop();
    assert_eq!(code, Some(0), "{err_b}");
}

async fn run_status(client: &tokio_postgres::Client, run: &str) -> String {
    client
        .query_one("SELECT status FROM dryrun_runs WHERE run_id = $1", &[&run])
        .await
        .unwrap()
        .get(0)
}

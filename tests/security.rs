//! The trust boundary, attacked (docs/security.md): each test performs an attack against the
//! real server or CLI and checks that nothing ran, nothing leaked and nothing was lost.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{SECRET, Server, free_port, get, hook, wait_done};
use common::*;

/// A blueprints root with the demo (symlinked) and small fixtures written by each test.
fn fixture_root() -> tempfile::TempDir {
    let d = state_dir();
    std::os::unix::fs::symlink(root().join("blueprints/demo"), d.path().join("demo")).unwrap();
    d
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A release whose one install step runs `step` (a shell line).
fn release(dir: &Path, step: &str) {
    write(
        &dir.join("dryrun-release.yaml"),
        &format!(
            "version: \"1.0\"\ninstall:\n  - name: step\n    run: {}\n",
            serde_json::to_string(step).unwrap()
        ),
    );
}

/// An `application/x-www-form-urlencoded` body.
fn urlencoded<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                dryrun::secret::percent_encode(k.as_ref(), b""),
                dryrun::secret::percent_encode(v.as_ref(), b"")
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The dashboard's CSRF token and the cookie it is bound to, as a browser gets them.
async fn csrf(url: &str, cookie: Option<&str>) -> (String, String) {
    let mut r = http().get(format!("{url}/"));
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    let r = r.send().await.unwrap();
    let set = r
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string());
    let page = r.text().await.unwrap();
    let token = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no csrf field in:\n{page}"))
        .to_string();
    (
        token,
        set.or(cookie.map(str::to_string)).unwrap_or_default(),
    )
}

fn run_count(state: &Path) -> usize {
    run_ids(state).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_or_blueprint_outside_the_root_is_refused_and_nothing_runs() {
    let fixtures = fixture_root();
    let outside = state_dir();
    let marker = outside.path().join("pwned");
    // `OUTSIDE/x://r` is a real path on Linux: directory `x:`, then `r`.
    release(
        &outside.path().join("x:/r"),
        &format!("touch {}", marker.display()),
    );
    write(
        &outside.path().join("x:/b.yaml"),
        "name: b\nresources:\n  job:\n    type: service\n",
    );
    write(
        &fixtures.path().join("job.yaml"),
        "name: job\nresources:\n  job:\n    type: service\n",
    );
    release(&fixtures.path().join("releases/ok"), "true");
    let srv = Server::start_with_root(fixtures.path(), "");
    let o = outside.path().display().to_string();
    let refs = [
        format!("{o}/x://r"),
        "x://r".to_string(),
        format!("file://{o}/x:/r"),
        format!("file:{o}/x:/r"),
        "http://127.0.0.1:1/release.tar.gz".to_string(),
        "s3:/shop-releases/r.tar.gz".to_string(),
        "S3://shop-releases/r.tar.gz".to_string(),
        // The local provider fetches nothing remote: even the exact form is refused.
        "s3://shop-releases/r.tar.gz".to_string(),
        format!("releases/ok/../../../{}", o.trim_start_matches('/')),
    ];
    for (i, r) in refs.iter().enumerate() {
        let body = serde_json::json!({"blueprint": "job.yaml", "release": r}).to_string();
        let (code, v) = hook(&srv.url, &body, &format!("ref-{i}")).await;
        assert_eq!(code, 400, "release {r}: {v}");
    }
    let body =
        serde_json::json!({"blueprint": format!("{o}/x://b.yaml"), "release": "releases/ok"})
            .to_string();
    let (code, v) = hook(&srv.url, &body, "bp").await;
    assert_eq!(code, 400, "{v}");
    // The dashboard's form follows the same rules.
    let (token, cookie) = csrf(&srv.url, None).await;
    let r = http()
        .post(format!("{}/ui/runs", srv.url))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(&[
            ("blueprint", "job.yaml"),
            ("release", &format!("{o}/x://r")),
            ("csrf", &token),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!marker.exists(), "the outside release's install step ran");
    assert_eq!(run_count(srv.state()), 0, "a refused request created a run");
    // An honest path still works.
    let (code, v) = hook(
        &srv.url,
        r#"{"blueprint":"job.yaml","release":"releases/ok"}"#,
        "honest",
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let done = wait_done(
        &srv.url,
        v["run_id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["run"]["status"], "passed", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_sees_only_its_minimal_environment_and_the_servers_secrets_are_redacted() {
    let fixtures = fixture_root();
    let out = state_dir();
    let env_file = out.path().join("release-env.txt");
    let check_file = out.path().join("check-env.txt");
    write(
        &fixtures.path().join("env.yaml"),
        &format!(
            "name: envcheck\nparams:\n  leak: {{}}\nproviders:\n  local:\n    pass_env: [DRYRUN_TEST_PASSED]\nresources:\n  job:\n    type: service\n    env:\n      ENV_OUT: \"{}\"\n      LEAK: \"{{{{params.leak}}}}\"\nchecks:\n  - name: env-of-a-check\n    type: command\n    run: env > {}\n",
            env_file.display(),
            check_file.display()
        ),
    );
    // The step dumps its environment and prints what it was given, also as invalid UTF-8.
    release(
        &fixtures.path().join("releases/envdump"),
        r#"env > "$ENV_OUT"; echo "leak: $LEAK"; printf '\377\376%s\n' "$LEAK"; umask"#,
    );
    let aws_canary = "aws-canary-7f3e9d1c2b";
    let prod_canary = "prod-canary-0a9b8c7d6e";
    let srv = Server::start_with_env(
        fixtures.path(),
        "",
        SECRET,
        &[
            ("AWS_SECRET_ACCESS_KEY", aws_canary),
            ("PROD_DB_PASSWORD", prod_canary),
            ("DRYRUN_TEST_PASSED", "passed-through"),
        ],
    );
    // The portal (which knows the webhook secret) makes the release print it.
    let body = serde_json::json!({"blueprint": "env.yaml", "release": "releases/envdump", "params": {"leak": SECRET}})
        .to_string();
    let (code, v) = hook(&srv.url, &body, "env-1").await;
    assert_eq!(code, 202, "{v}");
    let run_id = v["run_id"].as_str().unwrap().to_string();
    let done = wait_done(&srv.url, &run_id, Duration::from_secs(30)).await;
    assert_eq!(done["run"]["status"], "passed", "{done}");

    for file in [&env_file, &check_file] {
        let env = std::fs::read_to_string(file).unwrap();
        for bad in [
            aws_canary,
            prod_canary,
            "AWS_SECRET_ACCESS_KEY",
            "PROD_DB_PASSWORD",
            "DRYRUN_WEBHOOK_SECRET",
            "DRYRUN_STATE_DIR",
        ] {
            assert!(!env.contains(bad), "{bad} reached the child:\n{env}");
        }
        for good in [
            "PATH=",
            &format!("DRYRUN_RUN_ID={run_id}"),
            "DRYRUN_TEST_PASSED=passed-through",
        ] {
            assert!(env.contains(good), "{good} missing:\n{env}");
        }
        let home = env
            .lines()
            .find_map(|l| l.strip_prefix("HOME="))
            .unwrap()
            .to_string();
        assert!(
            home.starts_with(
                &srv.state()
                    .join("copies")
                    .join(&run_id)
                    .display()
                    .to_string()
            ),
            "HOME is inside the copy: {home}"
        );
    }
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(env.contains("LEAK=") && env.contains("ENV_OUT="), "{env}");
    // The logs API and the log files on disk: the secret is redacted, invalid UTF-8 or not.
    let logs = http()
        .get(format!("{}/v1/runs/{run_id}/logs", srv.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(logs.contains("leak: [redacted]"), "{logs}");
    assert!(
        logs.contains("0077"),
        "the step ran with umask 077:\n{logs}"
    );
    let forms = canary_forms(SECRET);
    assert_no_canary("the logs API", logs.as_bytes(), &forms);
    let n = assert_no_canary_in_dir(&srv.state().join("runs").join(&run_id), &forms);
    assert!(n >= 3, "journal, report and a log were searched");
    let raw = std::fs::read(
        srv.state()
            .join("runs")
            .join(&run_id)
            .join("logs/job.install.step.log"),
    )
    .unwrap();
    assert!(
        raw.windows(12).any(|w| w == b"\xff\xfe[redacted]"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn a_killed_run_leaves_no_secret_in_its_logs() {
    let fixtures = fixture_root();
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    write(
        &fixtures.path().join("tok.yaml"),
        "name: tok\nsecrets:\n  token:\n    env: DRYRUN_TEST_TOKEN\nresources:\n  job:\n    type: service\n    env:\n      TOKEN: \"{{secrets.token}}\"\n",
    );
    release(
        &fixtures.path().join("releases/tok"),
        r#"echo "token=$TOKEN"; printf '\377%s\n' "$TOKEN"; sleep 60"#,
    );
    let canary = "kill-canary-5d4c3b2a19";
    let mut child = dryrun(state.path())
        .env("DRYRUN_TEST_TOKEN", canary)
        .args(["run", "--quiet"])
        .arg(fixtures.path().join("tok.yaml"))
        .arg("--release")
        .arg(fixtures.path().join("releases/tok"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let log = loop {
        let found = run_ids(state.path()).first().map(|id| {
            state
                .path()
                .join("runs")
                .join(id)
                .join("logs/job.install.step.log")
        });
        // Both lines of the step are in the log (or at least as far as it got).
        if let Some(p) = found
            && std::fs::read(&p).is_ok_and(|b| b.iter().filter(|c| **c == b'\n').count() >= 2)
        {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the step never logged"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let bytes = std::fs::read(&log).unwrap();
    assert!(
        bytes.starts_with(b"token=[redacted]\n\xff[redacted]"),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert_no_canary("the log of a killed run", &bytes, &canary_forms(canary));
    assert_no_canary_in_dir(state.path(), &canary_forms(canary));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_origins_and_forms_without_the_csrf_token_are_refused() {
    let fixtures = fixture_root();
    write(
        &fixtures.path().join("job.yaml"),
        "name: job\nresources:\n  job:\n    type: service\n",
    );
    release(&fixtures.path().join("releases/ok"), "true");
    let srv = Server::start_with_root(fixtures.path(), "");
    let port = srv.port;
    // DNS rebinding: a page on attacker.example resolved to 127.0.0.1 reads the API.
    for host in [
        format!("attacker.example:{port}"),
        "127.0.0.1.nip.io".to_string(),
    ] {
        let r = http()
            .get(format!("{}/v1/runs", srv.url))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 421, "{host}");
    }
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let r = http()
            .get(format!("{}/v1/runs", srv.url))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
    let (token, cookie) = csrf(&srv.url, None).await;
    assert!(cookie.starts_with("dryrun_csrf="), "{cookie}");
    let form = |csrf: &str| {
        vec![
            ("blueprint", "job.yaml".to_string()),
            ("release", "releases/ok".to_string()),
            ("csrf", csrf.to_string()),
        ]
    };
    let post = |cookie: Option<String>, origin: Option<&'static str>, csrf: String| {
        let mut r = http()
            .post(format!("{}/ui/runs", srv.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(urlencoded(&form(&csrf)));
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    // No token, a token for another cookie, the right token but a foreign origin.
    assert_eq!(
        post(Some(cookie.clone()), None, String::new())
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(post(None, None, token.clone()).await.unwrap().status(), 403);
    let (other_token, _) = csrf(&srv.url, None).await;
    assert_eq!(
        post(Some(cookie.clone()), None, other_token)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        post(
            Some(cookie.clone()),
            Some("http://attacker.example"),
            token.clone()
        )
        .await
        .unwrap()
        .status(),
        403
    );
    assert_eq!(run_count(srv.state()), 0);
    assert_eq!(
        get(&format!("{}/v1/runs", srv.url)).await["runs"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // The page's own token with its cookie (and our origin) starts the run.
    let r = post(Some(cookie), Some("http://127.0.0.1"), token)
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let run_id = r.headers()["location"]
        .to_str()
        .unwrap()
        .trim_start_matches("/runs/")
        .to_string();
    let done = wait_done(&srv.url, &run_id, Duration::from_secs(30)).await;
    assert_eq!(done["run"]["status"], "passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_the_dashboard_and_the_api() {
    let fixtures = fixture_root();
    write(
        &fixtures.path().join("job.yaml"),
        "name: job\nresources:\n  job:\n    type: service\n",
    );
    release(&fixtures.path().join("releases/ok"), "true");
    let read_token = "drt_read_token_for_tests_0123456789";
    let run_token = "drt_run_token_for_tests_9876543210";
    let read_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        read_token.as_bytes(),
    ));
    let srv = Server::start_with_env(
        fixtures.path(),
        &format!(
            "[[auth.tokens]]\nname = \"viewer\"\nrole = \"read\"\nsha256 = \"{read_hash}\"\n[[auth.tokens]]\nname = \"ops\"\nrole = \"run\"\nenv = \"DRYRUN_TEST_RUN_TOKEN\"\n"
        ),
        SECRET,
        &[("DRYRUN_TEST_RUN_TOKEN", run_token)],
    );
    let url = srv.url.clone();
    let c = http();
    // Nothing without a token; /healthz stays open; the dashboard sends browsers to /login.
    for path in [
        "/v1/runs",
        "/v1/runs/x/logs",
        "/v1/trend?blueprint=job",
        "/metrics",
    ] {
        let r = c.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    assert_eq!(
        c.get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login");
    let bearer = |t: &str| format!("Bearer {t}");
    let r = c
        .get(format!("{url}/v1/runs"))
        .header("authorization", bearer(read_token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{url}/v1/runs"))
        .header("authorization", bearer("drt_wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Log in with a token on /login (CSRF-protected), get a session cookie.
    let login = |token: &'static str| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let page = c.get(format!("{url}/login")).send().await.unwrap();
            let anon = page.headers()["set-cookie"]
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_string();
            let body = page.text().await.unwrap();
            let csrf = body
                .split("name=\"csrf\" value=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string();
            c.post(format!("{url}/login"))
                .header("cookie", &anon)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(urlencoded(&[("token", token), ("csrf", &csrf)]))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(login("drt_not_a_token_at_all").await.status(), 401);
    let r = login(read_token).await;
    assert_eq!(r.status(), 303);
    let session = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    let session = session.split(';').next().unwrap().to_string();
    let (token, _) = csrf(&url, Some(&session)).await;
    let index = c
        .get(format!("{url}/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        index.contains("viewer (read)") && !index.contains("id=\"start-form\""),
        "{index}"
    );
    // The read role cannot start a run, even with a valid CSRF token.
    let r = c
        .post(format!("{url}/ui/runs"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(&[
            ("blueprint", "job.yaml"),
            ("release", "releases/ok"),
            ("csrf", &token),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(run_count(srv.state()), 0);
    // The run role can.
    let r = login(run_token).await;
    let session = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let (token, _) = csrf(&url, Some(&session)).await;
    let r = c
        .post(format!("{url}/ui/runs"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(&[
            ("blueprint", "job.yaml"),
            ("release", "releases/ok"),
            ("csrf", &token),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // The signed webhook needs no token: its HMAC authenticates it.
    let (code, v) = hook(
        &url,
        r#"{"blueprint":"job.yaml","release":"releases/ok"}"#,
        "w1",
    )
    .await;
    assert_eq!(code, 202, "{v}");
    // Logging out ends the session.
    let r = c
        .post(format!("{url}/logout"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(&[("csrf", &token)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = c
        .get(format!("{url}/v1/runs"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let logs = c
        .get(format!(
            "{url}/v1/runs/{}/logs",
            v["run_id"].as_str().unwrap()
        ))
        .header("authorization", bearer(read_token))
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), 200);
}

#[test]
fn serve_refuses_to_listen_beyond_loopback_without_authentication() {
    let state = state_dir();
    let port = free_port();
    let mut child = Command::new(bin())
        .current_dir(root())
        .env("DRYRUN_STATE_DIR", state.path())
        .args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--blueprints",
            "blueprints",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(
        err.contains("[[auth.tokens]]") && err.contains("0.0.0.0"),
        "{err}"
    );
}

/// A blueprint that puts params into a shell command, SQL queries and a production source.
fn injection_fixture(root: &Path) {
    write(
        &root.join("inj.yaml"),
        r#"name: inj
params:
  name: {default: "shop"}
  count:
    default: "1"
    pattern: "[0-9]{1,6}"
  mode:
    default: fast
    values: [fast, slow]
  bucket: {default: uploads}
providers:
  local:
    backups: demo/production/backups
    buckets: demo/production/buckets
resources:
  db: {type: database, engine: sqlite, source: shop-db, database: shop}
  files: {type: bucket, source: "{{params.bucket}}"}
masking:
  db: {customers.email: email}
checks:
  - name: shell
    type: command
    run: echo {{params.name}} {{params.mode}}
  - name: count
    type: sql
    database: db
    query: "SELECT count(*) >= {{params.count}} FROM customers"
    expect: {value: "1"}
  - name: literal
    type: sql
    database: db
    query: "SELECT '{{params.name}}'"
"#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn params_cannot_inject_shell_or_sql_and_declared_rules_are_enforced() {
    let fixtures = fixture_root();
    injection_fixture(fixtures.path());
    release(&fixtures.path().join("releases/ok"), "true");
    let srv = Server::start_with_root(fixtures.path(), "");
    let marker = fixtures.path().join("pwned");
    let m = marker.display().to_string();
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"name": format!("$(touch {m})")}),
            "param `name`",
        ),
        (
            serde_json::json!({"name": format!("x; touch {m}")}),
            "param `name`",
        ),
        (
            serde_json::json!({"name": format!("`touch {m}`")}),
            "param `name`",
        ),
        (serde_json::json!({"name": "x' OR '1'='1"}), "param `name`"),
        (serde_json::json!({"name": "-rf"}), "param `name`"),
        (serde_json::json!({"name": "a\nb"}), "param `name`"),
        (
            serde_json::json!({"count": "1 OR 1=1"}),
            "does not match its pattern",
        ),
        (
            serde_json::json!({"count": "1; DROP TABLE customers"}),
            "does not match its pattern",
        ),
        (
            serde_json::json!({"mode": "turbo"}),
            "is not one of: fast, slow",
        ),
        (
            serde_json::json!({"bucket": "../../../../etc"}),
            "param `bucket`",
        ),
    ];
    for (i, (params, want)) in cases.iter().enumerate() {
        let body = serde_json::json!({"blueprint": "inj.yaml", "release": "releases/ok", "params": params})
            .to_string();
        let (code, v) = hook(&srv.url, &body, &format!("inj-{i}")).await;
        assert_eq!(code, 422, "{params}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(want), "{params}: `{want}` not in {msg}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!marker.exists(), "an injected command ran");
    assert_eq!(run_count(srv.state()), 0, "a refused request created a run");
    // Honest values pass, the declared ones as declared.
    let body = serde_json::json!({"blueprint": "inj.yaml", "release": "releases/ok",
        "params": {"name": "shop-1.2", "count": "100", "mode": "slow"}})
    .to_string();
    let (code, v) = hook(&srv.url, &body, "honest").await;
    assert_eq!(code, 202, "{v}");
    let done = wait_done(
        &srv.url,
        v["run_id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["run"]["status"], "passed", "{done}");

    // The CLI refuses the same values before creating anything (exit 2, the param named).
    let state = state_dir();
    for (param, want) in [
        (format!("name=$(touch {m})"), "param `name`"),
        ("count=12a".to_string(), "param `count`"),
    ] {
        let out = run(dryrun(state.path())
            .arg("run")
            .arg(fixtures.path().join("inj.yaml"))
            .arg("--release")
            .arg(fixtures.path().join("releases/ok"))
            .args(["--param", &param]));
        assert_eq!(out.status.code(), Some(2), "{param}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{param}: {err}");
    }
    assert!(!marker.exists());
    assert_eq!(run_count(state.path()), 0);
}

/// Every file and directory under `dir`, with its mode.
fn modes(dir: &Path, out: &mut Vec<(PathBuf, u32, bool)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.file_type().is_symlink() {
            continue;
        }
        out.push((p.clone(), md.mode() & 0o7777, md.is_dir()));
        if md.is_dir() {
            modes(&p, out);
        }
    }
}

/// Files 0600 (or 0700), directories 0700 (0711 on the way to a cluster when root): nothing
/// readable or writable by anyone else.
fn assert_private(dir: &Path) -> usize {
    let mut all = Vec::new();
    modes(dir, &mut all);
    for (p, mode, is_dir) in &all {
        let open = if *is_dir { mode & 0o066 } else { mode & 0o077 };
        assert_eq!(open, 0, "{} has mode {mode:o}", p.display());
    }
    all.len()
}

#[test]
fn copies_of_production_logs_and_reports_are_owner_only() {
    require_demo_shop();
    let parent = state_dir();
    let state = parent.path().join("state");
    let _reaper = Reaper(state.clone());
    let fixtures = fixture_root();
    write(
        &fixtures.path().join("job.yaml"),
        "name: job\nresources:\n  job:\n    type: service\n",
    );
    release(
        &fixtures.path().join("releases/files"),
        r#"umask > umask.txt; touch created.txt; mkdir made"#,
    );
    // The demo (SQLite copy, bucket copy, service), kept so that its copy can be inspected.
    let out = run(dryrun(&state).args([
        "run",
        "blueprints/demo/shop.yaml",
        "--release",
        "blueprints/demo/releases/v2",
        "--keep",
        "10m",
    ]));
    assert_eq!(out.status.code(), Some(0));
    let out = run(dryrun(&state)
        .arg("run")
        .arg(fixtures.path().join("job.yaml"))
        .arg("--release")
        .arg(fixtures.path().join("releases/files"))
        .args(["--keep", "10m"]));
    assert_eq!(out.status.code(), Some(0));
    let root_mode = std::fs::metadata(&state).unwrap().mode() & 0o777;
    let want = if nix::unistd::geteuid().is_root() {
        0o711
    } else {
        0o700
    };
    assert_eq!(root_mode, want, "state directory mode {root_mode:o}");
    let n = assert_private(&state);
    assert!(n > 20, "only {n} entries looked at");
    let kept = run_ids(&state);
    let copies = state.join("copies");
    let sqlite: Vec<_> = kept
        .iter()
        .map(|id| copies.join(id).join("db/shop.sqlite"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(sqlite.len(), 1, "the kept SQLite copy is there");
    let rel = kept
        .iter()
        .map(|id| copies.join(id).join("job/release"))
        .find(|p| p.exists())
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(rel.join("umask.txt"))
            .unwrap()
            .trim(),
        "0077"
    );
    for (p, want) in [("created.txt", 0o600), ("made", 0o700)] {
        let mode = std::fs::metadata(rel.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, want,
            "{p} was created by the release with mode {mode:o}"
        );
    }
    let out = run(dryrun(&state).args(["cleanup", "--all", "--yes"]));
    assert_eq!(out.status.code(), Some(0));
    assert_private(&state);
}

#[test]
fn postgres_copies_are_owner_only_too() {
    if !have_postgres() {
        return;
    }
    require_demo_shop();
    let parent = state_dir();
    let state = parent.path().join("state");
    let _reaper = Reaper(state.clone());
    let out = run(dryrun(&state).args([
        "run",
        "blueprints/demo/shop-pg.yaml",
        "--release",
        "blueprints/demo/releases/pg-v2",
        "--keep",
        "10m",
    ]));
    assert_eq!(out.status.code(), Some(0));
    let n = assert_private(&state);
    assert!(
        n > 100,
        "only {n} entries looked at (the cluster's files are among them)"
    );
    let out = run(dryrun(&state).args(["cleanup", "--all", "--yes"]));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_crafted_journal_cannot_make_cleanup_delete_outside_the_work_area() {
    let state = state_dir();
    let victim = state_dir();
    std::fs::write(victim.path().join("precious.txt"), "do not delete").unwrap();
    let s = state.path();
    // A symlinked run directory that points outside.
    std::fs::create_dir_all(s.join("copies")).unwrap();
    std::os::unix::fs::symlink(victim.path(), s.join("copies/linked-run")).unwrap();
    let dots = format!(
        "{}/copies/../../../../{}",
        s.display(),
        victim.path().display()
    );
    let linked = format!("{}/copies/linked-run/db", s.display());
    let pgdata = format!(
        "{}/copies/forged-1/db/../../../{}",
        s.display(),
        victim.path().display()
    );
    for (run_id, dir, extra) in [
        ("forged-20261122-000000-0001", dots.as_str(), String::new()),
        (
            "forged-20261122-000000-0002",
            linked.as_str(),
            String::new(),
        ),
        (
            "forged-20261122-000000-0003",
            &format!("{}/copies/forged-3/db", s.display()),
            format!(",\"pgdata\":\"{pgdata}\""),
        ),
    ] {
        let d = s.join("runs").join(run_id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("journal.jsonl"),
            format!(
                "{{\"event\":\"started\",\"run_id\":\"{run_id}\",\"blueprint\":\"forged\",\"blueprint_path\":\"x\",\"provider\":\"local\",\"release\":\"x\",\"at\":\"2026-11-22T00:00:00Z\",\"expires_at\":\"2026-11-22T01:00:00Z\",\"pid\":1}}\n{{\"event\":\"creating\",\"record\":{{\"address\":\"database.db\",\"kind\":\"database\",\"id\":\"{dir}\",\"data\":{{\"dir\":\"{dir}\",\"run_id\":\"{run_id}\"{extra}}}}}}}\n"
            ),
        )
        .unwrap();
        let out = run(dryrun(s).args(["cleanup", run_id, "--yes"]));
        assert_eq!(
            out.status.code(),
            Some(4),
            "{run_id}: refused, so left behind"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("refusing to modify"), "{run_id}: {text}");
        assert!(
            victim.path().join("precious.txt").exists(),
            "{run_id} deleted a directory outside the work area"
        );
    }
}

/// A loopback receiver: `/slow` answers after `slow`, `/redirect` sends a 307 to `redirect_to`,
/// anything else answers at once; every request is recorded as (path, headers, body, when).
type Got = std::sync::Arc<std::sync::Mutex<Vec<(String, axum::http::HeaderMap, String, Instant)>>>;

async fn receiver_on(
    listener: tokio::net::TcpListener,
    slow: Duration,
    redirect_to: String,
) -> Got {
    let got: Got = Got::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::post(
            move |axum::extract::Path(path): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap,
                  body: String| {
                let g = g.clone();
                let redirect_to = redirect_to.clone();
                async move {
                    g.lock()
                        .unwrap()
                        .push((path.clone(), headers, body, Instant::now()));
                    if path == "slow" {
                        tokio::time::sleep(slow).await;
                    }
                    if path == "redirect" {
                        return (
                            axum::http::StatusCode::TEMPORARY_REDIRECT,
                            [(axum::http::header::LOCATION, redirect_to)],
                            "",
                        )
                            .into_response();
                    }
                    "ok".into_response()
                }
            },
        ),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    got
}

use axum::response::IntoResponse as _;

async fn receiver(slow: Duration, redirect_to: String) -> (String, Got) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (url, receiver_on(l, slow, redirect_to).await)
}

fn job_fixture() -> tempfile::TempDir {
    let fixtures = fixture_root();
    write(
        &fixtures.path().join("job.yaml"),
        "name: job\nresources:\n  job:\n    type: service\n",
    );
    release(&fixtures.path().join("releases/ok"), "true");
    fixtures
}

fn finished_at(run: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    run["run"]["finished_at"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_callback_receiver_holds_neither_the_environment_nor_the_queue() {
    let fixtures = job_fixture();
    let (cb, got) = receiver(Duration::from_secs(8), String::new()).await;
    let srv = Server::start_with_root(
        fixtures.path(),
        &format!("concurrency = 1\n[callbacks]\nallow = [\"{cb}/\"]\nattempts = 1\n"),
    );
    let (code, a) = hook(
        &srv.url,
        &format!(
            r#"{{"blueprint":"job.yaml","release":"releases/ok","callback_url":"{cb}/slow"}}"#
        ),
        "slow-a",
    )
    .await;
    assert_eq!(code, 202, "{a}");
    let (code, b) = hook(
        &srv.url,
        r#"{"blueprint":"job.yaml","release":"releases/ok"}"#,
        "slow-b",
    )
    .await;
    assert_eq!(code, 202, "{b}");
    let a = wait_done(
        &srv.url,
        a["run_id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    let b = wait_done(
        &srv.url,
        b["run_id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        (a["run"]["status"].as_str(), b["run"]["status"].as_str()),
        (Some("passed"), Some("passed"))
    );
    let gap = finished_at(&b) - finished_at(&a);
    assert!(
        gap < chrono::Duration::seconds(4),
        "run b waited {gap} behind run a's 8 s callback"
    );
    // The callback still arrives, and its outcome is recorded.
    let start = Instant::now();
    loop {
        let run = get(&format!(
            "{}/v1/runs/{}",
            srv.url,
            a["run"]["run_id"].as_str().unwrap()
        ))
        .await;
        if run["run"]["callback"] == "delivered (attempt 1)" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            run["run"]["callback"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        got.lock()
            .unwrap()
            .iter()
            .filter(|(p, ..)| p == "slow")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_callbacks_survive_a_restart_and_redirects_are_not_followed() {
    let fixtures = job_fixture();
    // Where a redirect would lead: a receiver outside the allow-list.
    let (elsewhere, elsewhere_got) = receiver(Duration::ZERO, String::new()).await;
    // The allowed receiver's port, with nothing listening on it yet.
    let port = free_port();
    let cb = format!("http://127.0.0.1:{port}");
    let mut srv = Server::start_with_root(
        fixtures.path(),
        &format!("[callbacks]\nallow = [\"{cb}/\"]\nattempts = 3\nbackoff = \"2s\"\n"),
    );
    let (code, v) = hook(
        &srv.url,
        &format!(
            r#"{{"blueprint":"job.yaml","release":"releases/ok","callback_url":"{cb}/done"}}"#
        ),
        "restart-1",
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let run_id = v["run_id"].as_str().unwrap().to_string();
    wait_done(&srv.url, &run_id, Duration::from_secs(30)).await;
    let start = Instant::now();
    loop {
        let run = get(&format!("{}/v1/runs/{run_id}", srv.url)).await;
        let cb = run["run"]["callback"].as_str().unwrap_or("").to_string();
        if cb.starts_with("retrying (attempt 1") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "callback: {cb}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The server stops with the callback still queued, the receiver comes up, the server
    // restarts: the callback is delivered, signed.
    srv.stop();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let got = receiver_on(listener, Duration::ZERO, format!("{elsewhere}/target")).await;
    srv.restart();
    let start = Instant::now();
    while !got.lock().unwrap().iter().any(|(p, ..)| p == "done") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the queued callback was lost"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, headers, body, _) = got
        .lock()
        .unwrap()
        .iter()
        .find(|(p, ..)| p == "done")
        .cloned()
        .unwrap();
    assert!(body.contains(&run_id));
    assert!(dryrun::server::signature::verify(
        SECRET.as_bytes(),
        body.as_bytes(),
        headers["x-hub-signature-256"].to_str().unwrap()
    ));
    // A callback answered with a redirect is not followed anywhere.
    let (code, v) = hook(
        &srv.url,
        &format!(
            r#"{{"blueprint":"job.yaml","release":"releases/ok","callback_url":"{cb}/redirect"}}"#
        ),
        "redirect-1",
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let run_id = v["run_id"].as_str().unwrap().to_string();
    wait_done(&srv.url, &run_id, Duration::from_secs(30)).await;
    let start = Instant::now();
    let outcome = loop {
        let run = get(&format!("{}/v1/runs/{run_id}", srv.url)).await;
        let cb = run["run"]["callback"].as_str().unwrap_or("").to_string();
        if cb.starts_with("failed") {
            break cb;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "callback: {cb}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        outcome.contains("307") && outcome.contains("not followed"),
        "{outcome}"
    );
    assert_eq!(
        got.lock()
            .unwrap()
            .iter()
            .filter(|(p, ..)| p == "redirect")
            .count(),
        3
    );
    assert!(
        elsewhere_got.lock().unwrap().is_empty(),
        "a redirect was followed"
    );
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logs_endpoint_streams_only_the_tail_of_a_huge_log() {
    let fixtures = job_fixture();
    let srv = Server::start_with_root(fixtures.path(), "");
    let (code, v) = hook(
        &srv.url,
        r#"{"blueprint":"job.yaml","release":"releases/ok"}"#,
        "logs-1",
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let run_id = v["run_id"].as_str().unwrap().to_string();
    wait_done(&srv.url, &run_id, Duration::from_secs(30)).await;
    // A 512 MiB log (sparse: no disk), ending in a line we can find.
    let log = srv.state().join("runs").join(&run_id).join("logs/huge.log");
    {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&log)
            .unwrap();
        f.set_len(512 << 20).unwrap();
        use std::io::{Seek as _, Write as _};
        let mut f = f;
        f.seek(std::io::SeekFrom::End(0)).unwrap();
        f.write_all(b"\nthe last line\n").unwrap();
    }
    let pid = srv.child.as_ref().unwrap().id();
    let before = peak_rss_kib(pid);
    let body = http()
        .get(format!("{}/v1/runs/{run_id}/logs", srv.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let after = peak_rss_kib(pid);
    assert!(body.len() < 300 * 1024, "{} bytes served", body.len());
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("==> huge.log <==")
            && text.contains("bytes cut")
            && text.contains("the last line")
    );
    assert!(
        text.contains("==> job.install.step.log <=="),
        "other logs are served too"
    );
    assert!(
        after - before < 64 * 1024,
        "serving the log grew the server's peak memory by {} MiB",
        (after - before) / 1024
    );
}

#[test]
fn old_closed_runs_are_pruned_and_runs_that_left_something_are_kept() {
    let fixtures = job_fixture();
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    let run_job = |extra: &[&str]| {
        let out = run(dryrun(state.path())
            .arg("run")
            .arg(fixtures.path().join("job.yaml"))
            .arg("--release")
            .arg(fixtures.path().join("releases/ok"))
            .args(extra));
        assert_eq!(out.status.code(), Some(0));
    };
    run_job(&[]);
    run_job(&["--keep", "10m"]);
    run_job(&[]);
    let ids = run_ids(state.path());
    assert_eq!(ids.len(), 3);
    // Age the first two by rewriting their start time (journal and history).
    let db = rusqlite::Connection::open(state.path().join("history.sqlite")).unwrap();
    let journals: Vec<(String, String)> = ids
        .iter()
        .map(|id| {
            let p = state.path().join("runs").join(id).join("journal.jsonl");
            (id.clone(), std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    let kept = journals
        .iter()
        .find(|(_, j)| j.contains("\"kept\""))
        .unwrap()
        .0
        .clone();
    let old_closed = journals
        .iter()
        .find(|(id, _)| *id != kept)
        .unwrap()
        .0
        .clone();
    let fresh = journals
        .iter()
        .find(|(id, _)| *id != kept && *id != old_closed)
        .unwrap()
        .0
        .clone();
    for id in [&kept, &old_closed] {
        let p = state.path().join("runs").join(id).join("journal.jsonl");
        let j = std::fs::read_to_string(&p).unwrap();
        let first = j.lines().next().unwrap();
        let mut v: serde_json::Value = serde_json::from_str(first).unwrap();
        v["at"] = serde_json::json!("2026-01-02T03:04:05Z");
        std::fs::write(&p, j.replacen(first, &v.to_string(), 1)).unwrap();
        db.execute(
            "UPDATE runs SET queued_at = '2026-01-02T03:04:05Z', finished_at = '2026-01-02T03:05:00Z' WHERE run_id = ?1",
            [id],
        )
        .unwrap();
    }
    let out = run(dryrun(state.path()).args(["prune", "--older-than", "90d"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 1 run(s)"));
    assert!(!state.path().join("runs").join(&old_closed).exists());
    assert!(
        state.path().join("runs").join(&kept).exists(),
        "a kept copy's journal stays"
    );
    assert!(state.path().join("runs").join(&fresh).exists());
    let rows: i64 = db
        .query_row(
            "SELECT count(*) FROM runs WHERE run_id = ?1",
            [&old_closed],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 0);
}

#[test]
fn iam_policies_constrain_mutations_and_the_instance_reads_no_secrets() {
    let load = |name: &str| -> serde_json::Value {
        let p = root().join("docs/providers/aws-iam").join(name);
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    };
    let as_list = |v: &serde_json::Value| -> Vec<String> {
        match v {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => {
                a.iter().map(|x| x.as_str().unwrap().to_string()).collect()
            }
            _ => Vec::new(),
        }
    };
    // The runner: every allowed mutating action is limited to dryrun-* names or conditioned on
    // the dryrun tags, and a Deny covers modify/delete/terminate of anything untagged.
    let runner = load("runner-policy.json");
    let mutating = [
        "Create",
        "Delete",
        "Modify",
        "Terminate",
        "Run",
        "Restore",
        "Put",
        "Authorize",
        "Revoke",
        "AddTags",
        "TagResource",
        "SendCommand",
    ];
    let mut checked = 0;
    let mut deny_covers = Vec::new();
    for st in runner["Statement"].as_array().unwrap() {
        let actions = as_list(&st["Action"]);
        let resources = as_list(&st["Resource"]);
        if st["Effect"] == "Deny" {
            assert_eq!(
                st["Condition"]["Null"]["aws:ResourceTag/dryrun:run-id"], "true",
                "{st}"
            );
            deny_covers.extend(actions);
            continue;
        }
        for a in &actions {
            let verb = a.split(':').nth(1).unwrap();
            if !mutating.iter().any(|m| verb.starts_with(m)) {
                continue;
            }
            checked += 1;
            let by_name = !resources.is_empty()
                && resources.iter().all(|r| {
                    r.contains("dryrun-")
                        || r.contains(":snapshot:")
                        || r.contains(":subgrp:")
                        || r.contains(":og:")
                        || r.contains(":pg:")
                        || r.contains("::image/")
                        || r.contains(":subnet/")
                        || r.contains(":network-interface/")
                        || r.contains(":vpc/")
                        || r.contains(":document/AWS-RunShellScript")
                        || (r.contains(":security-group/") && st["Sid"] == "LaunchWith")
                });
            let by_tag = st["Condition"].to_string().contains("dryrun:run-id")
                || st["Condition"].to_string().contains("ec2:CreateAction");
            assert!(
                by_name || by_tag,
                "`{a}` in {} is neither limited to dryrun-* nor conditioned on the dryrun tags",
                st["Sid"]
            );
        }
    }
    assert!(checked >= 15, "{checked} mutating actions checked");
    for a in [
        "rds:ModifyDBInstance",
        "rds:DeleteDBInstance",
        "ec2:TerminateInstances",
    ] {
        assert!(
            deny_covers.iter().any(|d| d == a),
            "no Deny for {a} on untagged resources"
        );
    }
    // The instance: only the SSM agent's actions; nothing that reads parameters or secrets.
    let instance = load("instance-policy.json");
    for st in instance["Statement"].as_array().unwrap() {
        let actions = as_list(&st["Action"]);
        if st["Effect"] == "Deny" {
            for a in [
                "ssm:GetParameter",
                "ssm:GetParameters",
                "ssm:GetParametersByPath",
                "secretsmanager:*",
            ] {
                assert!(actions.iter().any(|x| x == a), "{a} is not denied");
            }
            continue;
        }
        for a in &actions {
            assert!(
                a.starts_with("ssmmessages:")
                    || a.starts_with("ec2messages:")
                    || a == "ssm:UpdateInstanceInformation",
                "the instance may `{a}`"
            );
        }
    }
}

#[test]
fn a_kept_copys_service_keeps_logging_redacted_after_dryrun_exits() {
    let fixtures = fixture_root();
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    write(
        &fixtures.path().join("tick.yaml"),
        "name: tick\nsecrets:\n  token:\n    env: DRYRUN_TEST_TOKEN\nresources:\n  svc:\n    type: service\n    env:\n      TOKEN: \"{{secrets.token}}\"\n    ready_timeout: 10s\n",
    );
    // A service that logs its token every 50 ms and listens on its port (readiness).
    write(
        &fixtures.path().join("releases/tick/dryrun-release.yaml"),
        "version: \"1\"\nstart: 'while :; do echo \"tick $TOKEN\"; sleep 0.05; done & exec python3 -m http.server \"$PORT\" --bind 127.0.0.1'\n",
    );
    let canary = "tick-canary-7e6d5c4b3a";
    let out = run(dryrun(state.path())
        .env("DRYRUN_TEST_TOKEN", canary)
        .arg("run")
        .arg(fixtures.path().join("tick.yaml"))
        .arg("--release")
        .arg(fixtures.path().join("releases/tick"))
        .args(["--keep", "10m"]));
    assert_eq!(out.status.code(), Some(0));
    let run_id = run_ids(state.path()).pop().unwrap();
    let log = state.path().join("runs").join(&run_id).join("logs/svc.log");
    // dryrun has exited; the kept service goes on, and so does its (redacted) log.
    let before = std::fs::metadata(&log).unwrap().len();
    std::thread::sleep(Duration::from_millis(800));
    let after = std::fs::metadata(&log).unwrap().len();
    assert!(
        after > before,
        "the kept service stopped logging ({before} → {after} bytes)"
    );
    let procs = dryrun::process::find_tagged(&run_id, Some("service.svc"));
    assert!(
        procs.iter().any(|p| p.comm == "sh"),
        "the service's loop died: {procs:?}"
    );
    let text = std::fs::read(&log).unwrap();
    assert!(String::from_utf8_lossy(&text).contains("tick [redacted]"));
    assert_no_canary("the kept service's log", &text, &canary_forms(canary));
    let out = run(dryrun(state.path()).args(["cleanup", &run_id, "--yes"]));
    assert_eq!(out.status.code(), Some(0));
    assert_nothing_left(state.path(), &run_id);
}

/// Whether `s` holds anything a terminal would act on instead of showing (line breaks and
/// tabs aside).
fn acts_on_a_terminal(s: &str) -> bool {
    s.chars().any(|c| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    })
}

#[test]
fn escape_sequences_from_a_release_never_reach_the_operators_terminal() {
    let fixtures = fixture_root();
    let state = state_dir();
    let _reaper = Reaper(state.path().to_path_buf());
    write(
        &fixtures.path().join("esc.yaml"),
        "name: esc\nresources:\n  job:\n    type: service\n",
    );
    // The release's own output: clear the screen, set the title, write the clipboard (OSC 52),
    // return over the line and reverse the text that follows.
    release(
        &fixtures.path().join("releases/esc"),
        r"printf 'x\033[2Jy\033]0;pwned\007\033]52;c;cHduZWQ=\007z\rPASSED\342\200\256w\n' >&2; exit 3",
    );
    let out = run(dryrun(state.path())
        .args(["run"])
        .arg(fixtures.path().join("esc.yaml"))
        .arg("--release")
        .arg(fixtures.path().join("releases/esc"))
        .arg("--report-dir")
        .arg(state.path().join("out")));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // report.md is shown in terminals too (`cat report.md` in a CI log).
    let md = std::fs::read_to_string(state.path().join("out/report.md")).unwrap();
    assert!(md.contains("x[2Jy]0;pwned"), "{md}");
    assert!(!acts_on_a_terminal(&md), "{md:?}");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // The output is still shown, without what would act.
    assert!(
        stdout.contains("x[2Jy]0;pwned]52;c;cHduZWQ=zPASSEDw"),
        "{stdout}"
    );
    assert!(!acts_on_a_terminal(&stdout), "{stdout:?}");
    assert!(!acts_on_a_terminal(&stderr), "{stderr:?}");
    // report.json keeps the output as the release wrote it (JSON escapes it).
    let id = &run_ids(state.path())[0];
    let report =
        std::fs::read_to_string(state.path().join("runs").join(id).join("report.json")).unwrap();
    assert!(report.contains(r"\u001b]52;c;cHduZWQ=\u0007"), "{report}");
    assert_nothing_left(state.path(), id);

    // What the release names itself with is shown everywhere: refused at its line instead.
    let hostile = fixtures.path().join("releases/hostile-version");
    write(
        &hostile.join("dryrun-release.yaml"),
        "version: \"2.0\\e]52;c;cHduZWQ=\\a\"\ninstall:\n  - name: step\n    run: 'true'\n",
    );
    let out = run(dryrun(state.path())
        .args(["run"])
        .arg(fixtures.path().join("esc.yaml"))
        .arg("--release")
        .arg(&hostile));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("dryrun-release.yaml:1:10: `version` contains control characters"),
        "{stderr}"
    );
    assert!(!acts_on_a_terminal(&stderr), "{stderr:?}");
    // A key the manifest does not know is quoted in the error: shown, without its escapes.
    write(
        &hostile.join("dryrun-release.yaml"),
        "version: \"2.0\"\n\"x\\e]52;c;cHduZWQ=\\a\": 1\ninstall: []\n",
    );
    let out = run(dryrun(state.path())
        .args(["run"])
        .arg(fixtures.path().join("esc.yaml"))
        .arg("--release")
        .arg(&hostile));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown key `x]52;c;cHduZWQ=`"), "{stderr}");
    assert!(!acts_on_a_terminal(&stderr), "{stderr:?}");
    assert_eq!(
        run_ids(state.path()).len(),
        1,
        "the refused releases created a run"
    );

    // `dryrun plan --release` reads the release's SQL and quotes what it cannot parse.
    let sql = fixtures.path().join("releases/hostile-sql");
    release(&sql, "true");
    write(
        &sql.join("migrations/0001_x.sql"),
        "CREATE INDEX i ON t (x);\nSELECT 1 '\u{1b}]52;c;cHduZWQ=\u{7}';\n",
    );
    let out = run(dryrun(state.path())
        .args(["plan", "demo/shop-pg-guards.yaml", "--release"])
        .arg(&sql)
        .current_dir(fixtures.path()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("found: ']52;c;cHduZWQ='"), "{stdout}");
    assert!(!acts_on_a_terminal(&stdout), "{stdout:?}");
    assert!(
        !acts_on_a_terminal(&String::from_utf8_lossy(&out.stderr)),
        "{out:?}"
    );
}

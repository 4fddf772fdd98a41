//! The dashboard end to end: a real `dryrun serve`, the demo blueprint, and a real headless
//! Chromium driven over WebDriver (tests/common/browser.rs); plus the same flow without
//! JavaScript, as plain HTTP form posts.

mod common;

use std::time::{Duration, Instant};

use common::browser::ChromeDriver;
use common::server::{Server, get, wait_done};
use common::*;
use fantoccini::{Client, Locator};

/// The text of the element `css` matches (it must exist).
async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no `{css}`: {e}"))
        .text()
        .await
        .unwrap()
}

/// Polls `css` until an element matches and `ok(text)` holds; tolerates the page reloading
/// under the search (the run page reloads itself when the run ends).
async fn wait_text(c: &Client, css: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(el) = c.find(Locator::Css(css)).await
            && let Ok(t) = el.text().await
        {
            if ok(&t) {
                return t;
            }
            last = t;
        }
        assert!(
            start.elapsed() < limit,
            "`{css}` still reads {last:?} after {limit:?}; page:\n{}",
            c.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_form_starts_the_demo_and_the_run_page_shows_it_passing() {
    require_demo_shop();
    let Some(driver) = ChromeDriver::start() else {
        return;
    };
    let srv = Server::start("");
    let c = driver.session().await;

    // The start form: pick the blueprint, type the release, press the button.
    c.goto(&format!("{}/", srv.url)).await.unwrap();
    assert_eq!(c.title().await.unwrap(), "Dry runs · dryrun");
    c.find(Locator::Css("select#blueprint"))
        .await
        .unwrap()
        .select_by_value("demo/shop.yaml")
        .await
        .unwrap();
    c.find(Locator::Css("input#release"))
        .await
        .unwrap()
        .send_keys("demo/releases/v2")
        .await
        .unwrap();
    c.find(Locator::Css("button#start"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The redirect lands on the run page; its script polls the API and reloads at the end.
    let start = Instant::now();
    let run_id = loop {
        let url = c.current_url().await.unwrap();
        if let Some(id) = url.path().strip_prefix("/runs/") {
            break id.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still on {url} after pressing Start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(run_id.starts_with("shop-"), "{run_id}");
    wait_text(&c, "#status", Duration::from_secs(90), |s| {
        s.eq_ignore_ascii_case("passed")
    })
    .await;
    // The reloaded page has the report: stages, checks, resources, nothing left behind.
    let stages = wait_text(&c, "#stages", Duration::from_secs(10), |_| true).await;
    for stage in [
        "compile",
        "provision",
        "restore",
        "install",
        "check",
        "teardown",
    ] {
        assert!(stages.contains(stage), "stage {stage} missing:\n{stages}");
    }
    let checks = c.find_all(Locator::Css("#checks tbody tr")).await.unwrap();
    assert_eq!(checks.len(), 10, "the demo has 10 checks");
    for row in &checks {
        let t = row.text().await.unwrap();
        assert!(t.to_lowercase().contains("passed"), "check not passed: {t}");
    }
    let checks_text = text(&c, "#checks").await;
    assert!(
        checks_text.contains("release-version-served"),
        "{checks_text}"
    );
    let left = text(&c, "#left-behind").await;
    assert_eq!(left, "Left behind: none");
    // What was masked, and where the release's mail went.
    let masking = text(&c, "#masking").await;
    assert!(
        masking.contains("customers.email")
            && masking.contains("email")
            && masking.contains("customers.name"),
        "{masking}"
    );
    let effects = text(&c, "#side-effects").await;
    assert!(
        effects.contains("Order confirmation #1") && effects.contains("@example.com"),
        "{effects}"
    );
    let firewall = text(&c, "#firewall").await;
    assert!(firewall.contains("enforced"), "{firewall}");
    // The timeline: a server-drawn SVG, one row per resource, one bar per step, laid out by the
    // browser where the report says each step ran: the app installs after the database's
    // restore ended, and that install is on the critical path.
    let rows = c
        .find_all(Locator::Css("svg#timeline g.row"))
        .await
        .unwrap();
    let mut names = Vec::new();
    for r in &rows {
        names.push(r.attr("data-resource").await.unwrap().unwrap_or_default());
    }
    assert_eq!(names, ["database.db", "bucket.uploads", "service.app"]);
    let bar = |resource: &str, step: &str| {
        format!("svg#timeline g.row[data-resource=\"{resource}\"] rect[data-step=\"{step}\"]")
    };
    let restore = c
        .find(Locator::Css(&bar("database.db", "restore")))
        .await
        .unwrap()
        .rectangle()
        .await
        .unwrap();
    let install_el = c
        .find(Locator::Css(&bar("service.app", "install")))
        .await
        .unwrap();
    let install = install_el.rectangle().await.unwrap();
    assert!(
        restore.2 > 0.0 && install.2 > 0.0,
        "{restore:?} {install:?}"
    );
    assert!(
        install.0 + 1.0 >= restore.0 + restore.2,
        "install drawn before the restore ended: {restore:?} {install:?}"
    );
    let class = install_el.attr("class").await.unwrap().unwrap_or_default();
    assert!(class.contains("critical"), "{class}");
    let tip = c
        .find(Locator::Css(&format!(
            "{} title",
            bar("service.app", "install")
        )))
        .await
        .unwrap()
        .prop("textContent")
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(
        tip.starts_with("service.app install: ") && tip.ends_with("· critical path"),
        "{tip}"
    );
    for step in ["create", "delete"] {
        assert!(
            c.find(Locator::Css(&bar("bucket.uploads", step)))
                .await
                .is_ok(),
            "{step}"
        );
    }
    // Every bar is drawn in its step's colour (an unstyled SVG shape is black).
    for r in c
        .find_all(Locator::Css("svg#timeline rect.span"))
        .await
        .unwrap()
    {
        let fill = r.css_value("fill").await.unwrap();
        let step = r.attr("data-step").await.unwrap().unwrap_or_default();
        assert!(fill != "rgb(0, 0, 0)" && !fill.is_empty(), "{step}: {fill}");
    }
    let head = text(&c, "main").await;
    assert!(
        head.contains("shop-db-2026-11-21T0300Z") && head.contains("2.0.0"),
        "backup and release are shown:\n{head}"
    );
    // No progress box or polling script once the run is over.
    assert!(c.find(Locator::Css("#progress")).await.is_err());

    let shot = driver.artifact("run-page.png");
    std::fs::write(&shot, c.screenshot().await.unwrap()).unwrap();
    eprintln!("screenshot of the finished run page: {}", shot.display());

    // A failing rehearsal of the same blueprint from the CLI on the server's state directory.
    let out = run(dryrun(srv.state()).args([
        "run",
        "blueprints/demo/shop.yaml",
        "--release",
        "blueprints/demo/releases/v3",
        "-q",
    ]));
    assert_eq!(out.status.code(), Some(1), "v3 fails");

    // Back on the index, the run is in the table.
    c.goto(&format!("{}/", srv.url)).await.unwrap();
    // The trend chart: an SVG drawn by the server, one mark per run linked to its page, the
    // passed run green and the failed one red, newest on the right, with the figures as a
    // tooltip.
    let marks = c
        .find_all(Locator::Css(
            "svg.trend-chart[data-blueprint=\"shop\"] circle.mark",
        ))
        .await
        .unwrap();
    assert_eq!(marks.len(), 2, "one mark per finished run");
    let mut xs = Vec::new();
    for (m, want) in marks.iter().zip(["passed", "failed"]) {
        let class = m.attr("class").await.unwrap().unwrap_or_default();
        assert!(class.contains(want), "{class}");
        xs.push(m.attr("cx").await.unwrap().unwrap().parse::<f64>().unwrap());
        let fill = m.css_value("fill").await.unwrap();
        assert!(!fill.is_empty() && fill != "none", "{fill}");
    }
    assert!(xs[0] < xs[1], "newest on the right: {xs:?}");
    assert_eq!(
        marks[0].attr("data-run").await.unwrap().as_deref(),
        Some(run_id.as_str())
    );
    let tip = c
        .find(Locator::Css(&format!(
            "svg.trend-chart circle[data-run=\"{run_id}\"] title"
        )))
        .await
        .unwrap()
        .html(true)
        .await
        .unwrap();
    assert!(tip.contains("passed") && tip.contains("total"), "{tip}");
    let line = c
        .find(Locator::Css(
            "svg.trend-chart[data-blueprint=\"shop\"] polyline.total",
        ))
        .await
        .unwrap()
        .attr("points")
        .await
        .unwrap()
        .unwrap_or_default();
    assert_eq!(line.split(' ').count(), 2, "{line}");
    let shot = driver.artifact("index-trend.png");
    std::fs::write(&shot, c.screenshot().await.unwrap()).unwrap();
    eprintln!(
        "screenshot of the index with the trend chart: {}",
        shot.display()
    );
    let row = c
        .find(Locator::Css(&format!("#runs tr[data-run=\"{run_id}\"]")))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        row.to_lowercase().contains("passed") && row.contains("webhook") && row.contains("2.0.0"),
        "{row}"
    );
    // A rewriting migration on PostgreSQL: its run page names the guard, the statement, the
    // lock and how long it was held, worst first.
    if have_postgres() {
        let out = run(dryrun(srv.state()).args([
            "run",
            "blueprints/demo/shop-pg-guards.yaml",
            "--release",
            "blueprints/demo/releases/pg-v4",
            "-q",
        ]));
        assert_eq!(out.status.code(), Some(1), "pg-v4 fails its guard");
        let id = run_ids(srv.state())
            .into_iter()
            .find(|id| id.starts_with("shop-pg-guards-"))
            .unwrap();
        c.goto(&format!("{}/runs/{id}", srv.url)).await.unwrap();
        let m = wait_text(&c, "#migrations", Duration::from_secs(10), |_| true).await;
        let guard = m
            .find("guard max_exclusive_lock")
            .unwrap_or_else(|| panic!("{m}"));
        let alter = m
            .find("ALTER TABLE order_events ADD COLUMN trace_id")
            .unwrap_or_else(|| panic!("{m}"));
        assert!(guard < alter, "the guard comes first:\n{m}");
        assert!(
            m.contains("held ACCESS EXCLUSIVE on order_events for") && m.contains("hint "),
            "{m}"
        );
        assert_nothing_left(srv.state(), &id);
    }
    c.close().await.unwrap();
    assert_nothing_left(srv.state(), &run_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_works_without_javascript() {
    require_demo_shop();
    let srv = Server::start("");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let index = http.get(format!("{}/", srv.url)).send().await.unwrap();
    // The page sets the cookie its form's CSRF token is bound to, as for any browser.
    let cookie = index.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let index = index.text().await.unwrap();
    let csrf = index
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    assert!(
        index.contains(r#"<form class="start" method="post" action="/ui/runs""#)
            && index.contains(r#"<option value="demo/shop.yaml">"#),
        "{index}"
    );
    // The form names the release in production too: it is rehearsed first, on its own copy.
    let form = format!(
        "blueprint=demo%2Fshop.yaml&release=demo%2Freleases%2Fv2&backup=&baseline=demo%2Freleases%2Fv2&csrf={csrf}"
    );
    let post = |site: Option<&'static str>| {
        let mut r = http
            .post(format!("{}/ui/runs", srv.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("cookie", &cookie)
            .body(form.clone());
        if let Some(s) = site {
            r = r.header("sec-fetch-site", s);
        }
        r.send()
    };
    // Another site's page cannot start a run through the visitor's browser.
    let r = post(Some("cross-site")).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        get(&format!("{}/v1/runs", srv.url)).await["runs"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // Without the page's CSRF token the form is refused.
    let r = http
        .post(format!("{}/ui/runs", srv.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", &cookie)
        .body("blueprint=demo%2Fshop.yaml&release=demo%2Freleases%2Fv2&backup=")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A baseline outside the blueprints' root is refused like a release: nothing starts.
    let r = http
        .post(format!("{}/ui/runs", srv.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", &cookie)
        .body(format!(
            "blueprint=demo%2Fshop.yaml&release=demo%2Freleases%2Fv2&baseline=%2Fetc&csrf={csrf}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("Not started: "));
    assert_eq!(
        get(&format!("{}/v1/runs", srv.url)).await["runs"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // A plain form post answers 303 to the run page.
    let r = post(None).await.unwrap();
    assert_eq!(r.status(), 303);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let run_id = location.strip_prefix("/runs/").unwrap().to_string();
    let page = http
        .get(format!("{}{location}", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(page.contains(&run_id));
    if page.contains("status queued") || page.contains("status running") {
        // While it runs, the page refreshes itself when scripts are off.
        assert!(
            page.contains(r#"<noscript><meta http-equiv="refresh" content="2"></noscript>"#),
            "{page}"
        );
    }
    wait_done(&srv.url, &run_id, Duration::from_secs(90)).await;
    let page = http
        .get(format!("{}{location}", srv.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"class="status passed" id="status""#),
        "{page}"
    );
    assert!(page.contains(r#"<table id="stages">"#) && page.contains(r#"<table id="checks">"#));
    assert!(
        page.contains(r#"<p id="left-behind">Left behind: none</p>"#),
        "{page}"
    );
    assert!(
        !page.contains("http-equiv=\"refresh\""),
        "a finished run stops refreshing"
    );
    assert!(
        page.contains(&format!("(run {run_id}-baseline): passed")),
        "{page}"
    );
    assert_nothing_left(srv.state(), &run_id);
    assert_nothing_left(srv.state(), &format!("{run_id}-baseline"));
}

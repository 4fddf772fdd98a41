//! Packaging for operators (packaging/, docs/operating.md): every `dryrun` command line in the
//! container image, the compose file, the systemd unit and the CI example goes through the real
//! CLI parser; the example config through the server's own loader; the unit through
//! `systemd-analyze verify`; the YAML files through a YAML parser, with the facts their comments
//! promise. Not covered here (no Docker daemon and no registry on CI): building the image and
//! running the compose file. docs/operating.md, "What CI checks here", says the same.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use marked_yaml::Node;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};

// ---- helpers: files --------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dryrun"))
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

// ---- helpers: shell words --------------------------------------------------------------------

/// Splits a shell command line into words, the way `sh` would before expansion (the
/// `shell-words` crate: quotes and backslashes; variables stay unexpanded, `"$RELEASE_DIR"` is
/// the word `$RELEASE_DIR`). The words stop at a comment (`#` starting a word) and at the first
/// control operator (`|`, `||`, `&&`, `;`, `&`) or redirection.
fn shell_words(line: &str) -> Vec<String> {
    let mut words =
        shell_words::split(line).unwrap_or_else(|e| panic!("cannot split {line:?}: {e}"));
    let end = words
        .iter()
        .position(|w| {
            w.starts_with('#')
                || ["|", "||", "&&", ";", "&"].contains(&w.as_str())
                || w.starts_with('>')
                || w.starts_with('<')
                || w.starts_with("2>")
        })
        .unwrap_or(words.len());
    words.truncate(end);
    words
}

/// Lines of a shell script with `\`-continued lines joined.
fn script_lines(script: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in script.lines() {
        if let Some(head) = line.trim_end().strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(line);
            lines.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

#[test]
fn shell_words_split_like_sh() {
    assert_eq!(
        shell_words(r#"dryrun run "$B" --release 'a b' --x=y\ z # comment"#),
        ["dryrun", "run", "$B", "--release", "a b", "--x=y z"]
    );
    assert_eq!(shell_words("dryrun runs || true"), ["dryrun", "runs"]);
    assert_eq!(shell_words(r#"echo "it's" > f"#), ["echo", "it's"]);
    assert!(shell_words("   # only a comment").is_empty());
    assert_eq!(script_lines("a \\\n  b\nc\n"), ["a    b", "c"]);
}

// ---- helpers: YAML ---------------------------------------------------------------------------

fn yaml(rel: &str) -> Node {
    marked_yaml::parse_yaml(0, read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn map<'a>(node: &'a Node, what: &str) -> &'a MarkedMappingNode {
    node.as_mapping()
        .unwrap_or_else(|| panic!("{what} is not a mapping"))
}

fn get<'a>(m: &'a MarkedMappingNode, key: &str, what: &str) -> &'a Node {
    m.get_node(key)
        .unwrap_or_else(|| panic!("{what} has no `{key}`"))
}

fn scalar<'a>(node: &'a Node, what: &str) -> &'a str {
    node.as_scalar()
        .map(MarkedScalarNode::as_str)
        .unwrap_or_else(|| panic!("{what} is not a single value"))
}

fn scalars(node: &Node, what: &str) -> Vec<String> {
    node.as_sequence()
        .unwrap_or_else(|| panic!("{what} is not a list"))
        .iter()
        .map(|n| scalar(n, what).to_string())
        .collect()
}

// ---- helpers: Dockerfile ---------------------------------------------------------------------

/// One Dockerfile instruction: its keyword in upper case and the rest, continued lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// A build stage: `FROM … AS name` and what follows it up to the next `FROM`.
#[derive(Debug)]
struct Stage {
    name: Option<String>,
    from: String,
    instructions: Vec<Instruction>,
}

fn dockerfile_stages() -> Vec<Stage> {
    let text = read("packaging/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Comment lines (also inside a continued instruction) and blank lines carry nothing.
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((current.as_str(), ""));
        instructions.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
        current.clear();
    }
    assert!(
        current.is_empty(),
        "packaging/Dockerfile ends inside a continued instruction"
    );
    let mut stages: Vec<Stage> = Vec::new();
    for ins in instructions {
        if ins.keyword == "FROM" {
            let words: Vec<&str> = ins
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_string()),
                [_] => None,
                _ => panic!("FROM {} is not `FROM IMAGE [AS NAME]`", ins.args),
            };
            stages.push(Stage {
                name,
                from: words[0].to_string(),
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("{} before the first FROM", ins.keyword))
                .instructions
                .push(ins);
        }
    }
    stages
}

impl Stage {
    /// The last instruction with this keyword, if any.
    fn last(&self, keyword: &str) -> Option<&Instruction> {
        self.instructions
            .iter()
            .rev()
            .find(|i| i.keyword == keyword)
    }

    /// The exec form (`["a", "b"]`) of the last instruction with this keyword.
    fn exec_form(&self, keyword: &str) -> Vec<String> {
        let ins = self
            .last(keyword)
            .unwrap_or_else(|| panic!("the runtime stage has no {keyword}"));
        serde_json::from_str(&ins.args).unwrap_or_else(|e| {
            panic!(
                "{keyword} {} is not the exec form [\"…\", …]: {e}",
                ins.args
            )
        })
    }
}

// ---- the command lines -----------------------------------------------------------------------

/// A `dryrun` command line found in a packaging file: where it is, and its arguments after the
/// program name.
#[derive(Debug)]
struct CommandLine {
    origin: String,
    args: Vec<String>,
}

fn is_dryrun(program: &str) -> bool {
    program == "dryrun" || program.ends_with("/dryrun")
}

/// The image's ENTRYPOINT, and ENTRYPOINT + CMD.
fn dockerfile_command() -> (Vec<String>, CommandLine) {
    let stages = dockerfile_stages();
    let runtime = stages.last().expect("a FROM");
    let entrypoint = runtime.exec_form("ENTRYPOINT");
    let cmd = runtime.exec_form("CMD");
    assert!(
        entrypoint.first().is_some_and(|p| is_dryrun(p)),
        "ENTRYPOINT {entrypoint:?} does not start dryrun"
    );
    let args = entrypoint[1..].iter().chain(cmd.iter()).cloned().collect();
    (
        entrypoint,
        CommandLine {
            origin: "packaging/Dockerfile ENTRYPOINT + CMD".into(),
            args,
        },
    )
}

/// The compose service's command, when it sets one (else it runs the image's CMD, checked as
/// the Dockerfile's).
fn compose_command() -> Option<CommandLine> {
    let doc = yaml("packaging/compose.yaml");
    let services = map(
        get(map(&doc, "compose.yaml"), "services", "compose.yaml"),
        "services",
    );
    let dryrun = map(get(services, "dryrun", "services"), "services.dryrun");
    assert!(
        dryrun.get_node("entrypoint").is_none(),
        "services.dryrun overrides the image's ENTRYPOINT; teach this test to read it"
    );
    let command = dryrun.get_node("command")?;
    let words = match command.as_scalar() {
        Some(s) => shell_words(s.as_str()),
        None => scalars(command, "services.dryrun.command"),
    };
    let (entrypoint, _) = dockerfile_command();
    Some(CommandLine {
        origin: "packaging/compose.yaml services.dryrun.command".into(),
        args: entrypoint[1..].iter().cloned().chain(words).collect(),
    })
}

/// The unit's `ExecStart=` (exactly one), with systemd's prefixes (`-`, `@`, `+`, `!`, `:`) off.
fn unit_command() -> CommandLine {
    let unit = read("packaging/dryrun.service");
    let starts: Vec<String> = script_lines(&unit)
        .into_iter()
        .filter_map(|l| l.trim().strip_prefix("ExecStart=").map(str::to_string))
        .collect();
    assert_eq!(starts.len(), 1, "dryrun.service: one ExecStart= expected");
    let line = starts[0].trim_start_matches(['-', '@', '+', '!', ':']);
    let words = shell_words(line);
    assert!(
        words.first().is_some_and(|p| is_dryrun(p)),
        "ExecStart={line} does not start dryrun"
    );
    CommandLine {
        origin: "packaging/dryrun.service ExecStart".into(),
        args: words[1..].to_vec(),
    }
}

/// The workflow's steps (of every job).
fn workflow_steps() -> Vec<MarkedMappingNode> {
    let doc = yaml("packaging/github-actions/dryrun.yml");
    let jobs = map(get(map(&doc, "dryrun.yml"), "jobs", "dryrun.yml"), "jobs");
    let mut steps = Vec::new();
    for (name, job) in jobs.iter() {
        let what = format!("jobs.{}", name.as_str());
        let list = get(map(job, &what), "steps", &what)
            .as_sequence()
            .unwrap_or_else(|| panic!("{what}.steps is not a list"));
        for step in list.iter() {
            steps.push(map(step, &format!("a step of {what}")).clone());
        }
    }
    steps
}

/// Every line of the workflow's `run:` scripts that starts dryrun.
fn workflow_commands() -> Vec<CommandLine> {
    let mut found = Vec::new();
    for step in workflow_steps() {
        let Some(run) = step.get_node("run") else {
            continue;
        };
        for line in script_lines(scalar(run, "a step's run")) {
            let words = shell_words(&line);
            if words.first().is_some_and(|p| is_dryrun(p)) {
                found.push(CommandLine {
                    origin: format!("packaging/github-actions/dryrun.yml: {}", line.trim()),
                    args: words[1..].to_vec(),
                });
            }
        }
    }
    assert!(!found.is_empty(), "the workflow runs no dryrun command");
    found
}

/// The value of `--flag VALUE` or `--flag=VALUE` in a command line.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&prefix)
        }
    })
}

/// Replaces the value of `--flag VALUE` or `--flag=VALUE`; false when the flag is absent.
fn replace_flag_value(args: &mut [String], flag: &str, value: &str) -> bool {
    if let Some(i) = args.iter().position(|a| a == flag)
        && i + 1 < args.len()
    {
        args[i + 1] = value.to_string();
        return true;
    }
    let prefix = format!("{flag}=");
    if let Some(a) = args.iter_mut().find(|a| a.starts_with(&prefix)) {
        *a = format!("{prefix}{value}");
        return true;
    }
    false
}

/// Whether `--help` output names `flag` as a whole word (not as part of a longer flag).
fn mentions_flag(help: &str, flag: &str) -> bool {
    let part_of_flag = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '-');
    help.match_indices(flag).any(|(i, _)| {
        !part_of_flag(help[..i].chars().next_back())
            && !part_of_flag(help[i + flag.len()..].chars().next())
    })
}

/// Runs `cmd` with stdout and stderr in files under `dir`; kills it after 60 s.
fn run_bounded(cmd: &mut Command, dir: &Path) -> (Option<i32>, String) {
    let err_path = dir.join("stderr.txt");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("stdout.txt")).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("start dryrun");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dryrun {:?} did not stop within 60 s", cmd.get_args());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&err_path).unwrap())
}

/// The real CLI parser accepts the command line. There is no parse-only mode, so the command
/// runs for real with its one input that would do something pointed at a file that does not
/// exist (`serve --config`, `run BLUEPRINT`): it gets past clap, then stops at reading that
/// file with exit 2 and dryrun's own message, having created nothing. A renamed or removed
/// flag makes clap refuse the line instead ("unexpected argument … For more information, try
/// '--help'."), which fails the test.
fn assert_cli_accepts(cl: &CommandLine) {
    let sub = cl
        .args
        .first()
        .unwrap_or_else(|| panic!("{}: no subcommand", cl.origin))
        .clone();
    let tmp = tempfile::tempdir().unwrap();
    let absent = tmp.path().join("absent");
    let absent = absent.to_str().unwrap();
    let mut args = cl.args.clone();
    let expected = match sub.as_str() {
        "serve" => {
            assert!(
                replace_flag_value(&mut args, "--config", absent),
                "{}: `dryrun serve` without --config; this test needs one to stop the server before it listens",
                cl.origin
            );
            format!("cannot read config {absent}")
        }
        "run" => {
            assert!(
                args.get(1).is_some_and(|b| !b.starts_with('-')),
                "{}: put the blueprint right after `run`",
                cl.origin
            );
            args[1] = absent.to_string();
            format!("cannot read blueprint {absent}")
        }
        other => panic!(
            "{}: `dryrun {other}`: teach assert_cli_accepts how to stop it harmlessly after parsing",
            cl.origin
        ),
    };
    let (code, stderr) = run_bounded(
        Command::new(bin())
            .args(&args)
            .current_dir(tmp.path())
            .env("DRYRUN_STATE_DIR", tmp.path().join("state"))
            .env("NO_COLOR", "1")
            .env_remove("DRYRUN_DATABASE_URL")
            .env_remove("DRYRUN_WEBHOOK_SECRET")
            .env_remove("DRYRUN_LOG"),
        tmp.path(),
    );
    assert!(
        !stderr.contains("For more information, try") && !stderr.contains("Usage: dryrun"),
        "{}: the CLI refuses `dryrun {}`:\n{stderr}",
        cl.origin,
        cl.args.join(" ")
    );
    assert!(
        stderr.contains(&expected) && code == Some(2),
        "{}: expected `dryrun {}` to get past the parser and stop with exit 2 at `{expected}`; got exit {code:?}:\n{stderr}",
        cl.origin,
        args.join(" ")
    );
    // And each flag is one the subcommand documents (global flags are listed there too).
    let help = Command::new(bin())
        .args([sub.as_str(), "--help"])
        .env("NO_COLOR", "1")
        .output()
        .expect("dryrun --help");
    assert!(help.status.success(), "dryrun {sub} --help failed");
    let help = String::from_utf8_lossy(&help.stdout);
    for a in cl.args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(
            mentions_flag(&help, flag),
            "{}: `dryrun {sub} --help` does not list {flag}",
            cl.origin
        );
    }
}

// ---- a. every dryrun command line is accepted by the real CLI --------------------------------

#[test]
fn every_dryrun_command_line_in_packaging_is_accepted_by_the_cli() {
    let mut lines = vec![dockerfile_command().1, unit_command()];
    lines.extend(compose_command());
    lines.extend(workflow_commands());
    for cl in &lines {
        eprintln!("checking {}: dryrun {}", cl.origin, cl.args.join(" "));
        assert_cli_accepts(cl);
    }
}

// ---- b. the systemd unit ---------------------------------------------------------------------

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("skipped: /usr/bin/systemd-analyze is absent, the unit cannot be verified here");
        return;
    }
    // `verify` checks that ExecStart's program exists: point it at the binary under test.
    let bin = bin();
    let bin = bin.to_str().unwrap();
    assert!(
        !bin.contains(char::is_whitespace),
        "the test binary's path {bin:?} has a space; systemd would split it"
    );
    let unit = read("packaging/dryrun.service");
    let mut text = String::new();
    let mut rewritten = 0;
    for line in unit.lines() {
        if let Some(rest) = line.strip_prefix("ExecStart=/usr/local/bin/dryrun ") {
            text.push_str(&format!("ExecStart={bin} {rest}\n"));
            rewritten += 1;
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    assert_eq!(
        rewritten, 1,
        "dryrun.service: expected one `ExecStart=/usr/local/bin/dryrun …` line"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dryrun.service");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("systemd-analyze verify said:\n{said}");
    // It exits 0 even for unknown keys and bad values; what it says about the file is the verdict.
    let about_the_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("dryrun.service"))
        .collect();
    assert!(
        about_the_unit.is_empty() && out.status.success(),
        "systemd-analyze verify objects to packaging/dryrun.service ({}):\n{}",
        out.status,
        about_the_unit.join("\n")
    );
}

#[test]
fn the_systemd_unit_waits_longer_than_the_shutdown_grace_and_runs_unprivileged() {
    let unit = read("packaging/dryrun.service");
    let setting = |key: &str| -> Option<String> {
        let prefix = format!("{key}=");
        unit.lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(&prefix))
            .map(str::to_string)
    };
    assert_eq!(setting("KillSignal").as_deref(), Some("SIGTERM"));
    assert_eq!(
        setting("KillMode").as_deref(),
        Some("mixed"),
        "SIGTERM to dryrun alone"
    );
    let stop = setting("TimeoutStopSec").expect("TimeoutStopSec=");
    let stop =
        humantime::parse_duration(&stop).unwrap_or_else(|e| panic!("TimeoutStopSec={stop}: {e}"));
    let default_grace = dryrun::server::Config::default().shutdown_grace;
    let example_grace = example_config().shutdown_grace;
    assert!(
        stop > default_grace && stop > example_grace,
        "TimeoutStopSec ({stop:?}) must outlast shutdown_grace ({default_grace:?} by default, {example_grace:?} in packaging/dryrun.toml)"
    );
    let user = setting("User").expect("User=");
    assert!(user != "root" && user != "0", "User={user}");
    assert_eq!(setting("CapabilityBoundingSet").as_deref(), Some(""));
    assert_eq!(setting("AmbientCapabilities").as_deref(), Some(""));
    assert_eq!(
        setting("Environment").as_deref(),
        Some("DRYRUN_STATE_DIR=/var/lib/dryrun")
    );
    assert_eq!(setting("StateDirectory").as_deref(), Some("dryrun"));
    assert_eq!(setting("StateDirectoryMode").as_deref(), Some("0700"));
}

// ---- c. compose and the workflow -------------------------------------------------------------

/// `"${VAR:?message}"`: a variable compose must be given, without a default.
fn is_required_variable(value: &str) -> bool {
    value.starts_with("${") && value.ends_with('}') && value.contains(":?")
}

/// Splits a short-syntax volume `SOURCE:TARGET[:MODE]`; a `${…}` source may hold colons.
fn split_volume(spec: &str) -> (String, String, String) {
    let (source, rest) = if spec.starts_with("${") {
        let end = spec
            .find('}')
            .unwrap_or_else(|| panic!("volume {spec}: unterminated ${{"));
        (&spec[..=end], &spec[end + 1..])
    } else {
        let colon = spec
            .find(':')
            .unwrap_or_else(|| panic!("volume {spec}: no target"));
        (&spec[..colon], &spec[colon..])
    };
    let rest = rest
        .strip_prefix(':')
        .unwrap_or_else(|| panic!("volume {spec}: no target"));
    let (target, mode) = rest.split_once(':').unwrap_or((rest, ""));
    (source.to_string(), target.to_string(), mode.to_string())
}

#[test]
fn the_compose_file_parses_and_keeps_its_promises() {
    let doc = yaml("packaging/compose.yaml");
    let services = map(
        get(map(&doc, "compose.yaml"), "services", "compose.yaml"),
        "services",
    );
    let postgres = map(get(services, "postgres", "services"), "services.postgres");
    let dryrun = map(get(services, "dryrun", "services"), "services.dryrun");

    // The database says when it is ready, and dryrun waits for that.
    let health = map(
        get(postgres, "healthcheck", "postgres"),
        "postgres.healthcheck",
    );
    let test = scalars(
        get(health, "test", "postgres.healthcheck"),
        "healthcheck.test",
    );
    assert!(test.iter().any(|w| w == "pg_isready"), "{test:?}");
    let depends = map(get(dryrun, "depends_on", "dryrun"), "dryrun.depends_on");
    let on_pg = map(
        get(depends, "postgres", "depends_on"),
        "depends_on.postgres",
    );
    assert_eq!(
        scalar(get(on_pg, "condition", "depends_on.postgres"), "condition"),
        "service_healthy"
    );

    // The image is built from the repository with packaging/Dockerfile.
    let build = map(get(dryrun, "build", "dryrun"), "dryrun.build");
    assert_eq!(scalar(get(build, "context", "build"), "context"), "..");
    assert_eq!(
        scalar(get(build, "dockerfile", "build"), "dockerfile"),
        "packaging/Dockerfile"
    );

    // Published on the host's loopback only.
    let ports = scalars(get(dryrun, "ports", "dryrun"), "dryrun.ports");
    assert!(!ports.is_empty());
    for p in &ports {
        assert!(
            p.starts_with("127.0.0.1:"),
            "port {p} is not bound to 127.0.0.1"
        );
    }

    // Blueprints and config read-only; state in a volume.
    let volumes: Vec<(String, String, String)> =
        scalars(get(dryrun, "volumes", "dryrun"), "dryrun.volumes")
            .iter()
            .map(|v| split_volume(v))
            .collect();
    let mount = |target: &str| {
        volumes
            .iter()
            .find(|(_, t, _)| t == target)
            .unwrap_or_else(|| panic!("nothing is mounted at {target}"))
    };
    let (_, _, mode) = mount("/srv/blueprints");
    assert!(
        mode.split(',').any(|m| m == "ro"),
        "blueprints are mounted {mode:?}"
    );
    let (source, _, mode) = mount("/etc/dryrun/dryrun.toml");
    assert!(
        mode.split(',').any(|m| m == "ro"),
        "the config is mounted {mode:?}"
    );
    assert!(
        root().join("packaging").join(source).is_file(),
        "the config mount's source {source} is not a file next to compose.yaml"
    );
    mount("/var/lib/dryrun");

    // Locked down.
    assert_eq!(
        scalar(get(dryrun, "read_only", "dryrun"), "read_only"),
        "true"
    );
    assert!(scalars(get(dryrun, "tmpfs", "dryrun"), "tmpfs").contains(&"/tmp".to_string()));
    assert_eq!(
        scalars(get(dryrun, "cap_drop", "dryrun"), "cap_drop"),
        ["ALL"]
    );
    assert!(
        scalars(get(dryrun, "security_opt", "dryrun"), "security_opt")
            .contains(&"no-new-privileges:true".to_string())
    );
    let grace = scalar(
        get(dryrun, "stop_grace_period", "dryrun"),
        "stop_grace_period",
    );
    let grace = humantime::parse_duration(grace).unwrap();
    assert!(
        grace > example_config().shutdown_grace,
        "stop_grace_period must outlast shutdown_grace"
    );

    // No secret is written in the file: each is a variable compose must be given.
    for (service, svc) in [("postgres", postgres), ("dryrun", dryrun)] {
        let env = map(get(svc, "environment", service), "environment");
        for (key, value) in env.iter() {
            let key = key.as_str();
            let value = scalar(value, key);
            if ["PASSWORD", "SECRET", "TOKEN"]
                .iter()
                .any(|s| key.contains(*s))
            {
                assert!(
                    is_required_variable(value),
                    "{service}: {key} holds a literal value"
                );
            }
            if let Some((_, after_scheme)) = value.split_once("://")
                && let Some((userinfo, _)) = after_scheme.split_once('@')
                && let Some((_, password)) = userinfo.split_once(':')
            {
                assert!(
                    is_required_variable(password),
                    "{service}: {key} has a literal password"
                );
            }
        }
    }
    let dryrun_env = map(get(dryrun, "environment", "dryrun"), "environment");
    let url = scalar(
        get(dryrun_env, "DRYRUN_DATABASE_URL", "dryrun.environment"),
        "url",
    );
    assert!(
        url.starts_with("postgres://") && url.contains("@postgres:5432/"),
        "{url}"
    );
    // Every variable the config reads is given.
    let cfg = example_config();
    let mut needed = vec![cfg.webhook.secret_env.clone()];
    needed.extend(cfg.auth.tokens.iter().filter_map(|t| t.env.clone()));
    for var in needed {
        assert!(
            dryrun_env.get_node(&var).is_some(),
            "dryrun.toml reads {var}, which compose does not set"
        );
    }
}

#[test]
fn the_ci_workflow_parses_and_uploads_the_report() {
    let doc = yaml("packaging/github-actions/dryrun.yml");
    let on = get(map(&doc, "dryrun.yml"), "on", "dryrun.yml");
    let triggers: Vec<String> = match on {
        Node::Scalar(s) => vec![s.as_str().to_string()],
        Node::Sequence(_) => scalars(on, "on"),
        Node::Mapping(m) => m.keys().map(|k| k.as_str().to_string()).collect(),
    };
    assert!(
        triggers.iter().any(|t| t == "pull_request"),
        "on: {triggers:?}"
    );

    let runs = workflow_commands();
    let report_dirs: Vec<&str> = runs
        .iter()
        .filter(|c| c.args.first().is_some_and(|s| s == "run"))
        .filter_map(|c| flag_value(&c.args, "--report-dir"))
        .collect();
    let [report_dir] = report_dirs.as_slice() else {
        panic!("expected one `dryrun run … --report-dir DIR`, found {report_dirs:?}");
    };
    let report_dir = report_dir.trim_end_matches('/');

    let steps = workflow_steps();
    let always = |s: &MarkedMappingNode| {
        s.get_node("if")
            .and_then(Node::as_scalar)
            .is_some_and(|v| v.as_str().contains("always()"))
    };
    // The report directory (report.json, junit.xml, report.md) is uploaded whatever happened.
    let upload = steps
        .iter()
        .find(|s| {
            s.get_node("uses")
                .and_then(Node::as_scalar)
                .is_some_and(|u| u.as_str().starts_with("actions/upload-artifact@"))
        })
        .expect("a step that uses actions/upload-artifact");
    assert!(always(upload), "the upload must run `if: always()`");
    let with = map(get(upload, "with", "the upload step"), "with");
    let paths = scalar(get(with, "path", "the upload step's with"), "path");
    assert!(
        paths
            .lines()
            .any(|p| p.trim().trim_end_matches('/') == report_dir),
        "the upload's path {paths:?} is not the report directory {report_dir}"
    );
    // report.md goes to the job summary, also after a failure.
    assert!(
        steps.iter().any(|s| always(s)
            && s.get_node("run")
                .and_then(Node::as_scalar)
                .is_some_and(|r| {
                    r.as_str().contains(&format!("{report_dir}/report.md"))
                        && r.as_str().contains("GITHUB_STEP_SUMMARY")
                })),
        "no `if: always()` step appends {report_dir}/report.md to $GITHUB_STEP_SUMMARY"
    );
    // The dryrun step keeps its exit code, and the last step fails the job with it.
    let id = steps
        .iter()
        .find(|s| {
            s.get_node("run")
                .and_then(Node::as_scalar)
                .is_some_and(|r| r.as_str().contains("--report-dir"))
        })
        .and_then(|s| s.get_node("id"))
        .map(|n| scalar(n, "id").to_string())
        .expect("the dryrun step has an id");
    let last = steps.last().unwrap();
    assert!(always(last), "the last step must run `if: always()`");
    let env = map(get(last, "env", "the last step"), "env");
    assert!(
        env.values().any(|v| v
            .as_scalar()
            .is_some_and(|v| v.as_str().contains(&format!("steps.{id}.outputs."))))
            && scalar(get(last, "run", "the last step"), "run").contains("exit"),
        "the last step does not exit with the dryrun step's code"
    );
}

// ---- d. the example config -------------------------------------------------------------------

fn example_config() -> dryrun::server::Config {
    let path = root().join("packaging/dryrun.toml");
    dryrun::server::Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_example_config_is_accepted_by_the_server_config_loader() {
    let cfg = example_config();
    // What the image's CMD passes agrees with the file, and listening beyond loopback has a
    // token (the loader refuses it otherwise; checked here so the message is plain).
    let (_, cmd) = dockerfile_command();
    assert_eq!(flag_value(&cmd.args, "--listen"), Some(cfg.listen.as_str()));
    assert_eq!(
        flag_value(&cmd.args, "--blueprints").map(PathBuf::from),
        cfg.blueprints
    );
    assert!(
        !cfg.auth.tokens.is_empty(),
        "listen = {} needs [[auth.tokens]]",
        cfg.listen
    );
    // Secrets come from the environment only.
    assert!(
        cfg.database_url.is_none(),
        "the database URL belongs in DRYRUN_DATABASE_URL"
    );
    assert!(cfg.auth.tokens.iter().all(|t| t.env.is_some()));
}

// ---- e. the Dockerfile -----------------------------------------------------------------------

#[test]
fn the_dockerfile_builds_in_two_stages_and_runs_unprivileged() {
    let stages = dockerfile_stages();
    assert!(
        stages.len() >= 2,
        "expected a build stage and a runtime stage"
    );
    let (runtime, builders) = stages.split_last().unwrap();
    assert_eq!(runtime.from, "debian:bookworm-slim");
    assert!(
        builders.iter().any(|s| s.from.starts_with("rust:")),
        "no stage builds with the Rust image"
    );
    let build_names: Vec<&str> = builders.iter().filter_map(|s| s.name.as_deref()).collect();

    // The binary comes from a build stage; the toolchain stays behind.
    let copies_binary = runtime.instructions.iter().any(|i| {
        i.keyword == "COPY"
            && i.args.split_whitespace().any(|w| {
                w.strip_prefix("--from=")
                    .is_some_and(|from| build_names.contains(&from))
            })
    });
    assert!(
        copies_binary,
        "the runtime stage copies nothing --from a build stage"
    );
    let builds = builders
        .iter()
        .flat_map(|s| &s.instructions)
        .any(|i| i.keyword == "RUN" && i.args.contains("cargo build --release --locked -p dryrun"));
    assert!(
        builds,
        "no build stage runs `cargo build --release --locked -p dryrun`"
    );

    // Runs as an ordinary user.
    let user = runtime.last("USER").expect("the runtime stage sets USER");
    let name = user.args.split(':').next().unwrap().trim();
    assert!(
        !name.is_empty() && name != "root" && name != "0",
        "USER {}",
        user.args
    );

    // State and ports as the docs say.
    assert!(
        runtime
            .instructions
            .iter()
            .any(|i| i.keyword == "ENV" && i.args.contains("DRYRUN_STATE_DIR=/var/lib/dryrun")),
        "ENV DRYRUN_STATE_DIR=/var/lib/dryrun"
    );
    let (_, cmd) = dockerfile_command();
    let listen = flag_value(&cmd.args, "--listen").expect("CMD passes --listen");
    let port = listen.rsplit(':').next().unwrap();
    let expose = runtime.last("EXPOSE").expect("EXPOSE");
    assert!(
        expose
            .args
            .split_whitespace()
            .any(|p| p.split('/').next() == Some(port)),
        "EXPOSE {} does not include the listen port {port}",
        expose.args
    );
    // The health check asks the unauthenticated /healthz on the port the server listens on.
    if let Some(check) = runtime.last("HEALTHCHECK") {
        assert!(
            check.args.contains("/healthz") && check.args.contains(&format!("/{port} ")),
            "HEALTHCHECK {} does not ask /healthz on port {port}",
            check.args
        );
    }
}

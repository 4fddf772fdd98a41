//! Text → [`Blueprint`], collecting every diagnostic before giving up.
//!
//! The YAML is parsed once into marked nodes (line/column on every value). Each section and
//! each item in it is then deserialized on its own, so one broken resource does not hide the
//! problems of the next; cross-references (`depends_on`, template references, check targets)
//! and cycles are checked last, over whatever parsed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use marked_yaml::{Marker, Node, Spanned};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::diag::{Diagnostic, Diagnostics, SourceMap, did_you_mean, find_key};
use super::template::{self, Position};
use super::{
    AwsSettings, Blueprint, BucketSpec, Check, CheckSpec, DatabaseSpec, Engine, LocalSettings,
    ParamRule, Resource, ResourceSpec, SecretSource, ServiceAws, ServiceSpec, TeardownPolicy,
    Template,
};

/// Why a blueprint did not compile.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The file could not be read.
    #[error("cannot read blueprint {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The blueprint has errors; all of them are in here.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// Limits that keep a hostile or broken file from exhausting the tool.
const MAX_BLUEPRINT_BYTES: usize = 1 << 20;
const MAX_RESOURCES: usize = 200;
const MAX_CHECKS: usize = 500;
/// A check's `repeat` at most (each repetition is a request against the copy).
const MAX_REPEAT: u32 = 1000;

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "params",
    "secrets",
    "providers",
    "resources",
    "checks",
    "teardown",
    "ttl",
    "masking",
    "pii_gate",
    "firewall",
    "guards",
    "migration_trace",
    "budget",
];
const KINDS: &[&str] = &["database", "bucket", "service"];
const CHECK_KINDS: &[&str] = &["http", "command", "sql", "mail"];
const ENGINES: &[&str] = &[
    "sqlite",
    "postgres",
    "mysql",
    "mariadb",
    "aurora-postgresql",
    "aurora-mysql",
];

/// Reads and compiles a blueprint file with `--param` values.
///
/// # Errors
/// [`CompileError::Read`] if the file cannot be read, [`CompileError::Invalid`] with every
/// diagnostic otherwise.
pub fn compile_file(
    path: &Path,
    params: &BTreeMap<String, String>,
) -> Result<Blueprint, CompileError> {
    let text = std::fs::read_to_string(path).map_err(|source| CompileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    compile(path, &text, params)
}

/// Compiles blueprint text. `path` names the file in diagnostics and anchors relative paths.
///
/// # Errors
/// [`CompileError::Invalid`] with every diagnostic found.
pub fn compile(
    path: &Path,
    text: &str,
    params: &BTreeMap<String, String>,
) -> Result<Blueprint, CompileError> {
    let mut c = Compiler {
        map: SourceMap::new(text),
        diags: Vec::new(),
    };
    let bp = c.run(path, text, params);
    if c.diags.is_empty()
        && let Some(bp) = bp
    {
        return Ok(bp);
    }
    let mut items = c.diags;
    items.sort_by_key(|d| (d.line, d.col));
    items.dedup();
    Err(CompileError::Invalid(Diagnostics {
        file: path.display().to_string(),
        source: text.to_string(),
        items,
    }))
}

// ----- raw, spanned shapes (private: only the compiled model leaves this module) -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    description: Option<String>,
    default: Option<String>,
    #[serde(default)]
    required: bool,
    pattern: Option<Spanned<String>>,
    values: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    env: Spanned<String>,
    #[allow(dead_code)]
    description: Option<String>,
    default: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProviders {
    local: Option<RawLocal>,
    aws: Option<RawAws>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAws {
    region: Option<Spanned<String>>,
    vpc_id: Option<Spanned<String>>,
    db_subnet_group: Option<Spanned<String>>,
    db_instance_class: Option<Spanned<String>>,
    instance_profile: Option<Spanned<String>>,
    #[serde(default)]
    runner_in_vpc: bool,
    runner_cidr: Option<Spanned<String>>,
    restore_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceAws {
    ami: Spanned<String>,
    instance_type: Option<Spanned<String>>,
    subnet_id: Option<Spanned<String>>,
    port: Option<u16>,
    user_data: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    backups: Option<String>,
    buckets: Option<String>,
    #[serde(default)]
    pass_env: Vec<Spanned<String>>,
    cache: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    #[serde(rename = "type")]
    _kind: String,
    engine: Spanned<String>,
    source: Spanned<String>,
    database: Option<String>,
    backup: Option<String>,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucket {
    #[serde(rename = "type")]
    _kind: String,
    source: Spanned<String>,
    prefix: Option<String>,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(rename = "type")]
    _kind: String,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    start: Option<Spanned<String>>,
    ready_timeout: Option<Spanned<String>>,
    aws: Option<RawServiceAws>,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(rename = "type")]
    _kind: String,
    name: Spanned<String>,
    url: Spanned<String>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    body: Option<Spanned<String>>,
    #[serde(default)]
    expect: RawHttpExpect,
    timeout: Option<Spanned<String>>,
    retries: Option<u32>,
    interval: Option<Spanned<String>>,
    repeat: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttpExpect {
    status: Option<u16>,
    body_contains: Option<String>,
    #[serde(default)]
    json: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    #[serde(rename = "type")]
    _kind: String,
    name: Spanned<String>,
    run: Spanned<String>,
    #[serde(default)]
    expect: RawCommandExpect,
    timeout: Option<Spanned<String>>,
    retries: Option<u32>,
    interval: Option<Spanned<String>>,
    repeat: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCommandExpect {
    exit_code: Option<i32>,
    output_contains: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSql {
    #[serde(rename = "type")]
    _kind: String,
    name: Spanned<String>,
    database: Spanned<String>,
    query: Spanned<String>,
    #[serde(default)]
    expect: RawSqlExpect,
    timeout: Option<Spanned<String>>,
    retries: Option<u32>,
    interval: Option<Spanned<String>>,
    repeat: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSqlExpect {
    value: Option<String>,
    rows: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMail {
    #[serde(rename = "type")]
    _kind: String,
    name: Spanned<String>,
    #[serde(default)]
    expect: RawMailExpect,
    timeout: Option<Spanned<String>>,
    retries: Option<u32>,
    interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMailExpect {
    count: Option<u64>,
    to_contains: Option<String>,
    subject_contains: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    max_usd: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuards {
    max_exclusive_lock: Option<Spanned<String>>,
    max_migration: Option<Spanned<String>>,
    #[serde(default)]
    forbid_rewrite: Vec<Spanned<String>>,
    max_p95_regression: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFirewall {
    mode: Option<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeardown {
    policy: Option<Spanned<String>>,
    keep_for: Option<Spanned<String>>,
}

/// A template value with where it was written, for reference checks.
struct TplUse {
    src: String,
    at: Option<Marker>,
    /// Whether resource outputs may be referenced here (false for params and resource sources).
    resources_allowed: bool,
    /// What parses the rendered text (decides which param values may go in).
    position: Position,
}

/// Variables `providers.local.pass_env` may not name: dryrun's own credentials.
const NEVER_PASSED: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "DRYRUN_WEBHOOK_SECRET",
    "DRYRUN_DATABASE_URL",
];

/// Largest compiled size of a param `pattern` (regex's own limit is 10 MiB).
const MAX_PATTERN_BYTES: usize = 1 << 20;

struct Compiler<'a> {
    map: SourceMap<'a>,
    diags: Vec<Diagnostic>,
}

impl Compiler<'_> {
    fn diag_at(
        &mut self,
        at: Option<&Marker>,
        message: impl Into<String>,
        label: &str,
        help: Option<String>,
    ) {
        let (line, col) = at.map_or((1, 1), |m| (m.line(), m.column()));
        let mut d = self.map.at(line, col, message, label);
        d.help = help;
        self.diags.push(d);
    }

    fn de<T: DeserializeOwned>(&mut self, node: &Node, what: &str) -> Option<T> {
        match marked_yaml::from_node::<T>(node) {
            Ok(v) => Some(v),
            Err(e) => {
                let at = e.start_mark().or_else(|| node.span().start().copied());
                match &*e {
                    marked_yaml::Error::UnknownFieldError(field, expected, _) => {
                        let at = find_key(node, field).or(at);
                        let help = did_you_mean(field, expected.iter().copied())
                            .map(|s| format!("did you mean `{s}`?"))
                            .or_else(|| {
                                Some(format!("allowed keys here: {}", expected.join(", ")))
                            });
                        self.diag_at(
                            at.as_ref(),
                            format!("unknown key `{field}` in {what}"),
                            "unknown key",
                            help,
                        );
                    }
                    other => {
                        let msg = other_message(other);
                        let help = if msg.contains("expected a string")
                            || msg.contains("invalid type: map")
                        {
                            Some(
                                "a value that starts with `{{` must be quoted: \"{{params.x}}\""
                                    .to_string(),
                            )
                        } else {
                            None
                        };
                        self.diag_at(at.as_ref(), format!("{what}: {msg}"), "here", help);
                    }
                }
                None
            }
        }
    }

    fn duration(&mut self, v: Option<&Spanned<String>>, default: Duration, what: &str) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.as_str()) {
            Ok(d) => d,
            Err(e) => {
                self.diag_at(
                    v.span().start(),
                    format!("{what}: `{}` is not a duration ({e})", v.as_str()),
                    "not a duration",
                    Some("write e.g. `30s`, `5m`, `2h 30m`".into()),
                );
                default
            }
        }
    }

    #[allow(clippy::too_many_lines)]
    fn run(
        &mut self,
        path: &Path,
        text: &str,
        cli_params: &BTreeMap<String, String>,
    ) -> Option<Blueprint> {
        if text.len() > MAX_BLUEPRINT_BYTES {
            self.diag_at(
                None,
                format!(
                    "blueprint is {} bytes; the limit is {MAX_BLUEPRINT_BYTES}",
                    text.len()
                ),
                "too large",
                None,
            );
            return None;
        }
        let opts = marked_yaml::LoaderOptions::default().error_on_duplicate_keys(true);
        let root = match marked_yaml::parse_yaml_with_options(0, text, opts) {
            Ok(n) => n,
            Err(e) => {
                let (at, msg) = load_error(&e);
                self.diag_at(at.as_ref(), format!("not valid YAML: {msg}"), "here", None);
                return None;
            }
        };
        let Some(top) = root.as_mapping() else {
            self.diag_at(None, "a blueprint is a YAML mapping", "here", None);
            return None;
        };
        for (k, _) in top.iter() {
            if !TOP_KEYS.contains(&k.as_str()) {
                let help = did_you_mean(k.as_str(), TOP_KEYS.iter().copied())
                    .map(|s| format!("did you mean `{s}`?"));
                self.diag_at(
                    k.span().start(),
                    format!("unknown top-level key `{}`", k.as_str()),
                    "unknown key",
                    help,
                );
            }
        }

        let name = match top.get_scalar("name") {
            Some(n) => {
                let s = n.as_str().to_string();
                if !valid_name(&s) {
                    self.diag_at(
                        n.span().start(),
                        format!("blueprint name `{s}` is not a valid name"),
                        "invalid name",
                        Some(
                            "use lower-case letters, digits, `-` and `_`, starting with a letter"
                                .into(),
                        ),
                    );
                }
                s
            }
            None => {
                self.diag_at(
                    root.span().start(),
                    "missing `name`",
                    "blueprint starts here",
                    Some("add `name: my-env` at the top".into()),
                );
                String::new()
            }
        };
        let description = top
            .get_scalar("description")
            .map(|d| d.as_str().to_string());

        // params
        let mut params = BTreeMap::new();
        let mut declared_params: Vec<String> = Vec::new();
        let mut rules: BTreeMap<String, ParamRule> = BTreeMap::new();
        if let Some(pnode) = top.get_node("params")
            && let Some(pmap) = self.mapping(pnode, "params")
        {
            for (k, v) in pmap.iter() {
                let pname = k.as_str().to_string();
                declared_params.push(pname.clone());
                let Some(p) = self.de::<RawParam>(v, &format!("param `{pname}`")) else {
                    continue;
                };
                let _ = p.description;
                let rule = self.param_rule(&pname, &p);
                let value = if let Some(val) = cli_params.get(&pname) {
                    Some(val.clone())
                } else if let Some(d) = p.default {
                    Some(d)
                } else if p.required {
                    self.diag_at(
                        k.span().start(),
                        format!("param `{pname}` is required and was not given"),
                        "declared here",
                        Some(format!("pass --param {pname}=VALUE")),
                    );
                    None
                } else {
                    Some(String::new())
                };
                if let (Some(value), Some(rule)) = (&value, &rule)
                    && let Err(why) = rule.check(value)
                {
                    self.diag_at(
                        k.span().start(),
                        format!("param `{pname}`: the value {} {why}", shown(value)),
                        "declared here",
                        Some(format!("pass a value that {}", rule.describe())),
                    );
                }
                if let Some(rule) = rule {
                    rules.insert(pname.clone(), rule);
                }
                if let Some(value) = value {
                    params.insert(pname, value);
                }
            }
        }
        for k in cli_params.keys() {
            if !declared_params.contains(k) {
                let help = did_you_mean(k, declared_params.iter().map(String::as_str))
                    .map(|s| format!("did you mean `{s}`?"))
                    .or_else(|| {
                        Some(format!(
                            "declared params: {}",
                            if declared_params.is_empty() {
                                "none".to_string()
                            } else {
                                declared_params.join(", ")
                            }
                        ))
                    });
                let at = top.get_node("params").map_or_else(
                    || root.span().start().copied(),
                    |n| n.span().start().copied(),
                );
                self.diag_at(
                    at.as_ref(),
                    format!("--param `{k}` is not declared in the blueprint"),
                    "params are declared here",
                    help,
                );
            }
        }

        // secrets
        let mut secrets = BTreeMap::new();
        if let Some(snode) = top.get_node("secrets")
            && let Some(smap) = self.mapping(snode, "secrets")
        {
            for (k, v) in smap.iter() {
                let Some(s) = self.de::<RawSecret>(v, &format!("secret `{}`", k.as_str())) else {
                    continue;
                };
                secrets.insert(
                    k.as_str().to_string(),
                    SecretSource {
                        env: s.env.as_str().to_string(),
                        has_default: s.default.is_some(),
                        default: s.default,
                    },
                );
            }
        }

        // providers
        let providers: RawProviders = top
            .get_node("providers")
            .and_then(|n| self.de(n, "providers"))
            .unwrap_or_default();
        let dir = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .to_path_buf();
        let local_raw = providers.local.unwrap_or_default();
        let pass_env = self.pass_env(&local_raw.pass_env);
        let local = LocalSettings {
            backups: resolve(&dir, local_raw.backups.as_deref().unwrap_or("backups")),
            buckets: resolve(&dir, local_raw.buckets.as_deref().unwrap_or("buckets")),
            pass_env,
            cache: local_raw.cache.unwrap_or(true),
        };
        let aws = self.aws_settings(&providers.aws.unwrap_or_default(), &params);

        // resources
        let mut resources: Vec<Resource> = Vec::new();
        let mut res_marks: HashMap<String, Option<Marker>> = HashMap::new();
        let mut all_names: Vec<String> = Vec::new();
        let mut dep_uses: Vec<(String, Spanned<String>)> = Vec::new();
        let mut tpl_uses: Vec<TplUse> = Vec::new();
        match top.get_node("resources") {
            None => self.diag_at(
                root.span().start(),
                "missing `resources`",
                "blueprint starts here",
                Some("declare at least one database, bucket or service under `resources:`".into()),
            ),
            Some(rnode) => {
                if let Some(rmap) = self.mapping(rnode, "resources") {
                    if rmap.len() > MAX_RESOURCES {
                        self.diag_at(
                            rnode.span().start(),
                            format!("{} resources; the limit is {MAX_RESOURCES}", rmap.len()),
                            "here",
                            None,
                        );
                    }
                    for (k, v) in rmap.iter().take(MAX_RESOURCES) {
                        let rname = k.as_str().to_string();
                        res_marks.insert(rname.clone(), k.span().start().copied());
                        all_names.push(rname.clone());
                        if !valid_name(&rname) {
                            self.diag_at(k.span().start(), format!("resource name `{rname}` is not a valid name"), "invalid name",
                                Some("use lower-case letters, digits, `-` and `_`, starting with a letter".into()));
                        }
                        if let Some(r) =
                            self.resource(&rname, v, &params, &mut dep_uses, &mut tpl_uses)
                        {
                            resources.push(r);
                        }
                    }
                }
            }
        }

        // checks
        let mut checks: Vec<Check> = Vec::new();
        let mut check_db_uses: Vec<Spanned<String>> = Vec::new();
        if let Some(cnode) = top.get_node("checks") {
            match cnode.as_sequence() {
                None => self.diag_at(
                    cnode.span().start(),
                    "`checks` must be a list",
                    "here",
                    Some("write each check as `- name: …`".into()),
                ),
                Some(seq) => {
                    if seq.len() > MAX_CHECKS {
                        self.diag_at(
                            cnode.span().start(),
                            format!("{} checks; the limit is {MAX_CHECKS}", seq.len()),
                            "here",
                            None,
                        );
                    }
                    let mut seen: HashMap<String, ()> = HashMap::new();
                    for item in seq.iter().take(MAX_CHECKS) {
                        if let Some(c) = self.check(item, &mut tpl_uses, &mut check_db_uses) {
                            if seen.insert(c.name.clone(), ()).is_some() {
                                self.diag_at(
                                    item.span().start(),
                                    format!("duplicate check name `{}`", c.name),
                                    "second use",
                                    Some("check names must be unique".into()),
                                );
                            }
                            checks.push(c);
                        }
                    }
                }
            }
        }

        // teardown + ttl
        let ttl = {
            let t = top
                .get_node("ttl")
                .and_then(|n| self.de::<Spanned<String>>(n, "ttl"));
            self.duration(t.as_ref(), Duration::from_secs(6 * 3600), "ttl")
        };
        let teardown = match top
            .get_node("teardown")
            .and_then(|n| self.de::<RawTeardown>(n, "teardown"))
        {
            None => TeardownPolicy::Always,
            Some(t) => {
                let keep_for = self.duration(
                    t.keep_for.as_ref(),
                    Duration::from_secs(3600),
                    "teardown.keep_for",
                );
                match t.policy.as_ref().map(|p| p.as_str()) {
                    None | Some("always") => TeardownPolicy::Always,
                    Some("on-success") => TeardownPolicy::OnSuccess { keep_for },
                    Some("keep") => TeardownPolicy::Keep { keep_for },
                    Some(other) => {
                        let opts = ["always", "on-success", "keep"];
                        let help = did_you_mean(other, opts).map_or_else(
                            || "one of: always, on-success, keep".to_string(),
                            |s| format!("did you mean `{s}`?"),
                        );
                        self.diag_at(
                            t.policy.as_ref().and_then(|p| p.span().start()),
                            format!("unknown teardown policy `{other}`"),
                            "unknown policy",
                            Some(help),
                        );
                        TeardownPolicy::Always
                    }
                }
            }
        };

        // masking + the personal data gate
        let masking = match top.get_node("masking") {
            Some(n) => self.masking(n, &resources),
            None => BTreeMap::new(),
        };
        let pii_gate = match top
            .get_node("pii_gate")
            .and_then(|n| self.de::<Spanned<String>>(n, "pii_gate"))
        {
            None => crate::privacy::Gate::On,
            Some(g) => match g.as_str() {
                "on" => crate::privacy::Gate::On,
                "off" => crate::privacy::Gate::Off,
                other => {
                    self.diag_at(
                        g.span().start(),
                        format!("`pii_gate` is `on` or `off`, not {}", shown(other)),
                        "here",
                        Some("`off` lets unclassified personal data reach the release; leave it `on` unless the copy holds none".into()),
                    );
                    crate::privacy::Gate::On
                }
            },
        };

        let firewall = match top.get_node("firewall") {
            Some(n) => self.firewall(n),
            None => crate::firewall::Policy::default(),
        };
        let guards = match top.get_node("guards") {
            Some(n) => self.guards(n),
            None => crate::migrations::Guards::default(),
        };
        let migration_trace = match top
            .get_node("migration_trace")
            .and_then(|n| self.de::<Spanned<String>>(n, "migration_trace"))
        {
            None => true,
            Some(g) => match g.as_str() {
                "on" => true,
                "off" => false,
                other => {
                    self.diag_at(
                        g.span().start(),
                        format!("`migration_trace` is `on` or `off`, not {}", shown(other)),
                        "here",
                        Some("`on` (the default) samples locks while the release installs; `off` only to measure the monitor's cost".into()),
                    );
                    true
                }
            },
        };
        let budget = top.get_node("budget").and_then(|n| {
            let b = self.de::<RawBudget>(n, "budget")?;
            let v = b
                .max_usd
                .as_str()
                .trim()
                .trim_start_matches('$')
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0);
            if v.is_none() {
                self.diag_at(
                    b.max_usd.span().start(),
                    format!(
                        "budget.max_usd: {} is not an amount of US dollars above 0",
                        shown(b.max_usd.as_str())
                    ),
                    "here",
                    Some("write e.g. `max_usd: 5`: a run whose worst case (all resources for the ttl) costs more is refused before anything is created".into()),
                );
            }
            v
        });
        if !migration_trace
            && (guards.max_exclusive_lock.is_some() || !guards.forbid_rewrite.is_empty())
        {
            self.diag_at(
                top.get_node("migration_trace").and_then(|n| n.span().start()),
                "`migration_trace: off` leaves `guards.max_exclusive_lock` and `guards.forbid_rewrite` nothing to judge",
                "trace off",
                Some("remove `migration_trace: off`, or those guards".into()),
            );
        }

        // cross references
        let names: Vec<String> = resources.iter().map(|r| r.name.clone()).collect();
        for (owner, dep) in &dep_uses {
            if !all_names.iter().any(|n| n == dep.as_str()) {
                self.unknown_resource(dep.as_str(), dep.span().start(), &all_names);
            } else if dep.as_str() == owner {
                self.diag_at(
                    dep.span().start(),
                    format!("resource `{owner}` depends on itself"),
                    "here",
                    None,
                );
            }
        }
        for c in &check_db_uses {
            match resources.iter().find(|r| r.name == c.as_str()) {
                Some(r) if !matches!(r.spec, ResourceSpec::Database(_)) => {
                    self.diag_at(
                        c.span().start(),
                        format!("`{}` is a {}, not a database", c.as_str(), r.spec.kind()),
                        "not a database",
                        None,
                    );
                }
                Some(Resource {
                    spec: ResourceSpec::Database(d),
                    ..
                }) if d.engine.is_mysql() => {
                    self.diag_at(
                        c.span().start(),
                        format!("`{}` is {}: sql checks run on PostgreSQL and SQLite only", c.as_str(), d.engine.as_str()),
                        "no sql check on this engine",
                        Some("query it from the service's instance with a command check (e.g. `mysql -e \"…\"`), where the copy is reachable".into()),
                    );
                }
                Some(_) => {}
                None if all_names.iter().any(|n| n == c.as_str()) => {}
                None => self.unknown_resource(c.as_str(), c.span().start(), &all_names),
            }
        }
        // MySQL-family copies: no scan, no masking (dryrun has no MySQL client).
        for r in &resources {
            let ResourceSpec::Database(d) = &r.spec else {
                continue;
            };
            if !d.engine.is_mysql() {
                continue;
            }
            if masking.contains_key(&r.name) {
                self.diag_at(
                    top.get_node("masking").and_then(|n| n.span().start()),
                    format!("`masking` has rules for `{}`, which is {}: dryrun masks PostgreSQL and SQLite copies only", r.name, d.engine.as_str()),
                    "here",
                    Some("remove the rules for it, and rehearse on a copy that holds no personal data you may not copy".into()),
                );
            }
            if pii_gate == crate::privacy::Gate::On {
                self.diag_at(
                    res_marks.get(&r.name).copied().flatten().as_ref(),
                    format!("database `{}` is {}: the personal data gate (on by default) scans PostgreSQL and SQLite copies only", r.name, d.engine.as_str()),
                    "this database",
                    Some("set `pii_gate: off` when the copy may hold what production holds (docs/data-safety.md)".into()),
                );
            }
        }
        let kinds: HashMap<String, &'static str> = resources
            .iter()
            .map(|r| (r.name.clone(), r.spec.kind().as_str()))
            .collect();
        for u in &tpl_uses {
            self.check_template(u, &declared_params, &secrets, &kinds, &all_names);
            self.check_position(u, &params, &rules);
        }
        if self.diags.is_empty() {
            self.cycles(&resources, &res_marks);
        }
        let _ = names;
        // Production sources are chosen before anything exists: they may use params only, and
        // are rendered now so that plan and run name the same source.
        let pctx = serde_json::json!({ "params": params });
        for r in &mut resources {
            let source = match &mut r.spec {
                ResourceSpec::Database(d) => &mut d.source,
                ResourceSpec::Bucket(b) => &mut b.source,
                ResourceSpec::Service(_) => continue,
            };
            if source.contains("{{") {
                match template::render_in(source, &pctx, Position::Name, &[]) {
                    Ok(v) if template::unsafe_in(&v, Position::Name).is_some() || v.is_empty() => {
                        let at = res_marks.get(&r.name).copied().flatten();
                        self.diag_at(
                            at.as_ref(),
                            format!(
                                "resource `{}`: source `{source}` renders to {}, which is not a plain name",
                                r.name,
                                shown(&v)
                            ),
                            "in this resource",
                            Some(format!("a production source rendered from params may hold only {} and no `/`", template::SAFE_CHARS)),
                        );
                    }
                    Ok(v) => *source = v,
                    Err(e) => {
                        let at = res_marks.get(&r.name).copied().flatten();
                        self.diag_at(
                            at.as_ref(),
                            format!(
                                "resource `{}`: source `{source}` cannot be rendered: {e}",
                                r.name
                            ),
                            "in this resource",
                            Some("a production source may use `{{params.…}}` only".into()),
                        );
                    }
                }
            }
        }
        Some(Blueprint {
            name,
            description,
            path: path.to_path_buf(),
            params,
            param_rules: rules,
            secrets,
            local,
            aws,
            resources,
            checks,
            teardown,
            ttl,
            masking,
            pii_gate,
            firewall,
            guards,
            migration_trace,
            budget,
        })
    }

    /// `guards: {max_exclusive_lock, max_migration, forbid_rewrite, max_p95_regression}`.
    fn guards(&mut self, node: &Node) -> crate::migrations::Guards {
        let Some(r) = self.de::<RawGuards>(node, "guards") else {
            return crate::migrations::Guards::default();
        };
        let mut dur = |v: Option<&Spanned<String>>, what: &str| {
            let v = v?;
            let d = self.duration(Some(v), Duration::ZERO, what);
            (d > Duration::ZERO).then_some(d)
        };
        let max_exclusive_lock = dur(r.max_exclusive_lock.as_ref(), "guards.max_exclusive_lock");
        let max_migration = dur(r.max_migration.as_ref(), "guards.max_migration");
        let max_p95_regression = r.max_p95_regression.and_then(|v| {
            let n = v
                .as_str()
                .trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<f64>().ok())
                .filter(|n| n.is_finite() && *n >= 0.0);
            if n.is_none() {
                self.diag_at(
                    v.span().start(),
                    format!(
                        "guards.max_p95_regression: {} is not a percentage",
                        shown(v.as_str())
                    ),
                    "here",
                    Some(
                        "write e.g. `20%`: the largest growth of a check's p95 over the baseline's"
                            .into(),
                    ),
                );
            }
            n
        });
        crate::migrations::Guards {
            max_exclusive_lock,
            max_migration,
            forbid_rewrite: r
                .forbid_rewrite
                .iter()
                .map(|t| t.as_str().to_string())
                .collect(),
            max_p95_regression,
        }
    }

    /// `firewall: auto|required|off`, or `firewall: {mode, allow: [host:port, …]}`.
    fn firewall(&mut self, node: &Node) -> crate::firewall::Policy {
        use crate::firewall::{Mode, Policy};
        let (mode, allow) = if let Some(s) = node.as_scalar() {
            (
                Some(Spanned::new(*s.span(), s.as_str().to_string())),
                Vec::new(),
            )
        } else {
            match self.de::<RawFirewall>(node, "firewall") {
                Some(r) => (r.mode, r.allow),
                None => return Policy::default(),
            }
        };
        let mode = match mode.as_ref().map(|m| m.as_str()) {
            None | Some("auto") => Mode::Auto,
            Some("required") => Mode::Required,
            Some("off") => Mode::Off,
            Some(other) => {
                let help = did_you_mean(other, ["auto", "required", "off"]).map_or_else(
                    || "one of: auto, required, off".to_string(),
                    |s| format!("did you mean `{s}`?"),
                );
                self.diag_at(
                    mode.as_ref().and_then(|m| m.span().start()),
                    format!("unknown firewall mode {}", shown(other)),
                    "unknown mode",
                    Some(help),
                );
                Mode::Auto
            }
        };
        let mut out = Vec::new();
        for a in allow {
            let ok = a
                .as_str()
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if ok {
                out.push(a.as_str().to_string());
            } else {
                self.diag_at(
                    a.span().start(),
                    format!("{} is not `host:port`", shown(a.as_str())),
                    "here",
                    Some("e.g. `127.0.0.1:9200` or `[::1]:8443`".into()),
                );
            }
        }
        Policy { mode, allow: out }
    }

    /// `masking:` — database resource → `table.column` → strategy.
    fn masking(
        &mut self,
        node: &Node,
        resources: &[Resource],
    ) -> BTreeMap<String, Vec<crate::privacy::Rule>> {
        use crate::privacy::{Rule, Strategy};
        let mut out = BTreeMap::new();
        let Some(m) = self.mapping(node, "masking") else {
            return out;
        };
        let dbs: Vec<String> = resources
            .iter()
            .filter(|r| matches!(r.spec, ResourceSpec::Database(_)))
            .map(|r| r.name.clone())
            .collect();
        for (k, v) in m.iter() {
            let db = k.as_str();
            if !dbs.iter().any(|d| d == db) {
                let help = did_you_mean(db, dbs.iter().map(String::as_str))
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("databases in this blueprint: {}", dbs.join(", ")));
                self.diag_at(
                    k.span().start(),
                    format!("`masking` names `{db}`, which is not a database resource"),
                    "not a database",
                    Some(help),
                );
                continue;
            }
            let Some(cols) = v.as_mapping() else {
                self.diag_at(
                    v.span().start(),
                    format!("`masking.{db}` must be a mapping of `table.column: strategy`"),
                    "here",
                    Some("e.g. `customers.email: email`".into()),
                );
                continue;
            };
            let mut rules = Vec::new();
            for (ck, cv) in cols.iter() {
                let at = ck.span().start();
                let Some((table, column)) = ck
                    .as_str()
                    .rsplit_once('.')
                    .filter(|(t, c)| !t.is_empty() && !c.is_empty())
                else {
                    self.diag_at(
                        at,
                        format!("{} is not `table.column`", shown(ck.as_str())),
                        "here",
                        Some("write the table and the column: `customers.email: email` (`schema.table.column` outside `public`)".into()),
                    );
                    continue;
                };
                let Some(text) = cv.as_scalar().map(|s| s.as_str().to_string()) else {
                    self.diag_at(
                        cv.span().start(),
                        "a strategy is one word",
                        "here",
                        Some(format!("one of: {}", Strategy::NAMES.join(", "))),
                    );
                    continue;
                };
                let Some(strategy) = Strategy::parse(&text) else {
                    let help = did_you_mean(&text, Strategy::NAMES.iter().copied()).map_or_else(
                        || format!("one of: {}", Strategy::NAMES.join(", ")),
                        |s| format!("did you mean `{s}`?"),
                    );
                    self.diag_at(
                        cv.span().start(),
                        format!(
                            "unknown masking strategy {} for {}",
                            shown(&text),
                            shown(ck.as_str())
                        ),
                        "unknown strategy",
                        Some(help),
                    );
                    continue;
                };
                rules.push(Rule {
                    table: table.to_string(),
                    column: column.to_string(),
                    strategy,
                });
            }
            out.insert(db.to_string(), rules);
        }
        out
    }

    /// `providers.local.pass_env`: environment variable names; dryrun's own credentials and
    /// the server's secret may not be passed.
    fn pass_env(&mut self, raw: &[Spanned<String>]) -> Vec<String> {
        let mut out = Vec::new();
        for n in raw {
            let name = n.as_str();
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.diag_at(
                    n.span().start(),
                    format!(
                        "providers.local.pass_env: `{name}` is not an environment variable name"
                    ),
                    "here",
                    Some("use letters, digits and `_`, not starting with a digit".into()),
                );
            } else if NEVER_PASSED.contains(&name) {
                self.diag_at(
                    n.span().start(),
                    format!("providers.local.pass_env: `{name}` holds dryrun's own credentials and is never passed to the release"),
                    "here",
                    Some("give the release what it needs through `secrets:` and the service `env`".into()),
                );
            } else if !out.iter().any(|x| x == name) {
                out.push(name.to_string());
            }
        }
        out
    }

    /// A param's `pattern` and `values`, compiled; `None` when it declares neither (or they
    /// are broken, which is reported).
    fn param_rule(&mut self, name: &str, p: &RawParam) -> Option<ParamRule> {
        if p.pattern.is_none() && p.values.is_none() {
            return None;
        }
        let mut ok = true;
        let regex = match &p.pattern {
            None => None,
            Some(pat) => match regex::RegexBuilder::new(&format!("^(?:{})$", pat.as_str()))
                .size_limit(MAX_PATTERN_BYTES)
                .dfa_size_limit(MAX_PATTERN_BYTES)
                .build()
            {
                Ok(r) => Some(r),
                Err(e) => {
                    ok = false;
                    let msg = e.to_string();
                    let first = msg.lines().last().unwrap_or(&msg).trim().to_string();
                    self.diag_at(
                        pat.span().start(),
                        format!("param `{name}`: `pattern` is not a regular expression: {first}"),
                        "here",
                        Some("write a full-match regex such as `[a-z][a-z0-9-]{0,62}` (it is anchored for you)".into()),
                    );
                    None
                }
            },
        };
        let values: Option<Vec<String>> = p
            .values
            .as_ref()
            .map(|v| v.iter().map(|x| x.as_str().to_string()).collect());
        if values.as_ref().is_some_and(Vec::is_empty) {
            ok = false;
            self.diag_at(
                None,
                format!("param `{name}`: `values` is empty, so no value is allowed"),
                "here",
                Some("list the allowed values, or remove `values`".into()),
            );
        }
        ok.then(|| ParamRule {
            pattern: p.pattern.as_ref().map(|x| x.as_str().to_string()),
            values,
            regex,
        })
    }

    /// In a shell command, an SQL query or a production source name, a param without a
    /// declared `pattern` or `values` may hold only safe characters; raw output
    /// (`{{{…}}}`, `{{& …}}`) is not allowed there at all.
    fn check_position(
        &mut self,
        u: &TplUse,
        params: &BTreeMap<String, String>,
        rules: &BTreeMap<String, ParamRule>,
    ) {
        if u.position == Position::Plain {
            return;
        }
        if template::has_raw_output(&u.src) {
            self.diag_at(
                u.at.as_ref(),
                format!(
                    "`{{{{{{…}}}}}}` and `{{{{& …}}}}` are not allowed in {}: every value there is checked for safety",
                    u.position.describe()
                ),
                "in this value",
                Some("write `{{…}}`".into()),
            );
        }
        let Ok(refs) = template::references(&u.src) else {
            return;
        };
        let mut seen = Vec::new();
        for r in refs {
            let [root, name, ..] = r.segments.as_slice() else {
                continue;
            };
            if root != "params" || rules.contains_key(name) || seen.contains(name) {
                continue;
            }
            seen.push(name.clone());
            let Some(value) = params.get(name) else {
                continue;
            };
            if let Some(why) = template::unsafe_in(value, u.position) {
                self.diag_at(
                    u.at.as_ref(),
                    format!(
                        "param `{name}` is used in {} here and its value {} is not safe there: {why}",
                        u.position.describe(),
                        shown(value)
                    ),
                    "in this value",
                    Some(format!(
                        "without a declared `pattern` or `values`, a param there may hold only {} (not starting with `-`, without `--`); declare a `pattern` for `{name}` to allow exactly what it needs",
                        template::SAFE_CHARS
                    )),
                );
            }
        }
    }

    fn mapping<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
    ) -> Option<&'n marked_yaml::types::MarkedMappingNode> {
        if let Some(m) = node.as_mapping() {
            return Some(m);
        }
        if node.as_scalar().is_some_and(|s| s.as_str().is_empty()) {
            return None;
        }
        self.diag_at(
            node.span().start(),
            format!("`{what}` must be a mapping of name → definition"),
            "here",
            None,
        );
        None
    }

    fn unknown_resource(&mut self, name: &str, at: Option<&Marker>, all: &[String]) {
        let help = did_you_mean(name, all.iter().map(String::as_str))
            .map(|s| format!("did you mean `{s}`?"))
            .or_else(|| Some(format!("resources in this blueprint: {}", all.join(", "))));
        self.diag_at(
            at,
            format!("unknown resource `{name}`"),
            "no such resource",
            help,
        );
    }

    /// Renders a settings value that may use `{{params.…}}` only; empty means unset.
    fn param_value(
        &mut self,
        v: Option<&Spanned<String>>,
        params: &BTreeMap<String, String>,
        what: &str,
    ) -> Option<String> {
        let v = v?;
        let text = if v.as_str().contains("{{") {
            let ctx = serde_json::json!({ "params": params });
            match template::render(v.as_str(), &ctx) {
                Ok(t) => t,
                Err(e) => {
                    self.diag_at(
                        v.span().start(),
                        format!("{what}: `{}` cannot be rendered: {e}", v.as_str()),
                        "here",
                        Some("this value may use `{{params.…}}` only".into()),
                    );
                    return None;
                }
            }
        } else {
            v.as_str().to_string()
        };
        let text = text.trim().to_string();
        (!text.is_empty()).then_some(text)
    }

    fn aws_settings(&mut self, raw: &RawAws, params: &BTreeMap<String, String>) -> AwsSettings {
        let runner_cidr = self.param_value(
            raw.runner_cidr.as_ref(),
            params,
            "providers.aws.runner_cidr",
        );
        if let (Some(c), Some(at)) = (&runner_cidr, &raw.runner_cidr)
            && (c == "0.0.0.0/0" || c == "::/0")
        {
            self.diag_at(
                at.span().start(),
                format!("providers.aws.runner_cidr `{c}` opens the copy to the whole internet"),
                "too wide",
                Some("give the runner's own address range, e.g. 10.0.12.0/24".into()),
            );
        }
        AwsSettings {
            region: self.param_value(raw.region.as_ref(), params, "providers.aws.region"),
            vpc_id: self.param_value(raw.vpc_id.as_ref(), params, "providers.aws.vpc_id"),
            db_subnet_group: self.param_value(
                raw.db_subnet_group.as_ref(),
                params,
                "providers.aws.db_subnet_group",
            ),
            db_instance_class: self.param_value(
                raw.db_instance_class.as_ref(),
                params,
                "providers.aws.db_instance_class",
            ),
            instance_profile: self.param_value(
                raw.instance_profile.as_ref(),
                params,
                "providers.aws.instance_profile",
            ),
            runner_in_vpc: raw.runner_in_vpc,
            runner_cidr,
            restore_timeout: self.duration(
                raw.restore_timeout.as_ref(),
                Duration::from_secs(3600),
                "providers.aws.restore_timeout",
            ),
        }
    }

    fn service_aws(&mut self, raw: RawServiceAws, params: &BTreeMap<String, String>) -> ServiceAws {
        if let Some(u) = &raw.user_data {
            if let Err(e) = template::references(u.as_str()) {
                self.diag_at(
                    u.span().start(),
                    format!("aws.user_data does not parse: {e}"),
                    "in this template",
                    None,
                );
            }
            // The user data boots the instance while the databases restore; what depends on
            // them arrives later through SSM.
            let late = ["env_b64", "env_exports", "install_steps", "start"];
            if let Some(name) = template::tokens(u.as_str())
                .into_iter()
                .find(|t| late.contains(t))
            {
                self.diag_at(
                    u.span().start(),
                    format!("aws.user_data uses `{name}`, which the user data no longer gets: the instance boots while the databases are restored, before the service's env exists"),
                    "in this template",
                    Some("remove it: after the boot, dryrun writes the env to /opt/dryrun/env, runs the install steps and starts the release through SSM (docs/providers/aws.md#the-boot-template-user-data)".into()),
                );
            }
        }
        ServiceAws {
            ami: self
                .param_value(Some(&raw.ami), params, "aws.ami")
                .unwrap_or_default(),
            instance_type: self
                .param_value(raw.instance_type.as_ref(), params, "aws.instance_type")
                .unwrap_or_else(|| "t3.micro".into()),
            subnet_id: self.param_value(raw.subnet_id.as_ref(), params, "aws.subnet_id"),
            port: raw.port.unwrap_or(8080),
            user_data: raw.user_data.map(|u| u.as_str().to_string()),
        }
    }

    fn resource(
        &mut self,
        name: &str,
        node: &Node,
        params: &BTreeMap<String, String>,
        deps: &mut Vec<(String, Spanned<String>)>,
        tpls: &mut Vec<TplUse>,
    ) -> Option<Resource> {
        let Some(map) = node.as_mapping() else {
            self.diag_at(
                node.span().start(),
                format!("resource `{name}` must be a mapping with a `type`"),
                "here",
                None,
            );
            return None;
        };
        let Some(kind) = map.get_scalar("type") else {
            self.diag_at(
                node.span().start(),
                format!("resource `{name}` has no `type`"),
                "resource starts here",
                Some(format!("add `type:` with one of: {}", KINDS.join(", "))),
            );
            return None;
        };
        let what = format!("resource `{name}`");
        let (spec, depends_on) = match kind.as_str() {
            "database" => {
                let r: RawDatabase = self.de(node, &what)?;
                let engine = match r.engine.as_str() {
                    "postgresql" => Engine::Postgres,
                    e if Engine::ALL.iter().any(|x| x.as_str() == e) => Engine::ALL
                        .into_iter()
                        .find(|x| x.as_str() == e)
                        .unwrap_or(Engine::Sqlite),
                    other => {
                        let help = did_you_mean(other, ENGINES.iter().copied()).map_or_else(
                            || format!("engines: {}", ENGINES.join(", ")),
                            |s| format!("did you mean `{s}`?"),
                        );
                        self.diag_at(
                            r.engine.span().start(),
                            format!("unknown database engine `{other}`"),
                            "unknown engine",
                            Some(help),
                        );
                        Engine::Sqlite
                    }
                };
                tpls.push(TplUse {
                    src: r.source.as_str().to_string(),
                    at: r.source.span().start().copied(),
                    resources_allowed: false,
                    position: Position::Name,
                });
                (
                    ResourceSpec::Database(DatabaseSpec {
                        engine,
                        source: r.source.as_str().to_string(),
                        database: r.database.unwrap_or_else(|| "app".into()),
                        backup: r.backup,
                    }),
                    r.depends_on,
                )
            }
            "bucket" => {
                let r: RawBucket = self.de(node, &what)?;
                tpls.push(TplUse {
                    src: r.source.as_str().to_string(),
                    at: r.source.span().start().copied(),
                    resources_allowed: false,
                    position: Position::Name,
                });
                (
                    ResourceSpec::Bucket(BucketSpec {
                        source: r.source.as_str().to_string(),
                        prefix: r.prefix,
                    }),
                    r.depends_on,
                )
            }
            "service" => {
                let r: RawService = self.de(node, &what)?;
                let ready_timeout = self.duration(
                    r.ready_timeout.as_ref(),
                    Duration::from_secs(60),
                    "ready_timeout",
                );
                let mut env = BTreeMap::new();
                for (k, v) in &r.env {
                    tpls.push(TplUse {
                        src: v.as_str().to_string(),
                        at: v.span().start().copied(),
                        resources_allowed: true,
                        position: Position::Plain,
                    });
                    env.insert(
                        k.clone(),
                        Template {
                            src: v.as_str().to_string(),
                        },
                    );
                }
                if let Some(s) = &r.start {
                    tpls.push(TplUse {
                        src: s.as_str().to_string(),
                        at: s.span().start().copied(),
                        resources_allowed: true,
                        position: Position::Shell,
                    });
                }
                let aws = r.aws.map(|a| self.service_aws(a, params));
                (
                    ResourceSpec::Service(ServiceSpec {
                        env,
                        start: r.start.map(|s| Template {
                            src: s.as_str().to_string(),
                        }),
                        ready_timeout,
                        aws,
                    }),
                    r.depends_on,
                )
            }
            other => {
                let help = did_you_mean(other, KINDS.iter().copied()).map_or_else(
                    || format!("kinds: {}", KINDS.join(", ")),
                    |s| format!("did you mean `{s}`?"),
                );
                self.diag_at(
                    kind.span().start(),
                    format!("unknown resource type `{other}`"),
                    "unknown type",
                    Some(help),
                );
                return None;
            }
        };
        for d in &depends_on {
            deps.push((name.to_string(), d.clone()));
        }
        let mut res = Resource {
            name: name.to_string(),
            spec,
            depends_on: depends_on.iter().map(|d| d.as_str().to_string()).collect(),
            implied: Vec::new(),
        };
        let implied: Vec<String> = match &res.spec {
            ResourceSpec::Service(s) => s
                .env
                .values()
                .chain(s.start.iter())
                .flat_map(Template::resource_refs)
                .collect(),
            _ => Vec::new(),
        };
        for i in implied {
            if !res.implied.contains(&i) && i != name {
                res.implied.push(i);
            }
        }
        Some(res)
    }

    fn check(
        &mut self,
        node: &Node,
        tpls: &mut Vec<TplUse>,
        dbs: &mut Vec<Spanned<String>>,
    ) -> Option<Check> {
        let Some(map) = node.as_mapping() else {
            self.diag_at(
                node.span().start(),
                "a check must be a mapping with `name` and `type`",
                "here",
                None,
            );
            return None;
        };
        let label = map.get_scalar("name").map_or_else(
            || "check".to_string(),
            |n| format!("check `{}`", n.as_str()),
        );
        let Some(kind) = map.get_scalar("type") else {
            self.diag_at(
                node.span().start(),
                format!("{label} has no `type`"),
                "check starts here",
                Some(format!(
                    "add `type:` with one of: {}",
                    CHECK_KINDS.join(", ")
                )),
            );
            return None;
        };
        let tpl = |s: &Spanned<String>, tpls: &mut Vec<TplUse>, position: Position| {
            tpls.push(TplUse {
                src: s.as_str().to_string(),
                at: s.span().start().copied(),
                resources_allowed: true,
                position,
            });
            Template {
                src: s.as_str().to_string(),
            }
        };
        let (name, timeout, retries, interval, repeat, spec) = match kind.as_str() {
            "http" => {
                let r: RawHttp = self.de(node, &label)?;
                let at = r.name.span().start().copied();
                for v in r.expect.body_contains.iter().chain(r.expect.json.values()) {
                    tpls.push(TplUse {
                        src: v.clone(),
                        at,
                        resources_allowed: true,
                        position: Position::Plain,
                    });
                }
                let headers = r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), tpl(v, tpls, Position::Plain)))
                    .collect();
                let spec = CheckSpec::Http {
                    url: tpl(&r.url, tpls, Position::Plain),
                    method: r.method.unwrap_or_else(|| "GET".into()).to_uppercase(),
                    headers,
                    body: r.body.as_ref().map(|b| tpl(b, tpls, Position::Plain)),
                    status: r.expect.status.unwrap_or(200),
                    body_contains: r.expect.body_contains,
                    json: r.expect.json,
                };
                (r.name, r.timeout, r.retries, r.interval, r.repeat, spec)
            }
            "command" => {
                let r: RawCommand = self.de(node, &label)?;
                if let Some(v) = &r.expect.output_contains {
                    tpls.push(TplUse {
                        src: v.clone(),
                        at: r.name.span().start().copied(),
                        resources_allowed: true,
                        position: Position::Plain,
                    });
                }
                let spec = CheckSpec::Command {
                    run: tpl(&r.run, tpls, Position::Shell),
                    exit_code: r.expect.exit_code.unwrap_or(0),
                    output_contains: r.expect.output_contains,
                };
                (r.name, r.timeout, r.retries, r.interval, r.repeat, spec)
            }
            "sql" => {
                let r: RawSql = self.de(node, &label)?;
                if let Some(v) = &r.expect.value {
                    tpls.push(TplUse {
                        src: v.clone(),
                        at: r.name.span().start().copied(),
                        resources_allowed: true,
                        position: Position::Plain,
                    });
                }
                dbs.push(r.database.clone());
                let spec = CheckSpec::Sql {
                    database: r.database.as_str().to_string(),
                    query: tpl(&r.query, tpls, Position::Sql),
                    value: r.expect.value,
                    rows: r.expect.rows,
                };
                (r.name, r.timeout, r.retries, r.interval, r.repeat, spec)
            }
            "mail" => {
                let r: RawMail = self.de(node, &label)?;
                for v in r
                    .expect
                    .to_contains
                    .iter()
                    .chain(r.expect.subject_contains.iter())
                {
                    tpls.push(TplUse {
                        src: v.clone(),
                        at: r.name.span().start().copied(),
                        resources_allowed: true,
                        position: Position::Plain,
                    });
                }
                let spec = CheckSpec::Mail {
                    count: r.expect.count,
                    to_contains: r.expect.to_contains,
                    subject_contains: r.expect.subject_contains,
                };
                (r.name, r.timeout, r.retries, r.interval, None, spec)
            }
            other => {
                let help = did_you_mean(other, CHECK_KINDS.iter().copied()).map_or_else(
                    || format!("check types: {}", CHECK_KINDS.join(", ")),
                    |s| format!("did you mean `{s}`?"),
                );
                self.diag_at(
                    kind.span().start(),
                    format!("unknown check type `{other}`"),
                    "unknown type",
                    Some(help),
                );
                return None;
            }
        };
        let timeout = self.duration(timeout.as_ref(), Duration::from_secs(30), "timeout");
        let interval = self.duration(interval.as_ref(), Duration::from_secs(1), "interval");
        let repeat = repeat.unwrap_or(1);
        if !(1..=MAX_REPEAT).contains(&repeat) {
            self.diag_at(
                name.span().start(),
                format!(
                    "check `{}`: `repeat` is {repeat}; it must be between 1 and {MAX_REPEAT}",
                    name.as_str()
                ),
                "this check",
                Some("`repeat: N` times the check N times (p50/p95 against `--baseline`); 20–100 is plenty".into()),
            );
        }
        Some(Check {
            name: name.as_str().to_string(),
            timeout,
            retries: retries.unwrap_or(0),
            interval,
            repeat: repeat.clamp(1, MAX_REPEAT),
            spec,
        })
    }

    fn check_template(
        &mut self,
        u: &TplUse,
        params: &[String],
        secrets: &BTreeMap<String, SecretSource>,
        kinds: &HashMap<String, &'static str>,
        all: &[String],
    ) {
        let refs = match template::references(&u.src) {
            Ok(r) => r,
            Err(e) => {
                self.diag_at(
                    u.at.as_ref(),
                    format!("template does not parse: {e}"),
                    "in this value",
                    None,
                );
                return;
            }
        };
        for r in refs {
            let seg: Vec<&str> = r.segments.iter().map(String::as_str).collect();
            match seg.as_slice() {
                ["params", p, ..] if !params.iter().any(|x| x == p) => {
                    let help = did_you_mean(p, params.iter().map(String::as_str))
                        .map(|s| format!("did you mean `params.{s}`?"))
                        .or_else(|| {
                            Some(format!(
                                "declare it under `params:` (declared: {})",
                                if params.is_empty() {
                                    "none".into()
                                } else {
                                    params.join(", ")
                                }
                            ))
                        });
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}` names an undeclared param", r.dotted()),
                        "in this value",
                        help,
                    );
                }
                ["secrets", s, ..] if !secrets.contains_key(*s) => {
                    let help = did_you_mean(s, secrets.keys().map(String::as_str)).map(|x| format!("did you mean `secrets.{x}`?"))
                        .or_else(|| Some("declare it under `secrets:` with the environment variable that holds it".into()));
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}` names an undeclared secret", r.dotted()),
                        "in this value",
                        help,
                    );
                }
                ["resources", ..] if !u.resources_allowed => {
                    self.diag_at(u.at.as_ref(), format!("`{}`: resource outputs cannot be used here", r.dotted()), "in this value",
                        Some("resource outputs exist only after creation; use them in service env, service start and checks".into()));
                }
                ["resources", name, output, ..] => match kinds.get(*name) {
                    None if all.iter().any(|a| a == name) => {}
                    None => self.unknown_resource(name, u.at.as_ref(), all),
                    Some(kind) => {
                        let outs = ResourceSpec::outputs(kind);
                        if !outs.contains(output) {
                            let help = did_you_mean(output, outs.iter().copied()).map_or_else(
                                || format!("a {kind} has: {}", outs.join(", ")),
                                |s| format!("did you mean `resources.{name}.{s}`?"),
                            );
                            self.diag_at(
                                u.at.as_ref(),
                                format!("`{}`: a {kind} has no output `{output}`", r.dotted()),
                                "in this value",
                                Some(help),
                            );
                        }
                    }
                },
                ["resources", ..] => {
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}` must name a resource and an output", r.dotted()),
                        "in this value",
                        Some("write `resources.NAME.OUTPUT`, e.g. `resources.db.url`".into()),
                    );
                }
                ["release", f] if !["ref", "version", "git_sha"].contains(f) => {
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}`: the release has no field `{f}`", r.dotted()),
                        "in this value",
                        Some("release fields: ref, version, git_sha".into()),
                    );
                }
                ["sinks", ..] if !u.resources_allowed => {
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}`: the sinks exist only during a run", r.dotted()),
                        "in this value",
                        Some("use sinks in service env, service start and checks".into()),
                    );
                }
                ["sinks", "smtp" | "http", f] if !["url", "host", "port"].contains(f) => {
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}`: a sink has no field `{f}`", r.dotted()),
                        "in this value",
                        Some("sink fields: url, host, port".into()),
                    );
                }
                ["sinks", s, _] if !["smtp", "http"].contains(s) => {
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}`: there is no sink `{s}`", r.dotted()),
                        "in this value",
                        Some("sinks: smtp, http".into()),
                    );
                }
                ["sinks", ..] if seg.len() != 3 => {
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}` must name a sink and a field", r.dotted()),
                        "in this value",
                        Some("e.g. `sinks.smtp.url`, `sinks.http.url`".into()),
                    );
                }
                ["run", f] if !["id", "blueprint"].contains(f) => {
                    self.diag_at(
                        u.at.as_ref(),
                        format!("`{}`: the run has no field `{f}`", r.dotted()),
                        "in this value",
                        Some("run fields: id, blueprint".into()),
                    );
                }
                _ => {}
            }
        }
    }

    /// Reports each dependency cycle once, with its whole chain. Hand-written DFS: graph
    /// crates report only a node of the cycle, and the chain is what the user needs.
    fn cycles(&mut self, resources: &[Resource], marks: &HashMap<String, Option<Marker>>) {
        let idx: HashMap<&str, usize> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        let deps: Vec<Vec<usize>> = resources
            .iter()
            .map(|r| {
                r.all_deps()
                    .iter()
                    .filter_map(|d| idx.get(d.as_str()).copied())
                    .collect()
            })
            .collect();
        let mut state = vec![0u8; resources.len()]; // 0 new, 1 on stack, 2 done
        let mut stack: Vec<usize> = Vec::new();
        let mut reported: Vec<Vec<usize>> = Vec::new();
        fn visit(
            n: usize,
            deps: &[Vec<usize>],
            state: &mut [u8],
            stack: &mut Vec<usize>,
            found: &mut Vec<Vec<usize>>,
        ) {
            state[n] = 1;
            stack.push(n);
            for &d in &deps[n] {
                if state[d] == 1 {
                    let pos = stack.iter().position(|&x| x == d).unwrap_or(0);
                    let mut cyc: Vec<usize> = stack[pos..].to_vec();
                    let min = cyc
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, v)| **v)
                        .map_or(0, |(i, _)| i);
                    cyc.rotate_left(min);
                    if !found.contains(&cyc) {
                        found.push(cyc);
                    }
                } else if state[d] == 0 {
                    visit(d, deps, state, stack, found);
                }
            }
            stack.pop();
            state[n] = 2;
        }
        for i in 0..resources.len() {
            if state[i] == 0 {
                visit(i, &deps, &mut state, &mut stack, &mut reported);
            }
        }
        for cyc in reported {
            let mut chain: Vec<&str> = cyc.iter().map(|&i| resources[i].name.as_str()).collect();
            chain.push(chain[0]);
            let first = chain[0].to_string();
            let at = marks.get(&first).copied().flatten();
            self.diag_at(
                at.as_ref(),
                format!("dependency cycle: {}", chain.join(" → ")),
                "cycle starts here",
                Some("remove one `depends_on` or template reference in the chain".into()),
            );
        }
    }
}

fn other_message(e: &marked_yaml::Error) -> String {
    match e {
        marked_yaml::Error::NotBoolean(_) => "expected true or false".into(),
        marked_yaml::Error::IntegerParseFailure(err, _) => {
            format!("expected a whole number ({err})")
        }
        marked_yaml::Error::FloatParseFailure(err, _) => format!("expected a number ({err})"),
        marked_yaml::Error::UnknownFieldError(f, _, _) => format!("unknown key `{f}`"),
        marked_yaml::Error::Other(m, _) => m.replace("marked_yaml::Node", "value"),
    }
}

pub(crate) fn load_error(e: &marked_yaml::LoadError) -> (Option<Marker>, String) {
    use marked_yaml::LoadError as L;
    match e {
        L::TopLevelMustBeMapping(m) => (Some(*m), "the top level must be a mapping".into()),
        L::TopLevelMustBeSequence(m) => (Some(*m), "the top level must be a sequence".into()),
        L::UnexpectedAnchor(m) => (Some(*m), "anchors and aliases are not supported".into()),
        L::MappingKeyMustBeScalar(m) => (
            Some(*m),
            "mapping keys must be plain strings (a value that starts with `{{` must be quoted: \"{{resources.db.url}}\")".into(),
        ),
        L::UnexpectedTag(m) => (Some(*m), "explicit tags are not supported".into()),
        L::ScanError(m, s) => (Some(*m), s.info().to_string()),
        L::DuplicateKey(d) => (
            d.key.span().start().copied(),
            format!("duplicate key `{}`", d.key.as_str()),
        ),
    }
}

/// A value for a message: quoted and escaped, at most 60 characters (values may be hostile).
fn shown(value: &str) -> String {
    let mut v: String = value.chars().take(60).collect();
    if v.len() < value.len() {
        v.push('…');
    }
    format!("{v:?}")
}

/// A blueprint or resource name: a lowercase letter, then lowercase letters, digits, `-` and
/// `_`; at most 40 characters.
#[must_use]
pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && s.len() <= 40
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diags(text: &str) -> Vec<String> {
        match compile(Path::new("t.yaml"), text, &BTreeMap::new()) {
            Ok(_) => Vec::new(),
            Err(CompileError::Invalid(d)) => d
                .items
                .iter()
                .map(|i| format!("{}:{}: {}", i.line, i.col, i.message))
                .collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_budget_is_a_positive_amount_of_dollars_and_nothing_else() {
        let base = "name: t\nresources:\n  b:\n    type: bucket\n    source: s\n";
        let ok = compile(
            Path::new("t.yaml"),
            &format!("{base}budget:\n  max_usd: 2.5\n"),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(ok.budget, Some(2.5));
        for (bad, want) in [
            (
                "max_usd: 0",
                "7:12: budget.max_usd: \"0\" is not an amount of US dollars above 0",
            ),
            (
                "max_usd: lots",
                "7:12: budget.max_usd: \"lots\" is not an amount",
            ),
            ("max_usd: -1", "7:12: budget.max_usd: \"-1\" is not"),
            ("max_eur: 5", "7:3: unknown key `max_eur` in budget"),
        ] {
            let d = diags(&format!("{base}budget:\n  {bad}\n")).join("\n");
            assert!(d.contains(want), "{bad}: {d}");
        }
    }

    #[test]
    fn user_data_that_asks_for_the_env_is_refused_at_its_line_with_the_fix() {
        let d = diags(
            "name: t\nresources:\n  app:\n    type: service\n    aws:\n      ami: ami-1\n      user_data: \"#!/bin/sh\\necho {{release.version}} {{{ install_steps }}}\"\n",
        );
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("7:"), "{d:?}");
        assert!(
            d[0].contains("`install_steps`, which the user data no longer gets"),
            "{d:?}"
        );
        // The boot's own values are fine.
        let ok = diags(
            "name: t\nresources:\n  app:\n    type: service\n    aws:\n      ami: ami-1\n      user_data: \"#!/bin/sh\\ncurl '{{{release.url}}}' # {{service}} {{port}} {{run.id}}\"\n",
        );
        assert!(ok.is_empty(), "{ok:?}");
    }

    #[test]
    fn mysql_family_databases_refuse_sql_checks_masking_and_the_gate_with_the_fix() {
        let d = diags(
            "name: t\nresources:\n  db:\n    type: database\n    engine: aurora-mysql\n    source: prod\nmasking:\n  db:\n    customers.email: email\nchecks:\n  - name: q\n    type: sql\n    database: db\n    query: select 1\n",
        );
        let all = d.join("\n");
        for want in [
            "3:3: database `db` is aurora-mysql: the personal data gate (on by default) scans PostgreSQL and SQLite copies only",
            "`masking` has rules for `db`, which is aurora-mysql",
            "13:15: `db` is aurora-mysql: sql checks run on PostgreSQL and SQLite only",
        ] {
            assert!(all.contains(want), "{want}\n{all}");
        }
        assert_eq!(d.len(), 3, "{all}");
        for engine in ["mysql", "mariadb", "aurora-postgresql", "postgresql"] {
            let ok = diags(&format!(
                "name: t\npii_gate: off\nresources:\n  db:\n    type: database\n    engine: {engine}\n    source: prod\n"
            ));
            assert!(ok.is_empty(), "{engine}: {ok:?}");
        }
        // Aurora PostgreSQL speaks PostgreSQL: the gate, masking and sql checks apply.
        let pg = compile(
            Path::new("t.yaml"),
            "name: t\nresources:\n  db:\n    type: database\n    engine: aurora-postgresql\n    source: prod\nchecks:\n  - name: q\n    type: sql\n    database: db\n    query: select 1\n",
            &BTreeMap::new(),
        );
        assert!(pg.is_ok(), "{:?}", pg.err());
    }

    #[test]
    fn minimal_blueprint_compiles_with_defaults() {
        let bp = compile(Path::new("dir/t.yaml"), "name: t\nresources:\n  db:\n    type: database\n    engine: sqlite\n    source: prod\n", &BTreeMap::new()).unwrap();
        assert_eq!(bp.teardown, TeardownPolicy::Always);
        assert_eq!(bp.ttl, Duration::from_secs(6 * 3600));
        assert_eq!(bp.local.backups, Path::new("dir/backups"));
        assert_eq!(bp.resource("db").unwrap().address(), "database.db");
    }

    #[test]
    fn template_references_imply_dependencies() {
        let bp = compile(
            Path::new("t.yaml"),
            "name: t\nresources:\n  db:\n    type: database\n    engine: sqlite\n    source: prod\n  app:\n    type: service\n    env:\n      DB: \"{{resources.db.path}}\"\n",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(bp.resource("app").unwrap().implied, ["db"]);
    }

    #[test]
    fn unknown_output_and_param_get_did_you_mean() {
        let d = diags(
            "name: t\nparams:\n  region: {default: x}\nresources:\n  db:\n    type: database\n    engine: sqlite\n    source: prod\n  app:\n    type: service\n    env:\n      A: \"{{resources.db.pth}}\"\n      B: \"{{params.regoin}}\"\n",
        );
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].contains("12:10") && d[0].contains("no output `pth`"),
            "{d:?}"
        );
        assert!(
            d[1].contains("13:10") && d[1].contains("undeclared param"),
            "{d:?}"
        );
    }

    #[test]
    fn cycle_is_reported_once_with_the_whole_chain() {
        let d = diags(
            "name: t\nresources:\n  a:\n    type: service\n    depends_on: [b]\n  b:\n    type: service\n    depends_on: [a]\n",
        );
        assert_eq!(d, ["3:3: dependency cycle: a → b → a"]);
    }

    #[test]
    fn source_may_use_params_and_is_rendered_at_compile_time() {
        let text = "name: t\nparams:\n  which: {default: shop}\nresources:\n  db:\n    type: database\n    engine: sqlite\n    source: \"{{params.which}}-db\"\n";
        let bp = compile(
            Path::new("t.yaml"),
            text,
            &BTreeMap::from([("which".to_string(), "blog".to_string())]),
        )
        .unwrap();
        let ResourceSpec::Database(db) = &bp.resource("db").unwrap().spec else {
            panic!()
        };
        assert_eq!(db.source, "blog-db");
        let d = diags(
            "name: t\nresources:\n  db:\n    type: database\n    engine: sqlite\n    source: \"{{resources.x.url}}\"\n",
        );
        assert!(d.iter().any(|m| m.contains("cannot be used here")), "{d:?}");
    }

    #[test]
    fn unquoted_template_value_explains_the_quoting_rule() {
        let d = diags(
            "name: t\nresources:\n  app:\n    type: service\n    env:\n      A: {{resources.db.url}}\n",
        );
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("must be quoted"), "{d:?}");
    }

    #[test]
    fn oversized_blueprint_is_refused_with_the_limit() {
        let text = format!("name: t\n# {}\n", "x".repeat(MAX_BLUEPRINT_BYTES));
        let d = diags(&text);
        assert!(d[0].contains("the limit is"), "{d:?}");
    }

    #[test]
    fn bad_duration_names_the_field() {
        let d = diags("name: t\nttl: soon\nresources:\n  a:\n    type: service\n");
        assert!(
            d[0].starts_with("2:6: ttl: `soon` is not a duration"),
            "{d:?}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_and_huge_lines_are_not_quoted() {
        let text = format!(
            "name: x\nresources: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let Err(CompileError::Invalid(d)) = compile(Path::new("t.yaml"), &text, &BTreeMap::new())
        else {
            panic!("must not compile")
        };
        let r = d.render(false);
        assert!(
            r.contains("recursion limit") && r.contains("not shown") && r.len() < 1000,
            "{}",
            &r[..r.len().min(2000)]
        );
    }

    #[test]
    fn masking_firewall_and_sinks_are_checked_with_their_fixes() {
        let base = "name: x\nresources:\n  db: {type: database, engine: sqlite, source: s}\n  files: {type: bucket, source: b}\n";
        let d = diags(&format!(
            "{base}masking:\n  db:\n    customers.email: emial\n    nodot: hash\n  files:\n    a.b: keep\npii_gate: maybe\nfirewall:\n  mode: strict\n  allow: [\"no-port\", \"h:99999\"]\nchecks:\n  - name: m\n    type: mail\n    expect: {{to_contains: \"{{{{sinks.smtp.uri}}}}\", subject_contains: \"{{{{sinks.ftp.url}}}}\"}}\n"
        ));
        let all = d.join("\n");
        for want in [
            "unknown masking strategy \"emial\" for \"customers.email\"",
            "\"nodot\" is not `table.column`",
            "`masking` names `files`, which is not a database resource",
            "`pii_gate` is `on` or `off`, not \"maybe\"",
            "unknown firewall mode \"strict\"",
            "\"no-port\" is not `host:port`",
            "\"h:99999\" is not `host:port`",
            "`sinks.smtp.uri`: a sink has no field `uri`",
            "`sinks.ftp.url`: there is no sink `ftp`",
        ] {
            assert!(all.contains(want), "missing `{want}` in:\n{all}");
        }
        assert_eq!(d.len(), 9, "{all}");
        let ok = compile(
            Path::new("t.yaml"),
            &format!("{base}masking:\n  db:\n    public.customers.email: email\n    t.notes: \"null\"\npii_gate: off\nfirewall: required\n"),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(ok.masking["db"][0].table, "public.customers");
        assert_eq!(ok.masking["db"][1].strategy, crate::privacy::Strategy::Null);
        assert_eq!(ok.pii_gate, crate::privacy::Gate::Off);
        assert_eq!(ok.firewall.mode, crate::firewall::Mode::Required);
    }
}

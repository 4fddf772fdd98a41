//! Handlebars templates inside blueprint values.
//!
//! Templates are checked at compile time (syntax, and that every `params.*`, `secrets.*` and
//! `resources.*.*` they name exists) and rendered late: a value that names a resource output is
//! rendered when the resource that uses it starts, after its dependencies exist.
//!
//! References are found by scanning the `{{ … }}` expressions for dotted paths rather than by
//! walking handlebars' AST, whose shape is internal to that crate; handlebars still parses every
//! template, so a syntax error is reported by the real parser.

use std::sync::LazyLock;

use handlebars::Handlebars;
use serde_json::Value;

static HBS: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut h = Handlebars::new();
    h.set_strict_mode(true);
    h.register_escape_fn(handlebars::no_escape);
    h
});

/// Where a template's output goes, which decides what a substituted value may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// Passed as data (an environment variable, an HTTP header, a URL): any value.
    Plain,
    /// Parsed by `sh -c` (command checks, service `start`).
    Shell,
    /// Parsed as SQL (sql check queries).
    Sql,
    /// A name that becomes part of a path or an API identifier (a resource's `source`).
    Name,
}

impl Position {
    /// How the position is named in messages.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Position::Plain => "a value",
            Position::Shell => "a shell command",
            Position::Sql => "an SQL query",
            Position::Name => "a production source name",
        }
    }
}

/// Characters a value substituted into a shell command or SQL query may contain without a
/// declared `pattern`: none of them is special to `sh` or can end an SQL literal.
pub const SAFE_CHARS: &str = "letters, digits and . _ - / : @ % + = ,";

/// Why `value` may not be substituted at `pos`, or `None` when it may. In a shell command or an
/// SQL query a value may hold only [`SAFE_CHARS`], must not start with `-` (an option) and must
/// not contain `--` (an SQL comment); a name may in addition hold no `/` and no `..`.
#[must_use]
pub fn unsafe_in(value: &str, pos: Position) -> Option<String> {
    if pos == Position::Plain || value.is_empty() {
        return None;
    }
    let mut bad: Vec<char> = value
        .chars()
        .filter(|c| {
            !(c.is_ascii_alphanumeric()
                || matches!(c, '.' | '_' | '-' | '/' | ':' | '@' | '%' | '+' | '=' | ','))
                || (pos == Position::Name && *c == '/')
        })
        .collect();
    bad.sort_unstable();
    bad.dedup();
    if !bad.is_empty() {
        let shown: Vec<String> = bad.iter().take(8).map(|c| format!("{c:?}")).collect();
        return Some(format!("it contains {}", shown.join(", ")));
    }
    if value.starts_with('-') {
        return Some("it starts with `-`".into());
    }
    if value.contains("--") {
        return Some("it contains `--`".into());
    }
    if pos == Position::Name && (value == "." || value == "..") {
        return Some(format!("it is `{value}`"));
    }
    None
}

/// Whether `src` uses a form that writes a value without escaping (`{{{x}}}`, `{{& x}}`),
/// which would bypass the check of [`render_in`].
#[must_use]
pub fn has_raw_output(src: &str) -> bool {
    let mut rest = src;
    while let Some(i) = rest.find("{{") {
        let after = rest[i + 2..].trim_start_matches('~').trim_start();
        if after.starts_with('{') || after.starts_with('&') {
            return true;
        }
        rest = &rest[i + 2..];
    }
    false
}

/// Roots a template may name.
pub const ROOTS: &[&str] = &["params", "secrets", "resources", "release", "run", "sinks"];

/// A dotted path named in a template, e.g. `resources.db.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefPath {
    /// Path segments: `["resources", "db", "url"]`.
    pub segments: Vec<String>,
}

impl RefPath {
    /// `a.b.c`.
    #[must_use]
    pub fn dotted(&self) -> String {
        self.segments.join(".")
    }
}

/// Checks the template's syntax and returns the paths it names.
///
/// # Errors
/// The handlebars parser's message when the template does not parse.
pub fn references(src: &str) -> Result<Vec<RefPath>, String> {
    if !src.contains("{{") {
        return Ok(Vec::new());
    }
    handlebars::Template::compile(src).map_err(|e| first_line(&e.to_string()))?;
    Ok(tokens(src)
        .into_iter()
        .filter(|token| {
            token
                .split('.')
                .next()
                .is_some_and(|root| ROOTS.contains(&root))
        })
        .map(|token| RefPath {
            segments: token.split('.').map(str::to_string).collect(),
        })
        .collect())
}

/// The words inside the `{{…}}` expressions of `src` (paths, helper names, `#if`), in order.
#[must_use]
pub fn tokens(src: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let expr = after[..end].trim_matches(|c| c == '{' || c == '}' || c == '~' || c == ' ');
        out.extend(
            expr.split_whitespace()
                .map(|t| t.trim_matches(|c| c == '(' || c == ')')),
        );
        rest = &after[end + 2..];
    }
    out
}

/// Renders `src` against `ctx` (strict: a missing value is an error, not an empty string).
///
/// # Errors
/// Handlebars' message, e.g. which variable was missing.
pub fn render(src: &str, ctx: &Value) -> Result<String, String> {
    if !src.contains("{{") {
        return Ok(src.to_string());
    }
    HBS.render_template(src, ctx).map_err(|e| {
        let msg = first_line(&e.to_string());
        // handlebars puts "Error rendering "Unnamed template" line 1, col 3:" in front.
        msg.rsplit_once(": ")
            .map_or(msg.clone(), |(_, m)| m.to_string())
    })
}

/// Renders `src` for `pos`: every substituted value must pass [`unsafe_in`] for that position,
/// unless it is one of `vetted` (the values of params that declare a `pattern` or `values`,
/// already validated). Values are checked as handlebars writes them (its escape function), so
/// loops and helpers are covered too; `{{{…}}}` and `{{& …}}` are refused.
///
/// # Errors
/// Handlebars' message, or which value is not safe here and why (with the context path that
/// holds it, when one does).
pub fn render_in(
    src: &str,
    ctx: &Value,
    pos: Position,
    vetted: &[String],
) -> Result<String, String> {
    if pos == Position::Plain {
        return render(src, ctx);
    }
    if !src.contains("{{") {
        return Ok(src.to_string());
    }
    if has_raw_output(src) {
        return Err(format!(
            "`{{{{{{…}}}}}}` and `{{{{& …}}}}` are not allowed in {}: write `{{{{…}}}}`",
            pos.describe()
        ));
    }
    let refused: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> =
        std::sync::Arc::default();
    let seen = refused.clone();
    let vetted = vetted.to_vec();
    let mut h = Handlebars::new();
    h.set_strict_mode(true);
    h.register_escape_fn(move |v: &str| {
        if vetted.iter().any(|x| x == v) {
            return v.to_string();
        }
        match unsafe_in(v, pos) {
            None => v.to_string(),
            Some(why) => {
                if let Ok(mut s) = seen.lock() {
                    s.push((v.to_string(), why));
                }
                String::new()
            }
        }
    });
    let out = h.render_template(src, ctx).map_err(|e| {
        let msg = first_line(&e.to_string());
        msg.rsplit_once(": ")
            .map_or(msg.clone(), |(_, m)| m.to_string())
    })?;
    let refused = refused.lock().map(|r| r.clone()).unwrap_or_default();
    if let Some((value, why)) = refused.first() {
        let from = path_of(ctx, value).map_or_else(String::new, |p| format!("`{p}` "));
        return Err(format!(
            "the value of {from}cannot be used in {}: {why}; only {SAFE_CHARS} are allowed there without a declared param `pattern`",
            pos.describe()
        ));
    }
    Ok(out)
}

/// The dotted path of the first string leaf of `ctx` equal to `value`, for messages.
fn path_of(ctx: &Value, value: &str) -> Option<String> {
    match ctx {
        Value::String(s) if s == value => Some(String::new()),
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            path_of(v, value).map(|p| {
                if p.is_empty() {
                    k.clone()
                } else {
                    format!("{k}.{p}")
                }
            })
        }),
        Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
            path_of(v, value).map(|p| {
                if p.is_empty() {
                    i.to_string()
                } else {
                    format!("{i}.{p}")
                }
            })
        }),
        _ => None,
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_found_in_every_expression() {
        let r = references("{{resources.db.url}}/x?t={{ secrets.token }}&{{params.p}}").unwrap();
        let d: Vec<_> = r.iter().map(RefPath::dotted).collect();
        assert_eq!(d, ["resources.db.url", "secrets.token", "params.p"]);
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(references("{{#if x}}no end").is_err());
    }

    #[test]
    fn hostile_values_never_reach_a_shell_or_sql_position() {
        let ctx = json!({"params": {"ok": "shop-db_1.2", "x": "$(touch /tmp/pwned)", "q": "1; DROP TABLE t"},
                         "resources": {"db": {"path": "/state/copies/r/db/shop.sqlite"}}});
        assert_eq!(
            render_in(
                "test -s {{resources.db.path}} {{params.ok}}",
                &ctx,
                Position::Shell,
                &[]
            )
            .unwrap(),
            "test -s /state/copies/r/db/shop.sqlite shop-db_1.2"
        );
        for (src, pos) in [
            ("echo {{params.x}}", Position::Shell),
            ("echo {{#each params}}{{this}}{{/each}}", Position::Shell),
            ("echo {{lookup params \"x\"}}", Position::Shell),
            ("select {{params.q}}", Position::Sql),
            ("echo {{{params.x}}}", Position::Shell),
            ("echo {{~{params.x}~}}", Position::Shell),
            ("echo {{& params.x}}", Position::Shell),
        ] {
            let e = render_in(src, &ctx, pos, &[]).unwrap_err();
            assert!(
                e.contains("cannot be used") || e.contains("not allowed"),
                "{src}: {e}"
            );
        }
        let e = render_in("echo {{params.x}}", &ctx, Position::Shell, &[]).unwrap_err();
        assert!(e.contains("`params.x`") && e.contains("'$'"), "{e}");
        // A vetted value (its param declares a pattern) is the author's choice.
        let vetted = vec!["1; DROP TABLE t".to_string()];
        assert!(render_in("select {{params.q}}", &ctx, Position::Sql, &vetted).is_ok());
    }

    #[test]
    fn the_safe_set_is_strict_about_options_comments_and_names() {
        assert_eq!(
            unsafe_in("a b", Position::Shell).unwrap(),
            "it contains ' '"
        );
        assert!(unsafe_in("-rf", Position::Shell).is_some());
        assert!(unsafe_in("1--", Position::Sql).is_some());
        assert!(unsafe_in("a'b", Position::Sql).is_some());
        assert!(unsafe_in("../etc", Position::Name).is_some());
        assert!(unsafe_in("..", Position::Name).is_some());
        assert!(unsafe_in("a/b", Position::Name).is_some());
        assert!(unsafe_in("a/b", Position::Shell).is_none());
        assert!(unsafe_in("postgres://u:p@127.0.0.1:5432/app", Position::Shell).is_none());
        assert!(unsafe_in("anything $ goes", Position::Plain).is_none());
    }

    #[test]
    fn render_is_strict_and_does_not_html_escape() {
        let ctx = json!({"params": {"a": "<b>&"}});
        assert_eq!(render("x{{params.a}}", &ctx).unwrap(), "x<b>&");
        let err = render("{{params.missing}}", &ctx).unwrap_err();
        assert!(err.contains("missing"), "{err}");
    }
}

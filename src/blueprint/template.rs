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

/// Roots a template may name.
pub const ROOTS: &[&str] = &["params", "secrets", "resources", "release", "run"];

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
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let expr = after[..end].trim_matches(|c| c == '{' || c == '}' || c == '~' || c == ' ');
        for token in expr.split_whitespace() {
            let token = token.trim_matches(|c| c == '(' || c == ')');
            if let Some(root) = token.split('.').next()
                && ROOTS.contains(&root)
            {
                out.push(RefPath {
                    segments: token.split('.').map(str::to_string).collect(),
                });
            }
        }
        rest = &after[end + 2..];
    }
    Ok(out)
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
    fn render_is_strict_and_does_not_html_escape() {
        let ctx = json!({"params": {"a": "<b>&"}});
        assert_eq!(render("x{{params.a}}", &ctx).unwrap(), "x<b>&");
        let err = render("{{params.missing}}", &ctx).unwrap_err();
        assert!(err.contains("missing"), "{err}");
    }
}

//! Blueprint diagnostics: every problem in a file, each with file:line:col, the source line, a
//! caret and, where we can guess it, a "did you mean".
//!
//! Rendering is miette's graphical handler (no hand-written snippet code); the model here is
//! plain data so that compile can collect all diagnostics before anything is printed.

use std::fmt;

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan};

/// Lines longer than this are not quoted in diagnostics.
const MAX_SNIPPET_LINE: usize = 400;

/// One problem in a blueprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// What is wrong, lower-case, specific.
    pub message: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (characters).
    pub col: usize,
    /// Byte offset of the span in the source.
    pub offset: usize,
    /// Byte length of the span (at least 1 when the source is not empty).
    pub len: usize,
    /// Short label under the caret.
    pub label: String,
    /// How to fix it.
    pub help: Option<String>,
}

/// Locates positions in a source text.
#[derive(Debug, Clone)]
pub struct SourceMap<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    /// Indexes `text`.
    #[must_use]
    pub fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line_starts.push(i + 1);
            }
        }
        SourceMap { text, line_starts }
    }

    /// Byte offset of a 1-based line and character column.
    #[must_use]
    pub fn offset(&self, line: usize, col: usize) -> usize {
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else {
            return self.text.len();
        };
        let rest = &self.text[start..];
        rest.char_indices()
            .nth(col.saturating_sub(1))
            .map_or(self.text.len(), |(i, _)| start + i)
    }

    /// Byte length of the token at `offset`: up to the end of the line, or of the word for
    /// unquoted scalars, so that carets underline the key or value, not the rest of the line.
    #[must_use]
    pub fn token_len(&self, offset: usize) -> usize {
        let rest = &self.text[offset.min(self.text.len())..];
        let line = rest.split('\n').next().unwrap_or("");
        let line = line.trim_end();
        let end = if line.starts_with('"') || line.starts_with('\'') {
            let q = line.as_bytes()[0] as char;
            line[1..].find(q).map_or(line.len(), |i| i + 2)
        } else {
            line.find(": ")
                .or_else(|| line.strip_suffix(':').map(str::len))
                .or_else(|| line.find(" #"))
                .unwrap_or(line.len())
        };
        end.max(1)
    }

    /// A diagnostic at 1-based `line`:`col`.
    #[must_use]
    pub fn at(
        &self,
        line: usize,
        col: usize,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> Diagnostic {
        let offset = self.offset(line, col);
        let len = if self.text.is_empty() {
            0
        } else {
            self.token_len(offset)
        };
        Diagnostic {
            message: message.into(),
            line,
            col,
            offset,
            len,
            label: label.into(),
            help: None,
        }
    }
}

impl Diagnostic {
    /// Adds a help line.
    #[must_use]
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Every diagnostic of one file.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    /// The file as the user named it.
    pub file: String,
    /// Its text (after nothing: diagnostics point into what the user wrote).
    pub source: String,
    /// The problems, in file order.
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// Renders all diagnostics, followed by a one-line count.
    #[must_use]
    pub fn render(&self, color: bool) -> String {
        let theme = if color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme)
            .with_width(100)
            .with_links(false);
        let mut out = String::new();
        for d in &self.items {
            // A snippet of a huge line (minified or generated YAML) helps nobody: say where.
            let line_len = self
                .source
                .lines()
                .nth(d.line.saturating_sub(1))
                .map_or(0, str::len);
            if line_len > MAX_SNIPPET_LINE {
                out.push_str(&format!(
                    "  × {}:{}:{}: {}\n",
                    self.file, d.line, d.col, d.message
                ));
                out.push_str(&format!(
                    "    (line {} is {line_len} characters long; not shown)\n",
                    d.line
                ));
                if let Some(h) = &d.help {
                    out.push_str(&format!("  help: {h}\n"));
                }
                continue;
            }
            let report = Rendered {
                d,
                file: &self.file,
                source: NamedSource::new(&self.file, self.source.clone()),
            };
            let _ = handler.render_report(&mut out, &report);
        }
        let n = self.items.len();
        out.push_str(&format!(
            "{}: {n} error{}\n",
            self.file,
            if n == 1 { "" } else { "s" }
        ));
        out
    }

    /// One line per diagnostic: `file:line:col: message`.
    #[must_use]
    pub fn short(&self) -> String {
        self.items
            .iter()
            .map(|d| format!("{}:{}:{}: {}", self.file, d.line, d.col, d.message))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl std::error::Error for Diagnostics {}

struct Rendered<'a> {
    d: &'a Diagnostic,
    file: &'a str,
    source: NamedSource<String>,
}

impl fmt::Debug for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.d.message)
    }
}

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.d.line, self.d.col, self.d.message
        )
    }
}

impl std::error::Error for Rendered<'_> {}

impl miette::Diagnostic for Rendered<'_> {
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = SourceSpan::new(self.d.offset.into(), self.d.len);
        Some(Box::new(std::iter::once(LabeledSpan::new_with_span(
            Some(self.d.label.clone()),
            span,
        ))))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.d
            .help
            .as_ref()
            .map(|h| Box::new(h.clone()) as Box<dyn fmt::Display>)
    }
}

/// The closest candidate to `word` if it is close enough to be a likely typo.
#[must_use]
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Where the key `name` is written inside `node` (depth first), for precise carets.
pub fn find_key(node: &marked_yaml::Node, name: &str) -> Option<marked_yaml::Marker> {
    match node {
        marked_yaml::Node::Mapping(m) => {
            for (k, v) in m.iter() {
                if k.as_str() == name {
                    return k.span().start().copied();
                }
                if let Some(found) = find_key(v, name) {
                    return Some(found);
                }
            }
            None
        }
        marked_yaml::Node::Sequence(seq) => seq.iter().find_map(|v| find_key(v, name)),
        marked_yaml::Node::Scalar(_) => None,
    }
}

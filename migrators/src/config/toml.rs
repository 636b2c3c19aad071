//! TOML: `toml_edit` parses the text into a document that keeps the span of
//! every value, which is exactly what span editing needs (its mutable
//! document would re-render edited values with its own formatting).

use toml_edit::{Item, Table, Value};

use super::Format;
use super::error::{Error, Result};
use super::leaf::{Leaf, Lines, Style};

pub(crate) fn leaves(file: &str, text: &str) -> Result<Vec<Leaf>> {
    let doc = toml_edit::Document::parse(text).map_err(|e| Error::Parse {
        file: file.to_owned(),
        format: Format::Toml,
        line: e.span().map(|s| super::leaf::line_of(text, s.start)),
        message: e.message().trim().to_owned(),
    })?;
    let mut w = Walker {
        text,
        lines: Lines::new(text),
        out: Vec::new(),
    };
    w.table(doc.as_table(), "");
    // Tables may be written out of order (`[a]`, `[b]`, `[a.c]`): keep the
    // leaves in text order so edits and read-back line up.
    w.out.sort_by_key(|l| l.span.start);
    Ok(w.out)
}

struct Walker<'a> {
    text: &'a str,
    lines: Lines,
    out: Vec<Leaf>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Walker<'_> {
    fn table(&mut self, t: &Table, path: &str) {
        for (k, item) in t.iter() {
            let p = join(path, k);
            match item {
                Item::None => {}
                Item::Value(v) => self.value(v, p),
                Item::Table(t) => self.table(t, &p),
                Item::ArrayOfTables(a) => {
                    for (i, t) in a.iter().enumerate() {
                        self.table(t, &format!("{p}[{i}]"));
                    }
                }
            }
        }
    }

    fn value(&mut self, v: &Value, path: String) {
        match v {
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    self.value(x, format!("{path}[{i}]"));
                }
            }
            Value::InlineTable(t) => {
                for (k, x) in t.iter() {
                    self.value(x, join(&path, k));
                }
            }
            Value::String(s) => {
                let Some(span) = s.span() else { return };
                let raw = self.text.get(span.clone()).unwrap_or_default();
                let style = if raw.starts_with("\"\"\"") {
                    Style::Multi { literal: false }
                } else if raw.starts_with("'''") {
                    Style::Multi { literal: true }
                } else if raw.starts_with('\'') {
                    Style::Single
                } else {
                    Style::Double
                };
                self.out.push(Leaf {
                    path,
                    line: self.lines.line_of(span.start),
                    span,
                    value: s.value().clone(),
                    style,
                });
            }
            other => {
                let Some(span) = other.span() else { return };
                let raw = self.text.get(span.clone()).unwrap_or_default();
                self.out.push(Leaf {
                    path,
                    line: self.lines.line_of(span.start),
                    value: raw.to_owned(),
                    span,
                    style: Style::Bare { string: false },
                });
            }
        }
    }
}

/// A TOML basic string.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn spans_styles_and_paths() {
        let t = "a = 'lit'\n[s]\nhost = \"db.x\" # c\nport = 1\nlist = [\"u\", {k = \"\"\"m\"\"\"}]\n[[t]]\nn = true\n";
        let l = leaves("f.toml", t).unwrap();
        let v: Vec<_> = l
            .iter()
            .map(|x| (x.path.as_str(), &t[x.span.clone()], x.style))
            .collect();
        assert_eq!(
            v,
            vec![
                ("a", "'lit'", Style::Single),
                ("s.host", "\"db.x\"", Style::Double),
                ("s.port", "1", Style::Bare { string: false }),
                ("s.list[0]", "\"u\"", Style::Double),
                (
                    "s.list[1].k",
                    "\"\"\"m\"\"\"",
                    Style::Multi { literal: false }
                ),
                ("t[0].n", "true", Style::Bare { string: false }),
            ]
        );
        assert_eq!(l[1].line, 3);
        let e = leaves("x.toml", "a = 1\nb = \n").unwrap_err();
        assert!(e.to_string().starts_with("x.toml:2: invalid TOML"), "{e}");
        assert_eq!(quote("a\"b\\\u{7f}"), "\"a\\\"b\\\\\\u007F\"");
    }
}

//! Line-oriented formats: INI (`key = value`, `key: value`, `[section]`,
//! `;` and `#` comments, as in `wiki.ini` or `postgresql.conf`) and `.env`
//! (`NAME=value`, optional `export`, `#` comments). Both are parsed line by
//! line, which gives every value's span directly.
//!
//! Values may be quoted with `'` or `"`; the value is the text between the
//! quotes, as conduit's scanner reads it. A `#` or `;` after whitespace
//! starts a trailing comment of an unquoted INI value; `.env` only knows
//! `#`.

use super::Format;
use super::error::{Error, Result};
use super::leaf::{Leaf, Style, lines_with_offsets};

fn line_no(i: usize) -> u32 {
    u32::try_from(i + 1).unwrap_or(u32::MAX)
}

fn parse_error(file: &str, format: Format, i: usize, message: String) -> Error {
    Error::Parse {
        file: file.to_owned(),
        format,
        line: Some(line_no(i)),
        message,
    }
}

/// Reads the value that starts at byte `at` of `line` (the text after the
/// separator): its span within the line, the value, and its style.
fn value_span(
    line: &str,
    at: usize,
    comment_chars: &[char],
    escapes: bool,
) -> std::result::Result<(std::ops::Range<usize>, String, Style), String> {
    let rest = &line[at..];
    let lead = rest.len() - rest.trim_start().len();
    let start = at + lead;
    let v = &line[start..];
    let quote = v.chars().next().filter(|c| *c == '"' || *c == '\'');
    if let Some(q) = quote {
        let mut end = None;
        let mut chars = v.char_indices().skip(1).peekable();
        while let Some((i, c)) = chars.next() {
            if escapes && q == '"' && c == '\\' {
                chars.next();
            } else if c == q {
                // INI single quotes may double a quote inside
                // (postgresql.conf's `''`).
                if !escapes && q == '\'' && chars.peek().is_some_and(|(_, n)| *n == '\'') {
                    chars.next();
                    continue;
                }
                end = Some(i);
                break;
            }
        }
        let Some(end) = end else {
            return Err(format!("unterminated {q}-quoted value"));
        };
        let after = v[end + 1..].trim_start();
        if !(after.is_empty() || after.starts_with(comment_chars)) {
            return Err(format!("unexpected `{after}` after the quoted value"));
        }
        let inner = &v[1..end];
        let value = if q == '\'' && !escapes {
            inner.replace("''", "'")
        } else if q == '"' && escapes {
            unescape_env(inner)
        } else {
            inner.to_owned()
        };
        let style = if q == '"' {
            Style::Double
        } else {
            Style::Single
        };
        return Ok((start..start + end + 1, value, style));
    }
    // Unquoted: up to a comment character at the start or after
    // whitespace, then trimmed.
    let mut end = v.len();
    let mut prev_space = true;
    for (i, c) in v.char_indices() {
        if comment_chars.contains(&c) && prev_space {
            end = i;
            break;
        }
        prev_space = c.is_whitespace();
    }
    let value = v[..end].trim_end();
    Ok((
        start..start + value.len(),
        value.to_owned(),
        Style::Bare { string: true },
    ))
}

fn unescape_env(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ ('"' | '\\' | '$' | '`')) => out.push(n),
                Some('n') => out.push('\n'),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn ini_leaves(file: &str, text: &str) -> Result<Vec<Leaf>> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, (offset, line)) in lines_with_offsets(text).enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with([';', '#']) {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let (name, after) = rest.split_once(']').ok_or_else(|| {
                parse_error(
                    file,
                    Format::Ini,
                    i,
                    "section header without closing `]`".into(),
                )
            })?;
            let after = after.trim_start();
            if !(after.is_empty() || after.starts_with([';', '#'])) {
                return Err(parse_error(
                    file,
                    Format::Ini,
                    i,
                    format!("unexpected `{after}` after the section header"),
                ));
            }
            section = name.trim().to_owned();
            continue;
        }
        let sep = line.find(['=', ':']).ok_or_else(|| {
            parse_error(
                file,
                Format::Ini,
                i,
                format!("expected `key = value`, found `{}`", line.trim()),
            )
        })?;
        let key = line[..sep].trim();
        if key.is_empty() {
            return Err(parse_error(file, Format::Ini, i, "empty key".into()));
        }
        let (span, value, style) = value_span(line, sep + 1, &['#', ';'], false)
            .map_err(|m| parse_error(file, Format::Ini, i, m))?;
        let path = if section.is_empty() {
            key.to_owned()
        } else {
            format!("{section}.{key}")
        };
        out.push(Leaf {
            path,
            line: line_no(i),
            span: offset + span.start..offset + span.end,
            value,
            style,
        });
    }
    Ok(out)
}

pub(crate) fn env_leaves(file: &str, text: &str) -> Result<Vec<Leaf>> {
    let mut out = Vec::new();
    for (i, (offset, line)) in lines_with_offsets(text).enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let lead = line.len() - trimmed.len();
        let body = trimmed.strip_prefix("export ").unwrap_or(trimmed);
        let body_at = lead + (trimmed.len() - body.len());
        let eq = body.find('=').ok_or_else(|| {
            parse_error(
                file,
                Format::Env,
                i,
                format!("expected `NAME=value`, found `{}`", line.trim()),
            )
        })?;
        let name = body[..eq].trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(parse_error(
                file,
                Format::Env,
                i,
                format!("`{name}` is not a variable name"),
            ));
        }
        let (span, value, style) = value_span(line, body_at + eq + 1, &['#'], true)
            .map_err(|m| parse_error(file, Format::Env, i, m))?;
        out.push(Leaf {
            path: name.to_owned(),
            line: line_no(i),
            span: offset + span.start..offset + span.end,
            value,
            style,
        });
    }
    Ok(out)
}

/// Whether `v` can stand unquoted as an INI value.
pub(crate) fn ini_bare_ok(v: &str) -> bool {
    v.trim() == v
        && !v.starts_with(['"', '\'', '#', ';'])
        && !v.contains(char::is_control)
        && !v
            .char_indices()
            .any(|(i, c)| (c == '#' || c == ';') && v[..i].ends_with(char::is_whitespace))
}

/// Whether `v` can stand unquoted in a `.env` file.
pub(crate) fn env_bare_ok(v: &str) -> bool {
    !v.contains(|c: char| c.is_whitespace() || c.is_control() || "#\"'$\\`".contains(c))
}

/// A `.env` value in double quotes.
pub(crate) fn env_quote(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        if "\"\\$`".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ini_values_sections_and_comments() {
        let t = "; top\nname = wiki\n[db]\nhost = db.x ; main\nurl: 'postgres://a@b/c'  # c\nq = 'it''s'\nempty =\n";
        let l = ini_leaves("w.ini", t).unwrap();
        let v: Vec<_> = l
            .iter()
            .map(|x| {
                (
                    x.path.as_str(),
                    &t[x.span.clone()],
                    x.value.as_str(),
                    x.line,
                )
            })
            .collect();
        assert_eq!(
            v,
            vec![
                ("name", "wiki", "wiki", 2),
                ("db.host", "db.x", "db.x", 4),
                ("db.url", "'postgres://a@b/c'", "postgres://a@b/c", 5),
                ("db.q", "'it''s'", "it's", 6),
                ("db.empty", "", "", 7),
            ]
        );
        let e = ini_leaves("w.ini", "a = 1\n[sec\n").unwrap_err();
        assert!(e.to_string().starts_with("w.ini:2: invalid INI"), "{e}");
        assert!(ini_leaves("w.ini", "just words\n").is_err());
    }

    #[test]
    fn env_values() {
        let t = "# c\nexport A=\"x \\\"y\\\"\" # note\nB=plain#notcomment\nC='s q' \nD=v # c\n";
        let l = env_leaves(".env", t).unwrap();
        let v: Vec<_> = l
            .iter()
            .map(|x| (x.path.as_str(), &t[x.span.clone()], x.value.as_str()))
            .collect();
        assert_eq!(
            v,
            vec![
                ("A", "\"x \\\"y\\\"\"", "x \"y\""),
                ("B", "plain#notcomment", "plain#notcomment"),
                ("C", "'s q'", "s q"),
                ("D", "v", "v"),
            ]
        );
        let e = env_leaves(".env", "OK=1\nnot a pair\n").unwrap_err();
        assert!(e.to_string().starts_with(".env:2: invalid .env"), "{e}");
        assert!(env_bare_ok("db.x:5432/y") && !env_bare_ok("a b"));
        assert_eq!(env_quote("a$b"), "\"a\\$b\"");
    }
}

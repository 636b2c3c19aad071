//! YAML: `yaml-rust2`'s event parser validates the text and gives each
//! scalar with its style and start marker; the end of the token is found by
//! scanning the text from there by the rules of that style.
//!
//! The computed span is trusted only when reading it back gives the value
//! the parser reported; otherwise (a plain scalar folded over several
//! lines) the value is marked opaque: it is still checked for leftovers,
//! but a rule that must rewrite it fails rather than guess.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::{Yaml, YamlLoader};

use super::Format;
use super::error::{Error, Result};
use super::leaf::{Leaf, Lines, Style};

#[derive(Default)]
struct Events(Vec<(Event, Marker)>);

impl MarkedEventReceiver for Events {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        self.0.push((ev, mark));
    }
}

enum Frame {
    Map {
        key: Option<String>,
        flow: bool,
    },
    Seq {
        index: usize,
        flow: bool,
    },
    /// A mapping or sequence used as a key; its contents are not values.
    Key,
}

pub(crate) fn leaves(file: &str, text: &str) -> Result<Vec<Leaf>> {
    let parse_error = |e: yaml_rust2::ScanError| Error::Parse {
        file: file.to_owned(),
        format: Format::Yaml,
        line: u32::try_from(e.marker().line()).ok(),
        message: e.info().to_owned(),
    };
    let mut events = Events::default();
    Parser::new_from_str(text)
        .load(&mut events, true)
        .map_err(parse_error)?;
    // The loader also resolves aliases; an undefined one is an error there.
    YamlLoader::load_from_str(text).map_err(parse_error)?;

    let lines = Lines::new(text);
    let mut out: Vec<(usize, Leaf)> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut doc = 0usize;
    for (ev, mark) in events.0 {
        match ev {
            Event::DocumentStart => {
                doc += 1;
                stack.clear();
            }
            Event::Scalar(value, style, _, tag) => {
                if take_key(&mut stack, &value) {
                    continue;
                }
                if !stack.iter().any(|f| matches!(f, Frame::Key)) {
                    let flow = stack
                        .iter()
                        .rev()
                        .find_map(|f| match f {
                            Frame::Map { flow, .. } | Frame::Seq { flow, .. } => Some(*flow),
                            Frame::Key => None,
                        })
                        .unwrap_or(false);
                    let start = offset_of(text, &lines, &mark).map(|o| skip_properties(text, o));
                    let is_string = match &tag {
                        Some(t) => t.suffix == "str",
                        None => {
                            style != TScalarStyle::Plain
                                || matches!(Yaml::from_str(&value), Yaml::String(_))
                        }
                    };
                    let (span, style) = match start {
                        Some(s) => locate(text, s, style, flow, &value, is_string),
                        None => (0..0, Style::Opaque),
                    };
                    let line = match start {
                        Some(s) => lines.line_of(s),
                        None => u32::try_from(mark.line()).unwrap_or(0),
                    };
                    out.push((
                        doc,
                        Leaf {
                            path: path_of(&stack),
                            line,
                            span,
                            value,
                            style,
                        },
                    ));
                }
                advance(&mut stack);
            }
            Event::Alias(_) if !take_key(&mut stack, "*alias") => advance(&mut stack),
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_key = matches!(stack.last(), Some(Frame::Map { key: None, .. }))
                    || matches!(stack.last(), Some(Frame::Key));
                let flow = offset_of(text, &lines, &mark)
                    .map(|o| skip_properties(text, o))
                    .and_then(|o| text.as_bytes().get(o))
                    .is_some_and(|b| *b == b'[' || *b == b'{');
                stack.push(if is_key {
                    Frame::Key
                } else if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { key: None, flow }
                } else {
                    Frame::Seq { index: 0, flow }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some(Frame::Key) = stack.pop() {
                    if !matches!(stack.last(), Some(Frame::Key)) {
                        take_key(&mut stack, "?");
                    }
                } else {
                    advance(&mut stack);
                }
            }
            _ => {}
        }
    }
    let several = doc > 1;
    Ok(out
        .into_iter()
        .map(|(d, mut l)| {
            if several {
                let prefix = format!("[{}]", d.saturating_sub(1));
                l.path = if l.path.is_empty() {
                    prefix
                } else if l.path.starts_with('[') {
                    format!("{prefix}{}", l.path)
                } else {
                    format!("{prefix}.{}", l.path)
                };
            }
            l
        })
        .collect())
}

/// When the innermost mapping waits for a key, takes `key` as it and
/// returns true.
fn take_key(stack: &mut [Frame], key: &str) -> bool {
    if let Some(Frame::Map { key: k @ None, .. }) = stack.last_mut() {
        *k = Some(key.to_owned());
        return true;
    }
    false
}

/// After a value: a mapping waits for its next key, a sequence counts.
fn advance(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map { key, .. }) => *key = None,
        Some(Frame::Seq { index, .. }) => *index += 1,
        Some(Frame::Key) | None => {}
    }
}

fn path_of(stack: &[Frame]) -> String {
    let mut p = String::new();
    for f in stack {
        match f {
            Frame::Map { key: Some(k), .. } => {
                if !p.is_empty() {
                    p.push('.');
                }
                p.push_str(k);
            }
            Frame::Seq { index, .. } => p.push_str(&format!("[{index}]")),
            Frame::Map { key: None, .. } | Frame::Key => {}
        }
    }
    p
}

/// Byte offset of a marker: its line is exact; its column counts
/// characters from 0.
fn offset_of(text: &str, lines: &Lines, mark: &Marker) -> Option<usize> {
    let start = lines.start(mark.line())?;
    let line = &text[start..];
    let col = mark.col();
    let within = line
        .char_indices()
        .nth(col)
        .map(|(i, _)| i)
        .or_else(|| (line.chars().count() == col).then_some(line.len()))?;
    Some(start + within)
}

/// Skips an anchor (`&a`) and a tag (`!t`) before a node.
fn skip_properties(text: &str, mut at: usize) -> usize {
    let b = text.as_bytes();
    while matches!(b.get(at), Some(b'&' | b'!')) {
        while b.get(at).is_some_and(|c| !c.is_ascii_whitespace()) {
            at += 1;
        }
        while matches!(b.get(at), Some(b' ' | b'\t')) {
            at += 1;
        }
    }
    at
}

/// Finds the end of the scalar token starting at `start`.
fn locate(
    text: &str,
    start: usize,
    style: TScalarStyle,
    flow: bool,
    value: &str,
    is_string: bool,
) -> (std::ops::Range<usize>, Style) {
    let b = text.as_bytes();
    let opaque = (start..start, Style::Opaque);
    match style {
        TScalarStyle::SingleQuoted => {
            if b.get(start) != Some(&b'\'') {
                return opaque;
            }
            let mut i = start + 1;
            while i < b.len() {
                if b[i] == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    return (start..i + 1, Style::Single);
                }
                i += 1;
            }
            opaque
        }
        TScalarStyle::DoubleQuoted => {
            if b.get(start) != Some(&b'"') {
                return opaque;
            }
            let mut i = start + 1;
            while i < b.len() {
                match b[i] {
                    b'\\' => i += 2,
                    b'"' => return (start..i + 1, Style::Double),
                    _ => i += 1,
                }
            }
            opaque
        }
        TScalarStyle::Plain => {
            if value.is_empty() {
                return opaque;
            }
            let rest = &text[start..];
            let mut end = rest.find(['\n', '\r']).unwrap_or(rest.len());
            let mut prev_space = false;
            let mut chars = rest[..end].char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                let next = chars.peek().map(|(_, n)| *n);
                let stop = (c == '#' && prev_space)
                    || (c == ':' && next.is_none_or(|n| n == ' ' || n == '\t'))
                    || (flow
                        && (",[]{}".contains(c)
                            || (c == ':' && next.is_some_and(|n| ",[]{}".contains(n)))));
                if stop {
                    end = i;
                    break;
                }
                prev_space = c == ' ' || c == '\t';
            }
            let raw = rest[..end].trim_end();
            if raw == value {
                (start..start + raw.len(), Style::Bare { string: is_string })
            } else {
                opaque
            }
        }
        TScalarStyle::Literal | TScalarStyle::Folded => {
            // The marker points at the content; the indicator ends the
            // nearest non-blank line before it.
            let Some(start) = block_indicator(text, start) else {
                return opaque;
            };
            let Some(nl) = text[start..].find('\n').map(|i| start + i) else {
                return (start..text.len(), Style::Block);
            };
            let mut end = nl;
            let mut indent: Option<usize> = None;
            let mut at = nl + 1;
            for line in text[nl + 1..].split_inclusive('\n') {
                let content = line.trim_end_matches(['\n', '\r']);
                let this = content.len() - content.trim_start_matches(' ').len();
                if content.trim().is_empty() {
                    at += line.len();
                    continue;
                }
                let n = *indent.get_or_insert(this);
                if this < n || n == 0 {
                    break;
                }
                end = at + content.len();
                at += line.len();
            }
            (start..end, Style::Block)
        }
    }
}

/// Finds the `|` or `>` header of the block scalar whose content starts
/// on the line holding `content`.
fn block_indicator(text: &str, content: usize) -> Option<usize> {
    let line_start = text[..content].rfind('\n').map_or(0, |i| i + 1);
    let mut end = line_start.checked_sub(1)?;
    loop {
        let start = text[..end].rfind('\n').map_or(0, |i| i + 1);
        let line = &text[start..end];
        let code = line.find(" #").map_or(line, |i| &line[..i]).trim_end();
        if !code.trim().is_empty() {
            let token_at = code.rfind(char::is_whitespace).map_or(0, |i| i + 1);
            let token = &code[token_at..];
            let ok = token.starts_with(['|', '>'])
                && token[1..]
                    .chars()
                    .all(|c| c == '-' || c == '+' || c.is_ascii_digit());
            return ok.then_some(start + token_at);
        }
        end = start.checked_sub(1)?;
    }
}

/// Whether `v` can be written as a plain scalar that reads back as the
/// same string.
pub(crate) fn plain_ok(v: &str, flow: bool) -> bool {
    !v.is_empty()
        && v.trim() == v
        && !v.starts_with([
            '-', '?', ':', ',', '[', ']', '{', '}', '#', '&', '*', '!', '|', '>', '\'', '"', '%',
            '@', '`',
        ])
        && !v.contains(": ")
        && !v.contains(" #")
        && !v.ends_with(':')
        && !v.contains(char::is_control)
        && !(flow && v.contains([',', '[', ']', '{', '}']))
        && matches!(Yaml::from_str(v), Yaml::String(_))
}

/// A YAML single-quoted scalar, when `v` can be one on one line.
pub(crate) fn single_quote(v: &str) -> Option<String> {
    (!v.contains(char::is_control)).then(|| format!("'{}'", v.replace('\'', "''")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn view(t: &str) -> Vec<(String, String, String, Style)> {
        leaves("t.yaml", t)
            .unwrap()
            .into_iter()
            .map(|l| (l.path, t[l.span].to_owned(), l.value, l.style))
            .collect()
    }

    #[test]
    fn spans_of_every_style() {
        let t = "# db.x\na: db.x # comment\nb:\n  c: 'it''s'\n  d: \"q\\\"x\"\n  e: &anc plain value\nl:\n  - one\n  - {k: v, w: [x, 'y']}\nblock: |\n  line db.x\n    more\n\nafter: 5\n";
        let v = view(t);
        let s = |a: &str, b: &str, c: &str, st| (a.to_owned(), b.to_owned(), c.to_owned(), st);
        let plain = Style::Bare { string: true };
        assert_eq!(
            v,
            vec![
                s("a", "db.x", "db.x", plain),
                s("b.c", "'it''s'", "it's", Style::Single),
                s("b.d", "\"q\\\"x\"", "q\"x", Style::Double),
                s("b.e", "plain value", "plain value", plain),
                s("l[0]", "one", "one", plain),
                s("l[1].k", "v", "v", plain),
                s("l[1].w[0]", "x", "x", plain),
                s("l[1].w[1]", "'y'", "y", Style::Single),
                s(
                    "block",
                    "|\n  line db.x\n    more",
                    "line db.x\n  more\n",
                    Style::Block
                ),
                s("after", "5", "5", Style::Bare { string: false }),
            ]
        );
    }

    #[test]
    fn multi_document_paths_and_opaque_folded_plain() {
        let t = "a: 1\n---\n- x\n- long\n  folded\n";
        let v = view(t);
        assert_eq!(v[0].0, "[0].a");
        assert_eq!(v[1].0, "[1][0]");
        assert_eq!(v[2].3, Style::Opaque);
        assert_eq!(v[2].2, "long folded");
        let e = leaves("bad.yaml", "a: [1, 2\nb: c\n").unwrap_err();
        assert!(e.to_string().starts_with("bad.yaml:"), "{e}");
        assert!(matches!(e, Error::Parse { line: Some(_), .. }));
    }

    #[test]
    fn plain_safety() {
        assert!(plain_ok("db.shop.fra.internal", false));
        assert!(plain_ok("https://x.example/a?b=c", false));
        assert!(!plain_ok("a: b", false));
        assert!(!plain_ok("123", false));
        assert!(!plain_ok("true", false));
        assert!(!plain_ok("a,b", true));
        assert_eq!(single_quote("it's").unwrap(), "'it''s'");
    }
}

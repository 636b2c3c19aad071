//! JSON: `serde_json` validates (and reports the line of a syntax error);
//! a small scanner then walks the text once to find every scalar's span.

use super::Format;
use super::error::{Error, Result};
use super::leaf::{Leaf, Lines, Style};

pub(crate) fn leaves(file: &str, text: &str) -> Result<Vec<Leaf>> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
        return Err(Error::Parse {
            file: file.to_owned(),
            format: Format::Json,
            line: u32::try_from(e.line()).ok(),
            message: e.to_string(),
        });
    }
    let mut s = Scanner {
        file,
        text,
        bytes: text.as_bytes(),
        pos: 0,
        lines: Lines::new(text),
        out: Vec::new(),
    };
    s.value(String::new(), 0)?;
    Ok(s.out)
}

/// Nesting deeper than this is refused rather than risking the stack
/// (serde_json stops at 128 too).
const MAX_DEPTH: usize = 128;

struct Scanner<'a> {
    file: &'a str,
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    lines: Lines,
    out: Vec<Leaf>,
}

impl Scanner<'_> {
    fn fail(&self, message: &str) -> Error {
        Error::Parse {
            file: self.file.to_owned(),
            format: Format::Json,
            line: Some(self.lines.line_of(self.pos)),
            message: message.to_owned(),
        }
    }

    fn ws(&mut self) {
        while self
            .bytes
            .get(self.pos)
            .is_some_and(|b| b" \t\r\n".contains(b))
        {
            self.pos += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<()> {
        self.ws();
        if self.bytes.get(self.pos) == Some(&b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.fail(&format!("expected `{}`", b as char)))
        }
    }

    /// Scans a string token; returns its span and decoded value.
    fn string(&mut self) -> Result<(std::ops::Range<usize>, String)> {
        let start = self.pos;
        self.pos += 1;
        loop {
            match self.bytes.get(self.pos) {
                None => return Err(self.fail("unterminated string")),
                Some(b'\\') => self.pos += 2,
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(_) => self.pos += 1,
            }
        }
        let raw = self
            .text
            .get(start..self.pos)
            .ok_or_else(|| self.fail("string ends inside a character"))?;
        let value: String = serde_json::from_str(raw).map_err(|e| self.fail(&e.to_string()))?;
        Ok((start..self.pos, value))
    }

    fn value(&mut self, path: String, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.fail("nested too deeply"));
        }
        self.ws();
        match self.bytes.get(self.pos) {
            Some(b'{') => {
                self.pos += 1;
                self.ws();
                if self.bytes.get(self.pos) == Some(&b'}') {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    if self.bytes.get(self.pos) != Some(&b'"') {
                        return Err(self.fail("expected a key"));
                    }
                    let (_, key) = self.string()?;
                    self.expect(b':')?;
                    let child = if path.is_empty() {
                        key
                    } else {
                        format!("{path}.{key}")
                    };
                    self.value(child, depth + 1)?;
                    self.ws();
                    match self.bytes.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(());
                        }
                        _ => return Err(self.fail("expected `,` or `}`")),
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                self.ws();
                if self.bytes.get(self.pos) == Some(&b']') {
                    self.pos += 1;
                    return Ok(());
                }
                let mut i = 0;
                loop {
                    self.value(format!("{path}[{i}]"), depth + 1)?;
                    i += 1;
                    self.ws();
                    match self.bytes.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(());
                        }
                        _ => return Err(self.fail("expected `,` or `]`")),
                    }
                }
            }
            Some(b'"') => {
                let line = self.lines.line_of(self.pos);
                let (span, value) = self.string()?;
                self.out.push(Leaf {
                    path,
                    line,
                    span,
                    value,
                    style: Style::Double,
                });
                Ok(())
            }
            Some(_) => {
                let start = self.pos;
                while self
                    .bytes
                    .get(self.pos)
                    .is_some_and(|b| !b" \t\r\n,]}".contains(b))
                {
                    self.pos += 1;
                }
                let raw = self.text.get(start..self.pos).unwrap_or_default();
                if raw.is_empty() {
                    return Err(self.fail("expected a value"));
                }
                self.out.push(Leaf {
                    path,
                    line: self.lines.line_of(start),
                    span: start..self.pos,
                    value: raw.to_owned(),
                    style: Style::Bare { string: false },
                });
                Ok(())
            }
            None => Err(self.fail("unexpected end")),
        }
    }
}

/// A string in JSON syntax.
pub(crate) fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_paths() {
        let t = r#"{"a": {"host": "db.x", "port": 5432}, "l": ["u\"v", true]}"#;
        let l = leaves("f.json", t).unwrap();
        let v: Vec<_> = l
            .iter()
            .map(|x| (x.path.as_str(), &t[x.span.clone()], x.value.as_str()))
            .collect();
        assert_eq!(
            v,
            vec![
                ("a.host", "\"db.x\"", "db.x"),
                ("a.port", "5432", "5432"),
                ("l[0]", r#""u\"v""#, "u\"v"),
                ("l[1]", "true", "true"),
            ]
        );
        let e = leaves("f.json", "{\n\"a\": }").unwrap_err();
        assert!(e.to_string().starts_with("f.json:2: invalid JSON"), "{e}");
    }
}

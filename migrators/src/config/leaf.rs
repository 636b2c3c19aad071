//! What the per-format span parsers hand back: every scalar value with its
//! key path and the exact byte span of its token in the original text.
//!
//! Editing only those spans is what keeps comments, key order, indentation
//! and quoting of everything else byte-for-byte as it was.

use std::ops::Range;

/// How a scalar is written, which decides how a new value may be written
/// in its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// Unquoted: a plain YAML scalar, an INI or `.env` value, or a JSON /
    /// TOML number, boolean or date. `string` says whether it reads as a
    /// string (only strings are rewritten by the endpoint map).
    Bare {
        /// Reads as a string.
        string: bool,
    },
    /// In single quotes.
    Single,
    /// In double quotes (with backslash escapes where the format has them).
    Double,
    /// A YAML block scalar (`|` or `>`); the span starts at the indicator.
    Block,
    /// A TOML multi-line string; `literal` for `'''`.
    Multi {
        /// `'''` rather than `"""`.
        literal: bool,
    },
    /// A value whose extent could not be located exactly (a multi-line
    /// plain YAML scalar): it may be read, not rewritten.
    Opaque,
}

impl Style {
    /// Whether the value reads as a string.
    pub(crate) fn is_string(self) -> bool {
        !matches!(self, Self::Bare { string: false })
    }

    /// Bytes of quoting before and after the value inside the span.
    pub(crate) fn quote_len(self) -> usize {
        match self {
            Self::Single | Self::Double => 1,
            Self::Multi { .. } => 3,
            Self::Bare { .. } | Self::Block | Self::Opaque => 0,
        }
    }
}

/// One scalar value of a structured file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leaf {
    /// Key path, e.g. `database.host`, `servers[1].url`.
    pub(crate) path: String,
    /// 1-based line of the value.
    pub(crate) line: u32,
    /// Byte span of the whole token (quotes included).
    pub(crate) span: Range<usize>,
    /// The value as the format's parser reads it.
    pub(crate) value: String,
    /// How it is written.
    pub(crate) style: Style,
}

/// Byte offsets where each line starts.
pub(crate) struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    pub(crate) fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { starts }
    }

    /// 1-based line of a byte offset.
    pub(crate) fn line_of(&self, offset: usize) -> u32 {
        let i = self.starts.partition_point(|&s| s <= offset);
        u32::try_from(i.max(1)).unwrap_or(u32::MAX)
    }

    /// Byte offset where 1-based `line` starts.
    pub(crate) fn start(&self, line: usize) -> Option<usize> {
        self.starts.get(line.checked_sub(1)?).copied()
    }
}

/// 1-based line of a byte offset, for one-off lookups.
pub(crate) fn line_of(text: &str, offset: usize) -> u32 {
    let upto = text.get(..offset).unwrap_or(text);
    u32::try_from(upto.matches('\n').count() + 1).unwrap_or(u32::MAX)
}

/// Iterates over lines with the byte offset where each starts; the line
/// excludes its `\n` (and a `\r` before it).
pub(crate) fn lines_with_offsets(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut offset = 0;
    text.split_inclusive('\n').map(move |raw| {
        let start = offset;
        offset += raw.len();
        let line = raw.strip_suffix('\n').unwrap_or(raw);
        let line = line.strip_suffix('\r').unwrap_or(line);
        (start, line)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_numbers() {
        let l = Lines::new("a\nbc\n\nd");
        assert_eq!(l.line_of(0), 1);
        assert_eq!(l.line_of(2), 2);
        assert_eq!(l.line_of(5), 3);
        assert_eq!(l.line_of(6), 4);
        assert_eq!(l.start(2), Some(2));
        assert_eq!(line_of("a\nbc", 3), 2);
        let v: Vec<_> = lines_with_offsets("a\r\nb\n").collect();
        assert_eq!(v, vec![(0, "a"), (3, "b")]);
    }
}

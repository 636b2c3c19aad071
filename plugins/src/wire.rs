//! Line framing shared by the host and `serve`: bounded reads, so a peer
//! cannot make us buffer an endless line.

use std::io::{self, BufRead};

/// What one bounded read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its newline, in the buffer.
    Line,
    /// End of input (a partial last line is discarded).
    Eof,
    /// The line grew past the limit; reading stopped there.
    TooLong,
}

/// Reads one `\n`-terminated line into `buf` (cleared first), stopping as
/// soon as it exceeds `max` bytes (a trailing `\r` is dropped).
///
/// # Errors
/// The reader's errors.
pub fn read_frame(r: &mut impl BufRead, max: usize, buf: &mut Vec<u8>) -> io::Result<Frame> {
    buf.clear();
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(Frame::Eof);
        }
        match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => {
                buf.extend_from_slice(&chunk[..i]);
                r.consume(i + 1);
                if buf.len() > max {
                    return Ok(Frame::TooLong);
                }
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                return Ok(Frame::Line);
            }
            None => {
                let n = chunk.len();
                buf.extend_from_slice(chunk);
                r.consume(n);
                if buf.len() > max {
                    return Ok(Frame::TooLong);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded() {
        let mut r = io::BufReader::with_capacity(4, &b"ab\r\ncdefgh\nxy"[..]);
        let mut b = Vec::new();
        assert_eq!(read_frame(&mut r, 5, &mut b).unwrap(), Frame::Line);
        assert_eq!(b, b"ab");
        assert_eq!(read_frame(&mut r, 5, &mut b).unwrap(), Frame::TooLong);
        assert!(b.len() <= 5 + 4);
        let mut r = io::BufReader::new(&b"xy"[..]);
        assert_eq!(read_frame(&mut r, 5, &mut b).unwrap(), Frame::Eof);
    }
}

//! The bearer token that mutating calls must carry, compared in constant time.

use std::path::Path;

use super::AdminError;

/// The longest token accepted (a token file is read whole, so it is bounded too).
pub(super) const MAX_TOKEN_LEN: usize = 4096;

/// A bearer token. Its `Debug` never shows it.
#[derive(Clone)]
pub(super) struct Token(Box<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// The token `text`, trimmed; refused when empty, too long, or holding whitespace or control
    /// characters inside (it goes in a header).
    pub(super) fn new(text: &str) -> Result<Token, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("the token is empty".into());
        }
        if t.len() > MAX_TOKEN_LEN {
            return Err(format!(
                "the token is {} bytes long (at most {MAX_TOKEN_LEN})",
                t.len()
            ));
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the token holds whitespace or a control character".into());
        }
        Ok(Token(t.as_bytes().into()))
    }

    /// The trimmed content of the file at `path`.
    pub(super) fn from_file(path: &Path) -> Result<Token, AdminError> {
        let fail = |why: String| AdminError::TokenFile {
            path: path.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
        if meta.len() > (MAX_TOKEN_LEN * 2) as u64 {
            return Err(fail(format!(
                "{} bytes is too long for a token file",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        Token::new(&text).map_err(fail)
    }

    /// True when the `Authorization` header's value is `Bearer <this token>` (the scheme in any case).
    /// Takes the same time whatever the header holds, up to its length.
    pub(super) fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let given = authorization
            .and_then(|v| {
                let (scheme, rest) = v.split_at_checked(7)?;
                scheme
                    .eq_ignore_ascii_case(b"bearer ")
                    .then(|| rest.trim_ascii())
            })
            .unwrap_or(b"");
        constant_time_eq(given, &self.0)
    }
}

/// `a == b`, in a time that depends only on the lengths: every byte of the longer one is looked at, and
/// the differences are folded without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let t = Token::new("  s3cret\n").unwrap();
        assert!(t.accepts(Some(b"Bearer s3cret")));
        assert!(t.accepts(Some(b"bearer s3cret ")));
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret2",
            b"Bearer ",
            b"Basic s3cret",
            b"s3cret",
            b"",
            b"Bearer S3CRET",
        ] {
            assert!(!t.accepts(Some(bad)), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(!t.accepts(None));
    }

    #[test]
    fn tokens_must_be_one_word() {
        assert!(Token::new(" \n").is_err());
        assert!(Token::new("a b").is_err());
        assert!(Token::new(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert!(format!("{:?}", Token::new("s3cret").unwrap()).contains(".."));
        assert!(!format!("{:?}", Token::new("s3cret").unwrap()).contains("s3cret"));
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abc\0"));
        assert!(!constant_time_eq(b"", b"\0"));
    }
}

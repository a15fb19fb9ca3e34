//! Route templates: a request path turned into a bounded label, so metrics and views can group
//! `/api/v1/leads/123` and `/api/v1/leads/456` as `/api/v1/leads/:id`.
//!
//! Must not: keep anything that identifies one request (ids, tokens, e-mail addresses) or grow
//! with the input: at most [`MAX_SEGMENTS`] segments of at most [`MAX_SEGMENT_BYTES`] bytes.

/// Segments kept; the rest of a deeper path becomes one `/*`.
pub const MAX_SEGMENTS: usize = 12;
/// A longer segment is an opaque value whatever it looks like: it becomes `:param`.
pub const MAX_SEGMENT_BYTES: usize = 48;
/// The longest template [`route_template`] returns.
pub const MAX_TEMPLATE_BYTES: usize = MAX_SEGMENTS * (MAX_SEGMENT_BYTES + 1) + 2;

/// The route template of a request path (a query string or fragment is dropped first).
///
/// Each segment that looks like a value is replaced by a placeholder: `:id` (digits), `:uuid`,
/// `:date` (`2024-01-31`), `:hex` (16 or more hex digits with at least one digit), `:email`,
/// `:token` (16 or more base64-ish characters mixing letters and digits inside one word), and
/// `:param` for any segment longer than [`MAX_SEGMENT_BYTES`] or not valid UTF-8. Other segments
/// are kept as they are (paths are case-sensitive). An empty path is `/`.
pub fn route_template(path: &str) -> String {
    let path = path
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .trim_start_matches('/');
    let mut out = String::with_capacity(path.len().min(MAX_TEMPLATE_BYTES));
    for (index, segment) in path.split('/').enumerate() {
        if index == MAX_SEGMENTS {
            out.push_str("/*");
            break;
        }
        out.push('/');
        out.push_str(classify(segment).unwrap_or(segment));
    }
    out
}

/// The placeholder for a segment that is a value, `None` for a segment to keep.
fn classify(segment: &str) -> Option<&'static str> {
    let bytes = segment.as_bytes();
    if bytes.is_empty() {
        return None;
    }
    if bytes.iter().all(u8::is_ascii_digit) {
        return Some(":id");
    }
    // U+FFFD (a byte that was not UTF-8) is never ASCII: most segments need no search.
    if bytes.len() > MAX_SEGMENT_BYTES || (!bytes.is_ascii() && segment.contains('\u{fffd}')) {
        return Some(":param");
    }
    if is_uuid(bytes) {
        return Some(":uuid");
    }
    if is_date(bytes) {
        return Some(":date");
    }
    if bytes.len() >= 16
        && bytes.iter().all(u8::is_ascii_hexdigit)
        && bytes.iter().any(u8::is_ascii_digit)
    {
        return Some(":hex");
    }
    if is_email(segment) {
        return Some(":email");
    }
    if is_token(bytes) {
        return Some(":token");
    }
    None
}

fn is_uuid(bytes: &[u8]) -> bool {
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn is_date(bytes: &[u8]) -> bool {
    bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        })
}

fn is_email(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    // `%40` is an `@` that a client percent-encoded.
    let (local, domain) = if let Some(at) = bytes.iter().position(|&b| b == b'@') {
        (&bytes[..at], &bytes[at + 1..])
    } else if let Some(at) = bytes.windows(3).position(|w| w == b"%40") {
        (&bytes[..at], &bytes[at + 3..])
    } else {
        return false;
    };
    !local.is_empty() && domain.contains(&b'.') && !domain.starts_with(b".")
}

/// Random-looking: long, in the base64 (url) alphabet, and some word mixes letters and digits.
/// Slugs like `order-confirmation-2024` keep their words apart and stay.
fn is_token(bytes: &[u8]) -> bool {
    if bytes.len() < 16
        || !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_+=~.%".contains(b))
    {
        return false;
    }
    bytes
        .split(|b| b"-_.~".contains(b))
        .any(|word| word.iter().any(u8::is_ascii_digit) && word.iter().any(u8::is_ascii_alphabetic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_tokens_become_placeholders() {
        let cases = [
            ("/api/v1/leads/123", "/api/v1/leads/:id"),
            ("/api/v1/leads/123?expand=true", "/api/v1/leads/:id"),
            (
                "/users/550e8400-e29b-41d4-a716-446655440000/orders",
                "/users/:uuid/orders",
            ),
            ("/objects/507f1f77bcf86cd799439011", "/objects/:hex"),
            ("/reports/2024-01-31", "/reports/:date"),
            ("/users/jane.doe@example.com", "/users/:email"),
            ("/users/jane.doe%40example.com/x", "/users/:email/x"),
            ("/reset/eyJhbGciOiJIUzI1NiJ9aB3", "/reset/:token"),
            (
                "/blog/order-confirmation-2024",
                "/blog/order-confirmation-2024",
            ),
            ("/api/v1", "/api/v1"),
            ("/health", "/health"),
            ("/", "/"),
            ("", "/"),
            ("/a//b/", "/a//b/"),
            ("/deadbeefdeadbeef", "/deadbeefdeadbeef"),
            // A byte that was not UTF-8 (read lossily); other non-ASCII text stays.
            ("/files/a\u{fffd}b/raw", "/files/:param/raw"),
            ("/städte/köln", "/städte/köln"),
            ("/users/@handle", "/users/@handle"),
            ("/users/a%40b", "/users/a%40b"),
            ("/users/%40b.c", "/users/%40b.c"),
        ];
        for (path, want) in cases {
            assert_eq!(route_template(path), want, "{path}");
        }
    }

    #[test]
    fn long_segments_and_deep_paths_are_capped() {
        let long = format!("/files/{}", "a".repeat(200));
        assert_eq!(route_template(&long), "/files/:param");
        let deep = "/a".repeat(100);
        let template = route_template(&deep);
        assert_eq!(template, format!("{}/*", "/a".repeat(MAX_SEGMENTS)));
        assert!(template.len() <= MAX_TEMPLATE_BYTES);
    }

    #[test]
    fn template_never_exceeds_its_bound() {
        let worst = format!("/{}", "b".repeat(MAX_SEGMENT_BYTES)).repeat(50);
        assert!(route_template(&worst).len() <= MAX_TEMPLATE_BYTES);
    }
}

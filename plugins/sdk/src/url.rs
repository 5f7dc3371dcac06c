//! Small, allocation-light URL helpers (no `url` crate): split a URL into its parts, read
//! query parameters, percent-decode and -encode. They accept what trackers send: absolute
//! URLs (`https://host/p?q#f`), protocol-relative (`//host/p`) and bare paths (`/p?q`), and
//! never fail; malformed escapes are kept as they are.

/// The parts of a URL, borrowed from it. `url == scheme + ":" + "//" + authority + path +
/// "?" + query + "#" + fragment` for the parts present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parts<'a> {
    /// `https` (without `:`), if the URL has a scheme.
    pub scheme: Option<&'a str>,
    /// `user@host:port` (without `//`), if the URL has one.
    pub authority: Option<&'a str>,
    /// Everything up to `?` or `#` (may be empty, e.g. for `https://host`).
    pub path: &'a str,
    /// After `?`, without it.
    pub query: Option<&'a str>,
    /// After `#`, without it.
    pub fragment: Option<&'a str>,
}

/// Splits `url` into its parts.
pub fn split(url: &str) -> Parts<'_> {
    let (rest, fragment) = match url.split_once('#') {
        Some((a, f)) => (a, Some(f)),
        None => (url, None),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (scheme, rest) = match rest.split_once(':') {
        Some((s, r)) if is_scheme(s) => (Some(s), r),
        _ => (None, rest),
    };
    let (authority, path) = match rest.strip_prefix("//") {
        Some(r) => match r.find('/') {
            Some(i) => (Some(&r[..i]), &r[i..]),
            None => (Some(r), ""),
        },
        None => (None, rest),
    };
    Parts {
        scheme,
        authority,
        path,
        query,
        fragment,
    }
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The path of `url` without query and fragment; `/` when the URL has a host but no path.
pub fn path(url: &str) -> &str {
    let parts = split(url);
    if parts.path.is_empty() && parts.authority.is_some() {
        "/"
    } else {
        parts.path
    }
}

/// The host of `url`: the authority without user info and port, IPv6 addresses without
/// brackets. `None` for bare paths. Case is kept as is.
pub fn host(url: &str) -> Option<&str> {
    let authority = split(url).authority?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split_once(']').map_or(v6, |(h, _)| h)
    } else {
        host_port.split_once(':').map_or(host_port, |(h, _)| h)
    };
    (!host.is_empty()).then_some(host)
}

/// The query string's `name=value` pairs in order, both percent-decoded (`+` is a space).
/// A pair without `=` has an empty value; empty pairs (`a=1&&b=2`) are skipped.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode_query_component(k), decode_query_component(v))
        })
        .collect()
}

/// The first value of query parameter `name` in `url`, percent-decoded.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = split(url).query?;
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (decode_query_component(k) == name).then(|| decode_query_component(v))
    })
}

/// Percent-decodes a query component: `%XX` escapes and `+` as a space. Invalid escapes
/// are kept verbatim; invalid UTF-8 becomes U+FFFD.
pub fn decode_query_component(s: &str) -> String {
    decode(s, true)
}

/// Percent-decodes `%XX` escapes (a `+` stays a `+`, as in paths). Invalid escapes are kept
/// verbatim; invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str) -> String {
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    if !bytes
        .iter()
        .any(|&b| b == b'%' || (plus_is_space && b == b'+'))
    {
        return s.to_string();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h << 4) | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-encodes `s` for use as a query name or value: bytes outside printable ASCII,
/// space and `"#%&'+<=>` are escaped (`%XX`, upper case); everything else, including
/// `[`, `]`, `@` and `/`, is kept so the result stays readable.
pub fn encode_query_component(s: &str) -> String {
    encode(s, |b| {
        matches!(
            b,
            b'"' | b'#' | b'%' | b'&' | b'\'' | b'+' | b'<' | b'=' | b'>'
        )
    })
}

/// Percent-encodes `s` for use as one path segment: like [`encode_query_component`] but
/// `/`, `?` are escaped too and `+`, `&`, `=` are kept.
pub fn encode_path_segment(s: &str) -> String {
    encode(s, |b| {
        matches!(b, b'"' | b'#' | b'%' | b'/' | b'?' | b'<' | b'>' | b'\'')
    })
}

fn encode(s: &str, special: impl Fn(u8) -> bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b > b' ' && b < 0x7f && !special(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_absolute_relative_and_odd_urls() {
        assert_eq!(
            split("https://u:p@h.example:8080/a/b?x=1&y#frag"),
            Parts {
                scheme: Some("https"),
                authority: Some("u:p@h.example:8080"),
                path: "/a/b",
                query: Some("x=1&y"),
                fragment: Some("frag"),
            }
        );
        assert_eq!(
            split("/p?q=1"),
            Parts {
                path: "/p",
                query: Some("q=1"),
                ..Parts::default()
            }
        );
        assert_eq!(split("//cdn.example/x").authority, Some("cdn.example"));
        assert_eq!(split("https://h.example").path, "");
        assert_eq!(split("https://h.example?a#b").query, Some("a"));
        // A `?` inside the fragment belongs to the fragment.
        assert_eq!(split("/p#a?b").query, None);
        assert_eq!(split("mailto:x@y.example").scheme, Some("mailto"));
        assert_eq!(split("").path, "");
    }

    #[test]
    fn paths_and_hosts() {
        assert_eq!(path("https://h.example"), "/");
        assert_eq!(path("https://h.example/docs/?x"), "/docs/");
        assert_eq!(path("/a#b"), "/a");
        assert_eq!(
            host("https://User@WWW.Example.com:443/x"),
            Some("WWW.Example.com")
        );
        assert_eq!(host("http://[2001:db8::1]:8080/"), Some("2001:db8::1"));
        assert_eq!(host("http://localhost"), Some("localhost"));
        assert_eq!(host("/relative"), None);
        assert_eq!(host("https:///x"), None);
    }

    #[test]
    fn query_parsing_and_decoding() {
        assert_eq!(
            query_pairs("a=1&&b=x+y%21&c&d=%zz"),
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "x y!".to_string()),
                ("c".to_string(), String::new()),
                ("d".to_string(), "%zz".to_string()),
            ]
        );
        assert_eq!(
            query_param("/p?utm%5Fsource=a%40b&x=2", "utm_source").as_deref(),
            Some("a@b")
        );
        assert_eq!(query_param("/p?x=1&x=2", "x").as_deref(), Some("1"));
        assert_eq!(query_param("/p", "x"), None);
        assert_eq!(percent_decode("a+b%2B%41"), "a+b+A");
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41"), "A");
        assert_eq!(percent_decode("%C3%A9"), "é");
        assert_eq!(percent_decode("%FF"), "\u{FFFD}");
    }

    #[test]
    fn encoding_round_trips() {
        let s = "a b&c=d+e%f#g/h?[i]@é";
        assert_eq!(
            encode_query_component(s),
            "a%20b%26c%3Dd%2Be%25f%23g/h?[i]@%C3%A9"
        );
        assert_eq!(decode_query_component(&encode_query_component(s)), s);
        assert_eq!(
            encode_path_segment(s),
            "a%20b&c=d+e%25f%23g%2Fh%3F[i]@%C3%A9"
        );
        assert_eq!(percent_decode(&encode_path_segment(s)), s);
    }
}

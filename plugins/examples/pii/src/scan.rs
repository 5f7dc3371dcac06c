//! Hand-written, deterministic detectors for e-mail addresses, phone numbers and payment
//! card numbers in text. See the crate documentation for the exact rules.

/// What a span of text was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Email,
    Phone,
    Card,
}

/// Which detectors run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detectors {
    pub email: bool,
    pub phone: bool,
    pub card: bool,
}

impl Detectors {
    pub const ALL: Detectors = Detectors {
        email: true,
        phone: true,
        card: true,
    };
}

/// File extensions that look like top-level domains after an `@` (`logo@2x.png`) but are
/// not: such "addresses" are not e-mails.
const NOT_TLDS: &[&str] = &[
    "avif", "bmp", "css", "eot", "gif", "htm", "html", "ico", "jpeg", "jpg", "js", "json", "map",
    "mjs", "mp3", "mp4", "otf", "pdf", "png", "svg", "tif", "tiff", "ttf", "txt", "wav", "webm",
    "webp", "woff", "woff2", "xml",
];

/// The PII spans in `text`: `(start, end, kind)` byte ranges, sorted and non-overlapping.
pub fn find(text: &str, detectors: &Detectors) -> Vec<(usize, usize, Kind)> {
    let b = text.as_bytes();
    let mut spans = Vec::new();
    if detectors.email {
        let mut i = 0;
        while let Some(off) = b[i..].iter().position(|&c| c == b'@') {
            let at = i + off;
            match email_at(b, at) {
                Some((s, e)) => {
                    spans.push((s, e, Kind::Email));
                    i = e;
                }
                None => i = at + 1,
            }
            if i >= b.len() {
                break;
            }
        }
    }
    if detectors.phone || detectors.card {
        let emails = std::mem::take(&mut spans);
        let mut next_email = 0;
        let mut i = 0;
        while i < b.len() {
            if let Some(&(s, e, _)) = emails.get(next_email) {
                if i >= s {
                    spans.push(emails[next_email]);
                    next_email += 1;
                    i = e;
                    continue;
                }
            }
            let c = b[i];
            let starts = c.is_ascii_digit()
                || (c == b'+' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
                || (c == b'(' && paren_group(b, i).is_some());
            if !starts {
                i += 1;
                continue;
            }
            let limit = emails.get(next_email).map_or(b.len(), |&(s, _, _)| s);
            let run = parse_run(&b[..limit], i);
            if run.groups.is_empty() {
                i += 1;
                continue;
            }
            if boundary_before(b, i) && boundary_after(b, run.end) {
                let kind = if detectors.card && is_card(&run) {
                    Some(Kind::Card)
                } else if detectors.phone && is_phone(&run) {
                    Some(Kind::Phone)
                } else {
                    None
                };
                if let Some(kind) = kind {
                    spans.push((i, run.end, kind));
                }
            }
            i = run.end.max(i + 1);
        }
        spans.extend_from_slice(&emails[next_email..]);
    }
    spans
}

/// `text` with every span replaced by `token(kind)`, or `None` if there is nothing to
/// replace.
pub fn scrub<'t>(
    text: &str,
    detectors: &Detectors,
    token: impl Fn(Kind) -> &'t str,
) -> Option<String> {
    // Fast path: every detector needs a digit or an `@`.
    if !text.bytes().any(|c| c == b'@' || c.is_ascii_digit()) {
        return None;
    }
    let spans = find(text, detectors);
    if spans.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (s, e, kind) in spans {
        out.push_str(&text[last..s]);
        out.push_str(token(kind));
        last = e;
    }
    out.push_str(&text[last..]);
    Some(out)
}

// Bytes of non-ASCII characters count as letters, so `müller@bücher.example` is found
// whole (a span always starts and ends next to an ASCII byte or the text's ends, so it is
// on character boundaries).
fn is_local(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c >= 0x80 || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-' | b'\'')
}

fn is_domain(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c >= 0x80 || matches!(c, b'.' | b'-')
}

/// The e-mail address around the `@` at `at`, as a byte range.
fn email_at(b: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut s = at;
    while s > 0 && is_local(b[s - 1]) {
        s -= 1;
    }
    while s < at && matches!(b[s], b'.' | b'\'') {
        s += 1;
    }
    if s == at {
        return None;
    }
    let mut e = at + 1;
    while e < b.len() && is_domain(b[e]) {
        e += 1;
    }
    while e > at + 1 && matches!(b[e - 1], b'.' | b'-') {
        e -= 1;
    }
    let domain = std::str::from_utf8(&b[at + 1..e]).ok()?;
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2
        || labels
            .iter()
            .any(|l| l.is_empty() || l.len() > 63 || l.starts_with('-') || l.ends_with('-'))
    {
        return None;
    }
    let tld = labels[labels.len() - 1];
    if tld.len() < 2
        || !tld.bytes().all(|c| c.is_ascii_alphabetic())
        || NOT_TLDS.iter().any(|x| x.eq_ignore_ascii_case(tld))
    {
        return None;
    }
    Some((s, e))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    start: usize,
    len: usize,
    paren: bool,
}

/// A run of digit groups: `[+] group (sep group)*`, where a group is digits or `(digits)`
/// and a separator is one space, dash or dot (or nothing after a parenthesised group).
#[derive(Debug, Default)]
struct Run {
    plus: bool,
    groups: Vec<Group>,
    /// `seps[i]` separates `groups[i]` and `groups[i + 1]`; 0 = none.
    seps: Vec<u8>,
    /// The digits, as values 0..=9.
    digits: Vec<u8>,
    end: usize,
}

/// `(digits)` at `i`: the number of digits.
fn paren_group(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'(') {
        return None;
    }
    let d = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
    (d > 0 && b.get(i + 1 + d) == Some(&b')')).then_some(d)
}

fn group_at(b: &[u8], i: usize) -> Option<Group> {
    if let Some(len) = paren_group(b, i) {
        return Some(Group {
            start: i + 1,
            len,
            paren: true,
        });
    }
    let len = b[i.min(b.len())..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count();
    (len > 0).then_some(Group {
        start: i,
        len,
        paren: false,
    })
}

fn parse_run(b: &[u8], start: usize) -> Run {
    let mut run = Run::default();
    let mut p = start;
    if b[p] == b'+' {
        run.plus = true;
        p += 1;
    }
    let Some(mut group) = group_at(b, p) else {
        run.end = start;
        return run;
    };
    loop {
        run.groups.push(group);
        run.digits.extend(
            b[group.start..group.start + group.len]
                .iter()
                .map(|c| c - b'0'),
        );
        p = group.start + group.len + usize::from(group.paren);
        // A separator, then another group?
        let (sep, next) = match b.get(p) {
            Some(&s @ (b' ' | b'-' | b'.')) => (s, p + 1),
            Some(b'0'..=b'9') if group.paren => (0, p),
            _ => break,
        };
        match group_at(b, next) {
            Some(g) => {
                run.seps.push(sep);
                group = g;
            }
            None => break,
        }
    }
    run.end = p;
    run
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn boundary_before(b: &[u8], i: usize) -> bool {
    match i.checked_sub(1).map(|j| b[j]) {
        None => true,
        Some(c) if is_word(c) => false,
        // A decimal or thousands part: `3.0612345678`, `1,4111...`.
        Some(b'.' | b',') => !(i >= 2 && b[i - 2].is_ascii_digit()),
        Some(_) => true,
    }
}

fn boundary_after(b: &[u8], end: usize) -> bool {
    match b.get(end) {
        None => true,
        Some(&c) if is_word(c) => false,
        Some(b'.' | b',') => !b.get(end + 1).is_some_and(u8::is_ascii_digit),
        Some(_) => true,
    }
}

/// Whether all separators in `seps` (zeros excluded) are the same character.
fn consistent(seps: impl IntoIterator<Item = u8>) -> bool {
    let mut kind = None;
    for s in seps.into_iter().filter(|&s| s != 0) {
        match kind {
            None => kind = Some(s),
            Some(k) if k != s => return false,
            Some(_) => {}
        }
    }
    true
}

/// Separators that are not right after a parenthesised group (those may differ: `(555) 123-4567`).
fn seps_outside_parens(run: &Run) -> impl Iterator<Item = u8> + '_ {
    run.seps
        .iter()
        .enumerate()
        .filter(|(i, _)| !run.groups[*i].paren)
        .map(|(_, &s)| s)
}

fn is_card(run: &Run) -> bool {
    let n = run.digits.len();
    !run.plus
        && (13..=19).contains(&n)
        && (2..=6).contains(&run.digits[0])
        && run.groups.iter().all(|g| !g.paren)
        && run.seps.iter().all(|&s| s == b' ' || s == b'-')
        && consistent(run.seps.iter().copied())
        && luhn(&run.digits)
}

/// The Luhn checksum (ISO/IEC 7812) over digit values.
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 {
                    d2 - 9
                } else {
                    d2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn is_phone(run: &Run) -> bool {
    let d = &run.digits;
    let n = d.len();
    let groups = &run.groups;
    // International: `+CC ...` or `00CC ...`, 8..=15 digits after the prefix.
    let international = |digits: &[u8]| {
        (8..=15).contains(&digits.len())
            && digits[0] != 0
            // The separator after the country code may differ from the rest.
            && consistent(seps_outside_parens(run).skip(1))
    };
    if run.plus {
        return international(d);
    }
    if n > 2 && d[0] == 0 && d[1] == 0 {
        // Written out only: zero-padded ids (`00123456789`) are not phone numbers.
        return groups.len() > 1
            && groups[0].len >= 2
            && !groups[0].paren
            && international(&d[2..]);
    }
    // North American: [1] NXX NXX XXXX with N = 2..=9.
    let nanp = if groups.len() == 4 && groups[0].len == 1 && d[0] == 1 && !groups[0].paren {
        &groups[1..]
    } else {
        &groups[..]
    };
    if nanp.len() == 3
        && nanp.iter().map(|g| g.len).eq([3, 3, 4])
        && !nanp[1].paren
        && !nanp[2].paren
    {
        let area_ok = d[n - 10] >= 2;
        let offset = groups.len() - 3;
        let seps_ok = if nanp[0].paren {
            matches!(run.seps[offset], 0 | b' ' | b'-') && run.seps[offset + 1] != 0
        } else {
            run.seps[offset] == run.seps[offset + 1]
        };
        if area_ok && seps_ok {
            return true;
        }
    }
    // National with trunk prefix 0: 0N..., 10..=12 digits.
    if (10..=12).contains(&n) && d[0] == 0 && d[1] != 0 {
        let formatted = groups.len() > 1;
        return if formatted {
            groups[0].len >= 2
                && groups[1..].iter().all(|g| !g.paren)
                && consistent(seps_outside_parens(run))
        } else {
            n <= 11
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<(&str, Kind)> {
        find(text, &Detectors::ALL)
            .into_iter()
            .map(|(s, e, k)| (&text[s..e], k))
            .collect()
    }

    #[test]
    fn emails() {
        use Kind::Email;
        assert_eq!(
            kinds("mail john.doe+news@Example.co.uk now"),
            [("john.doe+news@Example.co.uk", Email)]
        );
        assert_eq!(kinds("mailto:a@b.io."), [("a@b.io", Email)]);
        assert_eq!(
            kinds("x=1&email=jane_o'neil@sub-domain.example.org&y"),
            [("jane_o'neil@sub-domain.example.org", Email)]
        );
        assert_eq!(
            kinds("two: a@b.de, c@d.fr"),
            [("a@b.de", Email), ("c@d.fr", Email)]
        );
        assert_eq!(
            kinds("@mastodon@social.example"),
            [("mastodon@social.example", Email)]
        );
    }

    #[test]
    fn not_emails() {
        for text in [
            "logo@2x.png",
            "icon@3x.webp",
            "/npm/lodash@4.17.21/lodash.min.js",
            "vue@3.4.0",
            "user@localhost",
            "@handle",
            "a@b",
            "a@.com",
            "a@b.c",
            "a@b-.com",
            "price @ 5.00",
            "x@y.123",
            "@@@",
            "trailing@",
        ] {
            assert_eq!(kinds(text), [], "{text}");
        }
    }

    #[test]
    fn phones() {
        for phone in [
            "+44 20 7946 0958",
            "+1 (555) 123-4567",
            "+1-555-123-4567",
            "+4915112345678",
            "+49 (0)30 1234567",
            "+33 6 12 34 56 78",
            "0044 20 7946 0958",
            "(555) 123-4567",
            "(555)123-4567",
            "555-123-4567",
            "555.123.4567",
            "555 123 4567",
            "1-555-123-4567",
            "1 (555) 123-4567",
            "020 7946 0958",
            "06 12 34 56 78",
            "06.12.34.56.78",
            "0151 12345678",
            "(030) 1234567",
            "0612345678",
            "07700900123",
        ] {
            let text = format!("call {phone}, thanks");
            assert_eq!(kinds(&text), [(phone, Kind::Phone)], "{phone}");
        }
    }

    #[test]
    fn ordinary_numbers_are_not_phones_or_cards() {
        for text in [
            "1999",
            "archive 2019 2020 2021",
            "2019-2024",
            "€1,299.00",
            "1 234 567,89 €",
            "12 345 678 901",
            "order 123456789",
            "order #10000001",
            "ts 1718000000",
            "ts 1718000000000",
            "2024-06-01",
            "2024-06-01 12:30:00",
            "01.06.2024 12:30",
            "01-06-2024",
            "192.168.100.200",
            "10.0.0.1",
            "978-3-16-148410-0",
            "0.1234567890",
            "3.0612345678",
            "550e8400-e29b-41d4-a716-446655440000",
            "Mozilla/5.0 Chrome/120.0.6099.130 Safari/537.36",
            "123-456-7890",
            "00123456789",
            "155-123-4567",
            "5551234567",
            "0612345678abc",
            "id0612345678",
            "0000012345",
            "+12345",
            "(12) 34",
            "4111 1111 1111 1112",
            "1234 5678 1234 5670",
        ] {
            assert_eq!(kinds(text), [], "{text}");
        }
    }

    #[test]
    fn cards() {
        for card in [
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "4111111111111111",
            "5555 5555 5555 4444",
            "3782 822463 10005",
            "6011111111111117",
            "4222222222222",
        ] {
            let text = format!("cc={card};");
            assert_eq!(kinds(&text), [(card, Kind::Card)], "{card}");
        }
        // Mixed separators are not a card.
        assert_eq!(kinds("4111 1111-1111 1111"), []);
    }

    #[test]
    fn luhn_checksum() {
        assert!(luhn(&[4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]));
        assert!(!luhn(&[4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]));
        assert!(luhn(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1, 3]));
    }

    #[test]
    fn mixed_text_and_detector_selection() {
        let text = "Jo <jo@x.example>, +44 20 7946 0958, card 4111 1111 1111 1111.";
        assert_eq!(
            scrub(text, &Detectors::ALL, |k| match k {
                Kind::Email => "[email]",
                Kind::Phone => "[phone]",
                Kind::Card => "[card]",
            })
            .as_deref(),
            Some("Jo <[email]>, [phone], card [card].")
        );
        let only_cards = Detectors {
            email: false,
            phone: false,
            card: true,
        };
        assert_eq!(
            scrub(text, &only_cards, |_| "X").as_deref(),
            Some("Jo <jo@x.example>, +44 20 7946 0958, card X.")
        );
        assert_eq!(scrub("nothing here", &Detectors::ALL, |_| "X"), None);
        assert_eq!(scrub("year 2024", &Detectors::ALL, |_| "X"), None);
    }

    #[test]
    fn digits_inside_emails_are_part_of_the_email() {
        assert_eq!(
            kinds("0612345678@sms.example and 0612345678"),
            [
                ("0612345678@sms.example", Kind::Email),
                ("0612345678", Kind::Phone)
            ]
        );
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        // Deterministic pseudo-random strings over an alphabet rich in the characters the
        // scanners care about, plus every short prefix/suffix of tricky inputs.
        let alphabet: Vec<char> = "0123456789+-.() @_,;:/%éa1x\u{1F600}".chars().collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let len = (state >> 59) as usize;
            let mut s = String::new();
            for _ in 0..len {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push(alphabet[(state >> 33) as usize % alphabet.len()]);
            }
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let spans = find(&s, &Detectors::ALL);
            let mut last = 0;
            for (a, b, _) in spans {
                assert!(a >= last && a < b && b <= s.len(), "{s:?}");
                assert!(s.is_char_boundary(a) && s.is_char_boundary(b), "{s:?}");
                last = b;
            }
        }
        for tricky in [
            "+1 (555) 123-4567",
            "jo@x.example",
            "4111 1111 1111 1111",
            "0044 20 7946 0958",
        ] {
            for i in 0..=tricky.len() {
                let _ = find(&tricky[..i], &Detectors::ALL);
                let _ = find(&tricky[i..], &Detectors::ALL);
            }
        }
    }

    #[test]
    fn non_ascii_text_is_safe() {
        assert_eq!(
            kinds("Tél : 06 12 34 56 78 — é@ü"),
            [("06 12 34 56 78", Kind::Phone)]
        );
        assert_eq!(
            kinds("日本語 ü@example.com"),
            [("ü@example.com", Kind::Email)]
        );
        assert_eq!(
            kinds("müller@bücher.example"),
            [("müller@bücher.example", Kind::Email)]
        );
    }
}

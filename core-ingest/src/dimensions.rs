//! The breakdown dimensions of an event, derived at ingest from the processed event, so
//! they follow the plugins (a plugin that rewrites a URL changes the page it is counted
//! under) and re-processing derives them again, deterministically.
//!
//! - `hostname`, `path`: from `url` (path without query or fragment; `/` when empty).
//! - Acquisition (`source`, `medium`, `utm_*`): an attribute of *landing* page views only.
//!   A page view whose referrer is another page of the same host is an internal
//!   navigation and has no source (NULL); a page view with no referrer is
//!   `Direct / None`; otherwise the referrer's host is classified (search engines, social
//!   networks, webmail) or kept as a plain referral. UTM parameters in the URL take
//!   (or, once a plugin moved them there, `utm_*` properties) take precedence over the
//!   referrer. Events other than page views have no source.
//! - Geo and device (`country`, `region`, `city`, `device`, `browser`, `os`): copied from the
//!   reserved properties `$country`, `$region`, `$city`, `$device`, `$browser`, `$os`,
//!   which the edge's enrichment records in the raw event (or a trusted server-side sender
//!   sets itself).
//!
//! The referrer table is deliberately small and documented in docs/METRICS-API.md; it
//! covers the hosts that dominate real referrer logs.

use std::borrow::Cow;

use beacon_proto::Event;

/// Source of a landing page view without a referrer (Plausible's label).
pub const DIRECT: &str = "Direct / None";

/// The derived columns of one event, borrowed from it where possible.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dimensions<'a> {
    pub hostname: Option<&'a str>,
    pub path: Option<&'a str>,
    pub source: Option<Cow<'a, str>>,
    pub medium: Option<Cow<'a, str>>,
    pub utm_source: Option<Cow<'a, str>>,
    pub utm_medium: Option<Cow<'a, str>>,
    pub utm_campaign: Option<Cow<'a, str>>,
    pub country: Option<&'a str>,
    pub region: Option<&'a str>,
    pub city: Option<&'a str>,
    pub device: Option<&'a str>,
    pub browser: Option<&'a str>,
    pub os: Option<&'a str>,
}

impl<'a> Dimensions<'a> {
    pub fn derive(e: &'a Event) -> Self {
        let url = e.url.as_deref().map(split_url);
        let prop = |k: &str| {
            e.properties
                .get(k)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        let mut d = Dimensions {
            hostname: url.and_then(|u| u.host).filter(|h| !h.is_empty()),
            path: url.map(|u| if u.path.is_empty() { "/" } else { u.path }),
            country: prop("$country"),
            region: prop("$region"),
            city: prop("$city"),
            device: prop("$device"),
            browser: prop("$browser"),
            os: prop("$os"),
            ..Default::default()
        };
        if e.name != beacon_proto::event::PAGEVIEW {
            return d;
        }
        let mut utm = url.map(|u| utm_params(u.query)).unwrap_or_default();
        // A plugin (like the UTM example) may have moved them from the URL to properties.
        for (slot, key) in [
            (&mut utm.source, "utm_source"),
            (&mut utm.medium, "utm_medium"),
            (&mut utm.campaign, "utm_campaign"),
        ] {
            if slot.is_none() {
                *slot = prop(key).map(Cow::Borrowed);
            }
        }
        if let Some(source) = &utm.source {
            d.source = Some(source.clone());
            d.medium = utm.medium.clone().or(Some(Cow::Borrowed("(none)")));
            d.utm_source = utm.source;
            d.utm_medium = utm.medium;
            d.utm_campaign = utm.campaign;
            return d;
        }
        let referrer = e
            .referrer
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty());
        let Some(referrer) = referrer else {
            d.source = Some(Cow::Borrowed(DIRECT));
            d.medium = Some(Cow::Borrowed("direct"));
            d.utm_medium = utm.medium;
            d.utm_campaign = utm.campaign;
            return d;
        };
        let ref_host = split_url(referrer).host.unwrap_or("");
        if ref_host.is_empty() || d.hostname.is_some_and(|h| h.eq_ignore_ascii_case(ref_host)) {
            return d; // internal navigation (or an unparseable referrer): not a landing
        }
        // Hosts are nearly always lowercase already: allocate only when they are not.
        let (source, medium) = if ref_host.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower = ref_host.to_ascii_lowercase();
            let (source, medium) = classify(&lower);
            (Cow::Owned(source.into_owned()), medium)
        } else {
            classify(ref_host)
        };
        d.source = Some(source);
        d.medium = Some(Cow::Borrowed(medium));
        d.utm_medium = utm.medium;
        d.utm_campaign = utm.campaign;
        d
    }
}

#[derive(Debug, Clone, Copy)]
struct UrlParts<'a> {
    host: Option<&'a str>,
    path: &'a str,
    query: &'a str,
}

/// Splits `scheme://host[:port]/path?query#fragment` without allocating; a relative URL
/// has no host.
fn split_url(url: &str) -> UrlParts<'_> {
    let url = url.split('#').next().unwrap_or("");
    let (rest, query) = url.split_once('?').unwrap_or((url, ""));
    let (host, path) = match rest.split_once("://") {
        Some((scheme, after))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)) =>
        {
            let end = after.find('/').unwrap_or(after.len());
            let authority = &after[..end];
            let host = authority.rsplit('@').next().unwrap_or(authority);
            let host = match host.rsplit_once(':') {
                Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
                _ => host,
            };
            (Some(host), &after[end..])
        }
        _ => (None, rest),
    };
    UrlParts { host, path, query }
}

#[derive(Debug, Default)]
struct Utm<'a> {
    source: Option<Cow<'a, str>>,
    medium: Option<Cow<'a, str>>,
    campaign: Option<Cow<'a, str>>,
}

fn utm_params(query: &str) -> Utm<'_> {
    let mut utm = Utm::default();
    if !query.contains("utm_") {
        return utm;
    }
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if v.trim().is_empty() {
            continue;
        }
        let slot = match k.as_ref() {
            "utm_source" => &mut utm.source,
            "utm_medium" => &mut utm.medium,
            "utm_campaign" => &mut utm.campaign,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(Cow::Owned(v.trim().to_string()));
        }
    }
    utm
}

/// Known referrer hosts: (host suffix, source, medium). A host matches an entry when it
/// equals the suffix or ends with `.` + suffix; `google.` entries match any country TLD.
const KNOWN: &[(&str, &str, &str)] = &[
    ("mail.google.com", "Gmail", "email"),
    ("outlook.live.com", "Outlook", "email"),
    ("mail.yahoo.com", "Yahoo Mail", "email"),
    ("bing.com", "Bing", "search"),
    ("duckduckgo.com", "DuckDuckGo", "search"),
    ("search.yahoo.com", "Yahoo!", "search"),
    ("yandex.ru", "Yandex", "search"),
    ("yandex.com", "Yandex", "search"),
    ("baidu.com", "Baidu", "search"),
    ("ecosia.org", "Ecosia", "search"),
    ("search.brave.com", "Brave", "search"),
    ("facebook.com", "Facebook", "social"),
    ("fb.com", "Facebook", "social"),
    ("instagram.com", "Instagram", "social"),
    ("t.co", "Twitter", "social"),
    ("twitter.com", "Twitter", "social"),
    ("x.com", "Twitter", "social"),
    ("linkedin.com", "LinkedIn", "social"),
    ("lnkd.in", "LinkedIn", "social"),
    ("reddit.com", "Reddit", "social"),
    ("youtube.com", "YouTube", "social"),
    ("pinterest.com", "Pinterest", "social"),
    ("tiktok.com", "TikTok", "social"),
    ("news.ycombinator.com", "Hacker News", "social"),
];

/// `host` is `suffix` or a subdomain of it.
fn is_domain_of(host: &str, suffix: &str) -> bool {
    host.strip_suffix(suffix)
        .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
}

/// (source, medium) of a lowercase referrer host; an unknown host is its own source.
fn classify(host: &str) -> (Cow<'_, str>, &'static str) {
    let bare = host.strip_prefix("www.").unwrap_or(host);
    for (suffix, source, medium) in KNOWN {
        if is_domain_of(bare, suffix) {
            return (Cow::Borrowed(source), medium);
        }
    }
    // google.com, google.de, google.co.uk, ... (but not mail.google.com, matched above).
    let google = bare
        .rsplit_once('.')
        .is_some_and(|(labels, _tld)| labels.split('.').any(|l| l == "google"));
    if google {
        return (Cow::Borrowed("Google"), "search");
    }
    (Cow::Borrowed(bare), "referral")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, url: Option<&str>, referrer: Option<&str>) -> Event {
        Event {
            name: name.into(),
            url: url.map(Into::into),
            referrer: referrer.map(Into::into),
            ..Default::default()
        }
    }

    fn source(url: &str, referrer: Option<&str>) -> (Option<String>, Option<String>) {
        let e = event("pageview", Some(url), referrer);
        let d = Dimensions::derive(&e);
        (
            d.source.map(|s| s.into_owned()),
            d.medium.map(|s| s.into_owned()),
        )
    }

    #[test]
    fn urls_split_into_host_and_path() {
        let e = event(
            "pageview",
            Some("https://user@Shop.Example:8443/a/b?x=1#frag"),
            None,
        );
        let d = Dimensions::derive(&e);
        assert_eq!((d.hostname, d.path), (Some("Shop.Example"), Some("/a/b")));
        let e = event("pageview", Some("https://shop.example?x"), None);
        assert_eq!(Dimensions::derive(&e).path, Some("/"));
        let e = event("pageview", Some("/relative/page?q"), None);
        let d = Dimensions::derive(&e);
        assert_eq!((d.hostname, d.path), (None, Some("/relative/page")));
    }

    #[test]
    fn referrers_are_classified_and_internal_navigation_has_no_source() {
        let s = |a, b| (Some(String::from(a)), Some(String::from(b)));
        assert_eq!(
            source(
                "https://shop.example/",
                Some("https://www.google.co.uk/search?q=x")
            ),
            s("Google", "search")
        );
        assert_eq!(
            source(
                "https://shop.example/",
                Some("https://l.facebook.com/l.php")
            ),
            s("Facebook", "social")
        );
        assert_eq!(
            source(
                "https://shop.example/",
                Some("https://mail.google.com/mail/u/0")
            ),
            s("Gmail", "email")
        );
        assert_eq!(
            source(
                "https://shop.example/",
                Some("https://www.blog.example/post")
            ),
            s("blog.example", "referral")
        );
        assert_eq!(source("https://shop.example/", None), s(DIRECT, "direct"));
        assert_eq!(
            source("https://shop.example/", Some("")),
            s(DIRECT, "direct")
        );
        assert_eq!(
            source("https://shop.example/b", Some("https://SHOP.example/a")),
            (None, None)
        );
        // Host case does not matter; an unknown host keeps its (lowercased) name.
        assert_eq!(
            source("https://shop.example/", Some("https://WWW.Google.COM/")),
            s("Google", "search")
        );
        assert_eq!(
            source("https://shop.example/", Some("https://Blog.Example/x")),
            s("blog.example", "referral")
        );
        // Not a Google domain, despite the word.
        assert_eq!(
            source("https://shop.example/", Some("https://googleblog.example/")),
            s("googleblog.example", "referral")
        );
    }

    #[test]
    fn utm_parameters_take_precedence() {
        let e = event(
            "pageview",
            Some("https://shop.example/?utm_source=news%20letter&utm_medium=email&utm_campaign=spring+sale"),
            Some("https://www.google.com/"),
        );
        let d = Dimensions::derive(&e);
        assert_eq!(d.source.as_deref(), Some("news letter"));
        assert_eq!(d.medium.as_deref(), Some("email"));
        assert_eq!(d.utm_campaign.as_deref(), Some("spring sale"));
        // Or from properties, where the UTM plugin puts them.
        let mut e = event("pageview", Some("https://shop.example/"), None);
        e.properties.insert("utm_source".into(), "fb".into());
        assert_eq!(Dimensions::derive(&e).source.as_deref(), Some("fb"));
        // Custom events carry no acquisition.
        let e = event("signup", Some("https://shop.example/?utm_source=x"), None);
        assert_eq!(Dimensions::derive(&e).source, None);
    }

    #[test]
    fn geo_and_device_come_from_reserved_properties() {
        let mut e = event("pageview", None, None);
        e.properties.insert("$country".into(), "DE".into());
        e.properties.insert("$device".into(), "Mobile".into());
        e.properties.insert("$os".into(), "".into());
        let d = Dimensions::derive(&e);
        assert_eq!(
            (d.country, d.device, d.os),
            (Some("DE"), Some("Mobile"), None)
        );
    }
}

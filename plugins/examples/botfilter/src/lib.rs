//! Bot and internal-traffic filter: drops (or flags) events that match any of a list of
//! rules.
//!
//! Config (JSON, every field optional; empty config = drop events whose `user_agent`
//! property looks like a bot):
//!
//! ```json
//! {
//!   "action": "drop",
//!   "flag_property": "bot",
//!   "rules": [
//!     {"property": "user_agent", "contains_any": ["bot", "crawler", "spider"], "except_contains": ["cubot"]},
//!     {"name": "office", "property": "ip", "cidr": ["10.0.0.0/8", "2001:db8::/32", "203.0.113.7"]},
//!     {"visitor_id": ["v_123", "v_456"]},
//!     {"user_id": ["qa-robot"]},
//!     {"url_host": ["localhost", "staging.example.com", "*.preview.example.com"]},
//!     {"referrer_host": ["admin.example.com"]},
//!     {"property": "internal", "equals": "1"},
//!     {"property": "env", "equals": ["staging", "test"]}
//!   ]
//! }
//! ```
//!
//! - `action`: `drop` (default) removes matching events; `flag` keeps them and sets
//!   property `flag_property` (default `bot`) to the reason: the first matching rule's
//!   `name`, or if it has none an automatic one (`user_agent:crawler` — the needle that
//!   matched —, `ip:10.0.0.0/8`, `internal=1`, `visitor_id`, `user_id`,
//!   `url_host:localhost`, `referrer_host:...`). Rules are tried in config order.
//! - `rules`: absent = one rule on property `user_agent` with a built-in list of bot,
//!   crawler, headless-browser, monitoring and HTTP-library markers (see
//!   [`DEFAULT_BOT_MARKERS`]), except `cubot` (a phone brand); `[]` = match nothing.
//!
//! Each rule has exactly one target:
//! - `property` with exactly one matcher: `contains_any` (case-insensitive substrings,
//!   optionally with `except_contains`, case-insensitive substrings that veto the match),
//!   `equals` (a string or list, case-insensitive, whole value trimmed) or `cidr` (IPv4 /
//!   IPv6 networks or single addresses; the value is trimmed, a list such as
//!   `X-Forwarded-For`'s is judged by its first entry, a port (`1.2.3.4:80`, `[::1]:80`)
//!   is ignored, IPv4-mapped IPv6 addresses match IPv4 networks; values that are not IP
//!   addresses never match);
//! - `visitor_id` / `user_id`: exact (case-sensitive) ids;
//! - `url_host` / `referrer_host`: host names of the event's URL / referrer, case-insensitive
//!   and without port; `*.example.com` matches every subdomain of `example.com` (but not
//!   `example.com` itself).
//!
//! Events that lack the targeted field never match. Output keeps the input order.

use std::net::{IpAddr, SocketAddr};

use beacon_plugin_sdk::batch::{Batch, EventRef};
use beacon_plugin_sdk::{parse_config, url, PluginError};
use serde::Deserialize;

/// User-agent substrings (lower case) of the default rule.
pub const DEFAULT_BOT_MARKERS: &[&str] = &[
    "bot",
    "crawler",
    "spider",
    "crawl",
    "slurp",
    "scrapy",
    "headless",
    "phantomjs",
    "selenium",
    "webdriver",
    "puppeteer",
    "playwright",
    "lighthouse",
    "pagespeed",
    "pingdom",
    "uptimerobot",
    "statuscake",
    "site24x7",
    "facebookexternalhit",
    "embedly",
    "mediapartners-google",
    "feedfetcher",
    "python-requests",
    "python-urllib",
    "aiohttp",
    "httpx",
    "go-http-client",
    "okhttp",
    "java/",
    "apache-httpclient",
    "libwww-perl",
    "curl/",
    "wget/",
    "axios/",
    "node-fetch",
    "undici",
    "postmanruntime",
];

/// User-agent substrings that veto the default rule.
pub const DEFAULT_EXCEPTIONS: &[&str] = &["cubot"];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    #[default]
    Drop,
    Flag,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RuleConfig {
    name: Option<String>,
    property: Option<String>,
    contains_any: Option<Vec<String>>,
    except_contains: Option<Vec<String>>,
    equals: Option<OneOrMany>,
    cidr: Option<Vec<String>>,
    visitor_id: Option<Vec<String>>,
    user_id: Option<Vec<String>>,
    url_host: Option<Vec<String>>,
    referrer_host: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    action: Action,
    flag_property: String,
    rules: Option<Vec<RuleConfig>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            action: Action::Drop,
            flag_property: "bot".into(),
            rules: None,
        }
    }
}

/// An IP network: address bits (IPv4 as its 32 bits) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    V4(u32, u8),
    V6(u128, u8),
}

impl Net {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| {
            format!("`{s}` is not an IP network (like 10.0.0.0/8 or 2001:db8::/32)")
        })?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        };
        Ok(match ip {
            IpAddr::V4(v4) => Net::V4(u32::from(v4), len),
            IpAddr::V6(v6) => Net::V6(u128::from(v6), len),
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (*self, ip) {
            (Net::V4(net, len), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(a) & mask == net & mask
            }
            (Net::V6(net, len), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(a) & mask == net & mask
            }
            _ => false,
        }
    }
}

/// The IP address in a property value: trimmed, first of a comma-separated list, port
/// ignored.
fn parse_ip(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?.trim();
    first
        .parse::<IpAddr>()
        .ok()
        .or_else(|| first.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[derive(Debug)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`: stores `.example.com`.
    Subdomains(String),
}

impl HostPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let s = s
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .map(str::to_string)
            .unwrap_or(s);
        if s.is_empty() {
            return Err("empty host".into());
        }
        Ok(match s.strip_prefix('*') {
            Some(rest) if rest.starts_with('.') && rest.len() > 1 => Self::Subdomains(rest.into()),
            Some(_) => {
                return Err(format!(
                    "`{s}`: a wildcard host must look like *.example.com"
                ))
            }
            None => Self::Exact(s),
        })
    }

    fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        match self {
            Self::Exact(h) => host.eq_ignore_ascii_case(h),
            Self::Subdomains(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Exact(h) => h.clone(),
            Self::Subdomains(s) => format!("*{s}"),
        }
    }
}

#[derive(Debug)]
enum Matcher {
    Contains {
        any: Vec<String>,
        except: Vec<String>,
    },
    Equals(Vec<String>),
    Cidr(Vec<(Net, String)>),
}

#[derive(Debug)]
enum Target {
    Property(String, Matcher),
    VisitorId(Vec<String>),
    UserId(Vec<String>),
    UrlHost(Vec<HostPattern>),
    ReferrerHost(Vec<HostPattern>),
}

#[derive(Debug)]
struct Rule {
    name: Option<String>,
    target: Target,
}

fn lower_all(v: Vec<String>) -> Vec<String> {
    v.into_iter().map(|s| s.to_lowercase()).collect()
}

impl Rule {
    fn compile(c: RuleConfig) -> Result<Self, String> {
        let targets = [
            c.property.is_some(),
            c.visitor_id.is_some(),
            c.user_id.is_some(),
            c.url_host.is_some(),
            c.referrer_host.is_some(),
        ]
        .iter()
        .filter(|t| **t)
        .count();
        if targets != 1 {
            return Err("needs exactly one of `property`, `visitor_id`, `user_id`, \
                        `url_host`, `referrer_host`"
                .into());
        }
        let matchers = [
            c.contains_any.is_some(),
            c.equals.is_some(),
            c.cidr.is_some(),
        ]
        .iter()
        .filter(|m| **m)
        .count();
        if c.except_contains.is_some() && c.contains_any.is_none() {
            return Err("`except_contains` only goes with `contains_any`".into());
        }
        let target = if let Some(property) = c.property {
            let matcher = match (c.contains_any, c.equals, c.cidr) {
                _ if matchers != 1 => {
                    return Err(format!(
                    "property `{property}` needs exactly one of `contains_any`, `equals`, `cidr`"
                ))
                }
                (Some(any), _, _) => {
                    if any.iter().any(|s| s.is_empty()) {
                        return Err(
                            "`contains_any` has an empty string (it would match everything)".into(),
                        );
                    }
                    Matcher::Contains {
                        any: lower_all(any),
                        except: lower_all(c.except_contains.unwrap_or_default()),
                    }
                }
                (_, Some(eq), _) => Matcher::Equals(lower_all(match eq {
                    OneOrMany::One(s) => vec![s],
                    OneOrMany::Many(v) => v,
                })),
                (_, _, Some(cidr)) => Matcher::Cidr(
                    cidr.into_iter()
                        .map(|s| Net::parse(&s).map(|n| (n, s.trim().to_string())))
                        .collect::<Result<_, _>>()?,
                ),
                (None, None, None) => unreachable!("exactly one matcher"),
            };
            Target::Property(property, matcher)
        } else {
            if matchers != 0 {
                return Err("`contains_any`, `equals` and `cidr` need a `property`".into());
            }
            let hosts = |v: Vec<String>| {
                v.iter()
                    .map(|h| HostPattern::parse(h))
                    .collect::<Result<Vec<_>, _>>()
            };
            match (c.visitor_id, c.user_id, c.url_host, c.referrer_host) {
                (Some(v), ..) => Target::VisitorId(v),
                (_, Some(u), ..) => Target::UserId(u),
                (_, _, Some(h), _) => Target::UrlHost(hosts(h)?),
                (.., Some(h)) => Target::ReferrerHost(hosts(h)?),
                _ => unreachable!("exactly one target"),
            }
        };
        Ok(Rule {
            name: c.name,
            target,
        })
    }

    fn default_user_agent() -> Self {
        Rule {
            name: None,
            target: Target::Property(
                "user_agent".into(),
                Matcher::Contains {
                    any: DEFAULT_BOT_MARKERS.iter().map(|s| s.to_string()).collect(),
                    except: DEFAULT_EXCEPTIONS.iter().map(|s| s.to_string()).collect(),
                },
            ),
        }
    }

    /// The reason this rule matches `event`, if it does.
    fn check(&self, event: &EventRef) -> Option<String> {
        let reason = match &self.target {
            Target::Property(key, matcher) => {
                let value = event.property(key)?;
                match matcher {
                    Matcher::Contains { any, except } => {
                        let value = value.to_lowercase();
                        let hit = any.iter().find(|n| value.contains(n.as_str()))?;
                        if except.iter().any(|n| value.contains(n.as_str())) {
                            return None;
                        }
                        format!("{key}:{hit}")
                    }
                    Matcher::Equals(values) => {
                        let value = value.trim().to_lowercase();
                        let hit = values.iter().find(|v| **v == value)?;
                        format!("{key}={hit}")
                    }
                    Matcher::Cidr(nets) => {
                        let ip = parse_ip(value)?;
                        let (_, text) = nets.iter().find(|(n, _)| n.contains(ip))?;
                        format!("{key}:{text}")
                    }
                }
            }
            Target::VisitorId(ids) => {
                let id = event.visitor_id()?;
                ids.iter()
                    .any(|v| v == id)
                    .then(|| "visitor_id".to_string())?
            }
            Target::UserId(ids) => {
                let id = event.user_id()?;
                ids.iter().any(|v| v == id).then(|| "user_id".to_string())?
            }
            Target::UrlHost(patterns) => {
                let host = event.url().and_then(url::host)?;
                let p = patterns.iter().find(|p| p.matches(host))?;
                format!("url_host:{}", p.text())
            }
            Target::ReferrerHost(patterns) => {
                let host = event.referrer().and_then(url::host)?;
                let p = patterns.iter().find(|p| p.matches(host))?;
                format!("referrer_host:{}", p.text())
            }
        };
        Some(self.name.clone().unwrap_or(reason))
    }
}

fn compile(config: &str) -> Result<(Config, Vec<Rule>), PluginError> {
    let mut config: Config = parse_config(config)?;
    let rules = match config.rules.take() {
        None => vec![Rule::default_user_agent()],
        Some(rules) => rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                Rule::compile(r).map_err(|e| {
                    PluginError::new(format!("invalid plugin config: rules[{i}]: {e}"))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    if config.action == Action::Flag && config.flag_property.is_empty() {
        return Err(PluginError::new(
            "invalid plugin config: `flag_property` is empty",
        ));
    }
    Ok((config, rules))
}

/// Processes one batch (the component's `process-batch` export; natively through
/// `beacon_plugin_sdk::batch::run`).
pub fn process(config: &str, batch: &mut Batch) -> Result<(), PluginError> {
    let (config, rules) = compile(config)?;
    if rules.is_empty() {
        return Ok(());
    }
    let reason = |e: &EventRef| rules.iter().find_map(|r| r.check(e));
    match config.action {
        Action::Drop => batch.retain(|e| reason(e).is_none()),
        Action::Flag => {
            for mut event in batch.events_mut() {
                if let Some(r) = reason(&event.get()) {
                    event.set_property(config.flag_property.as_str(), r);
                }
            }
        }
    }
    Ok(())
}

beacon_plugin_sdk::export_batch_plugin!(process);

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_plugin_sdk::{Event, EventExt};

    /// The plugin on owned events, through the packed encoding the host uses.
    fn process(config: &str, batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        beacon_plugin_sdk::batch::run(super::process, config, batch)
    }

    const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";

    fn ua(id: &str, ua: &str) -> Event {
        Event::new(id, "pageview", 1).with_property("user_agent", ua)
    }

    fn ids(batch: &[Event]) -> Vec<&str> {
        batch.iter().map(|e| e.event_id.as_str()).collect()
    }

    #[test]
    fn default_rule_drops_bot_user_agents() {
        let batch = vec![
            ua("human", CHROME),
            ua(
                "google",
                "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            ),
            ua(
                "headless",
                "Mozilla/5.0 HeadlessChrome/124.0.0.0 Safari/537.36",
            ),
            ua("curl", "curl/8.5.0"),
            ua("python", "python-requests/2.31"),
            ua(
                "phone",
                "Mozilla/5.0 (Linux; Android 10; CUBOT X30) Chrome/124.0 Mobile Safari/537.36",
            ),
            ua("bing", "Mozilla/5.0 (compatible; bingbot/2.0)"),
            Event::new("no-ua", "pageview", 1),
        ];
        let out = process("", batch).unwrap();
        assert_eq!(ids(&out), ["human", "phone", "no-ua"]);
    }

    #[test]
    fn flag_mode_sets_the_reason() {
        let batch = vec![
            ua("human", CHROME),
            ua(
                "spider",
                "Baiduspider+(+http://www.baidu.com/search/spider.htm)",
            ),
        ];
        let out = process(r#"{"action": "flag"}"#, batch.clone()).unwrap();
        assert_eq!(ids(&out), ["human", "spider"]);
        assert_eq!(out[0], batch[0]);
        assert_eq!(out[1].property("bot"), Some("user_agent:spider"));

        let out = process(r#"{"action": "flag", "flag_property": "is_bot"}"#, batch).unwrap();
        assert_eq!(out[1].property("is_bot"), Some("user_agent:spider"));
        assert_eq!(out[1].property("bot"), None);
    }

    #[test]
    fn cidr_rules() {
        let config = r#"{"action": "flag", "rules": [
            {"property": "ip", "cidr": ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "0.0.0.0/0"]}
        ]}"#;
        let only_private = r#"{"rules": [{"property": "ip", "cidr": ["10.0.0.0/8", "2001:DB8::/32", "192.168.1.7/32"]}]}"#;
        let ip = |id: &str, ip: &str| Event::new(id, "x", 1).with_property("ip", ip);
        let batch = vec![
            ip("a", "10.20.30.40"),
            ip("b", "11.0.0.1"),
            ip("c", " 192.168.1.7 "),
            ip("d", "192.168.1.8"),
            ip("e", "2001:db8:1::5"),
            ip("f", "2001:db9::5"),
            ip("g", "::ffff:10.1.2.3"),
            ip("h", "10.0.0.1, 172.16.0.1"),
            ip("i", "172.16.0.1, 10.0.0.1"),
            ip("j", "10.0.0.1:4431"),
            ip("k", "[2001:db8::1]:443"),
            ip("l", "not an ip"),
            ip("m", ""),
            Event::new("n", "x", 1),
        ];
        let out = process(only_private, batch.clone()).unwrap();
        assert_eq!(ids(&out), ["b", "d", "f", "i", "l", "m", "n"]);

        let out = process(config, batch).unwrap();
        assert_eq!(out[0].property("bot"), Some("ip:10.0.0.0/8"));
        assert_eq!(out[1].property("bot"), Some("ip:0.0.0.0/0"));
        assert_eq!(out[2].property("bot"), Some("ip:192.168.1.7"));
        assert_eq!(out[4].property("bot"), Some("ip:2001:db8::/32"));
        assert_eq!(out[5].property("bot"), None, "no v6 catch-all");
        assert_eq!(out[11].property("bot"), None);
    }

    #[test]
    fn net_edges() {
        let n = Net::parse("0.0.0.0/0").unwrap();
        assert!(n.contains("255.255.255.255".parse().unwrap()));
        let n = Net::parse("::/0").unwrap();
        assert!(n.contains("ffff::1".parse().unwrap()));
        let n = Net::parse("10.1.2.3/31").unwrap();
        assert!(n.contains("10.1.2.2".parse().unwrap()));
        assert!(!n.contains("10.1.2.4".parse().unwrap()));
        assert!(Net::parse("10.0.0.0/33").is_err());
        assert!(Net::parse("2001:db8::/129").is_err());
        assert!(Net::parse("10.0.0/8").is_err());
        assert!(Net::parse("example.com").is_err());
    }

    #[test]
    fn ids_hosts_and_equals() {
        let config = r#"{"action": "flag", "rules": [
            {"visitor_id": ["v_internal"]},
            {"user_id": ["QA"]},
            {"name": "dev", "url_host": ["localhost", "Staging.Example.com", "*.preview.example.com"]},
            {"referrer_host": ["admin.example.com"]},
            {"property": "internal", "equals": "1"},
            {"property": "env", "equals": ["Staging", "test"]}
        ]}"#;
        let mut v = Event::new("v", "x", 1);
        v.visitor_id = Some("v_internal".into());
        let mut v2 = Event::new("v2", "x", 1);
        v2.visitor_id = Some("V_INTERNAL".into());
        let mut u = Event::new("u", "x", 1);
        u.user_id = Some("QA".into());
        let mut r = Event::new("r", "x", 1).with_url("https://shop.example.com/");
        r.referrer = Some("https://ADMIN.example.com/orders".into());
        let batch = vec![
            v,
            v2,
            u,
            Event::new("h1", "x", 1).with_url("http://localhost:3000/p"),
            Event::new("h2", "x", 1).with_url("https://staging.example.com./p"),
            Event::new("h3", "x", 1).with_url("https://pr-12.preview.example.com/"),
            Event::new("h4", "x", 1).with_url("https://preview.example.com/"),
            Event::new("h5", "x", 1).with_url("/relative/path"),
            r,
            Event::new("p1", "x", 1).with_property("internal", " 1 "),
            Event::new("p2", "x", 1).with_property("internal", "0"),
            Event::new("p3", "x", 1).with_property("env", "STAGING"),
        ];
        let out = process(config, batch).unwrap();
        let flags: Vec<(&str, Option<&str>)> = out
            .iter()
            .map(|e| (e.event_id.as_str(), e.property("bot")))
            .collect();
        assert_eq!(
            flags,
            [
                ("v", Some("visitor_id")),
                ("v2", None),
                ("u", Some("user_id")),
                ("h1", Some("dev")),
                ("h2", Some("dev")),
                ("h3", Some("dev")),
                ("h4", None),
                ("h5", None),
                ("r", Some("referrer_host:admin.example.com")),
                ("p1", Some("internal=1")),
                ("p2", None),
                ("p3", Some("env=staging")),
            ]
        );
    }

    #[test]
    fn first_matching_rule_names_the_reason_and_empty_rules_keep_everything() {
        let e = ua("x", "SuperCrawler bot").with_property("internal", "1");
        let out = process(
            r#"{"action": "flag", "rules": [
                {"property": "internal", "equals": "1"},
                {"name": "ua", "property": "user_agent", "contains_any": ["crawler"]}
            ]}"#,
            vec![e.clone()],
        )
        .unwrap();
        assert_eq!(out[0].property("bot"), Some("internal=1"));
        let out = process(r#"{"rules": []}"#, vec![e.clone()]).unwrap();
        // Unchanged, with properties in key order as the host keeps them.
        let mut e = e;
        e.properties.sort();
        assert_eq!(out, vec![e]);
    }

    #[test]
    fn custom_contains_with_exceptions() {
        let out = process(
            r#"{"rules": [{"property": "user_agent", "contains_any": ["Bot"], "except_contains": ["GoodBot"]}]}"#,
            vec![ua("a", "EvilBot/1"), ua("b", "goodbot/2"), ua("c", CHROME)],
        )
        .unwrap();
        assert_eq!(ids(&out), ["b", "c"]);
    }

    #[test]
    fn config_errors() {
        for (config, needle) in [
            (r#"{"action": "block"}"#, "unknown variant `block`"),
            (r#"{"rules": [{}]}"#, "rules[0]: needs exactly one of"),
            (
                r#"{"rules": [{"property": "ip"}]}"#,
                "rules[0]: property `ip` needs exactly one of",
            ),
            (
                r#"{"rules": [{"property": "ip", "cidr": ["10/8"]}]}"#,
                "not an IP network",
            ),
            (
                r#"{"rules": [{"property": "ip", "cidr": ["10.0.0.0/40"]}]}"#,
                "prefix length",
            ),
            (
                r#"{"rules": [{"property": "a", "equals": "1", "cidr": []}]}"#,
                "exactly one of",
            ),
            (
                r#"{"rules": [{"visitor_id": ["a"], "url_host": ["b"]}]}"#,
                "needs exactly one of",
            ),
            (
                r#"{"rules": [{"visitor_id": ["a"], "equals": "b"}]}"#,
                "need a `property`",
            ),
            (
                r#"{"rules": [{"property": "a", "equals": "1", "except_contains": ["x"]}]}"#,
                "only goes with",
            ),
            (
                r#"{"rules": [{"property": "ua", "contains_any": [""]}]}"#,
                "empty string",
            ),
            (r#"{"rules": [{"url_host": ["*example.com"]}]}"#, "wildcard"),
            (r#"{"rules": [{"url_host": [""]}]}"#, "empty host"),
            (r#"{"rules": [{"ip": "x"}]}"#, "unknown field `ip`"),
            (
                r#"{"action": "flag", "flag_property": ""}"#,
                "`flag_property` is empty",
            ),
        ] {
            let err = process(config, vec![]).unwrap_err();
            assert!(err.message.contains(needle), "{config}: {}", err.message);
        }
    }

    #[test]
    fn deterministic_and_order_preserving() {
        let batch: Vec<Event> = (0..200)
            .map(|i| {
                ua(
                    &format!("e{i}"),
                    if i % 3 == 0 { "crawler" } else { CHROME },
                )
            })
            .collect();
        let a = process("", batch.clone()).unwrap();
        assert_eq!(a, process("", batch.clone()).unwrap());
        let expected: Vec<&Event> = batch
            .iter()
            .filter(|e| e.property("user_agent") == Some(CHROME))
            .collect();
        assert_eq!(a.iter().collect::<Vec<_>>(), expected);
    }
}

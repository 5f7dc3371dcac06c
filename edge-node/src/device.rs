//! User agent -> device class, browser, OS, and whether it is a bot.
//!
//! Browser and OS come from uap-core's rules (the `ua-parser` crate; rules shipped in
//! `data/uap-regexes.json`). uap-core has no device *class*, so Desktop/Mobile/Tablet is
//! decided here from the tokens every platform uses. Bots are uap-core's "Spider" devices
//! plus the `isbot` crate's patterns (crawlers, HTTP libraries, headless browsers, uptime
//! monitors). Parsed results are cached: real traffic repeats a few thousand agents.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserAgent {
    /// `Desktop`, `Mobile` or `Tablet` (Plausible's labels); `None` for bots.
    pub device: Option<String>,
    pub browser: Option<String>,
    pub os: Option<String>,
    /// The bot's name (or `bot`) when the agent is a crawler or script.
    pub bot: Option<String>,
}

static UAP: LazyLock<Option<ua_parser::Extractor<'static>>> = LazyLock::new(|| {
    let rules: ua_parser::Regexes<'static> =
        serde_json::from_str(include_str!("../data/uap-regexes.json")).ok()?;
    ua_parser::Extractor::try_from(rules).ok()
});
static BOTS: LazyLock<isbot::Bots> = LazyLock::new(isbot::Bots::default);

const CACHE_MAX: usize = 16_384;
static CACHE: LazyLock<Mutex<HashMap<String, Arc<UserAgent>>>> =
    LazyLock::new(|| Mutex::new(HashMap::with_capacity(1024)));

/// Parses (or finds in the cache) a user agent.
pub fn parse(ua: &str) -> UserAgent {
    if let Some(hit) = CACHE.lock().ok().and_then(|c| c.get(ua).cloned()) {
        return (*hit).clone();
    }
    let parsed = parse_uncached(ua);
    if let Ok(mut c) = CACHE.lock() {
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(ua.to_string(), Arc::new(parsed.clone()));
    }
    parsed
}

fn parse_uncached(ua: &str) -> UserAgent {
    let known = |s: &str| (!s.is_empty() && s != "Other").then(|| s.to_string());
    let (browser, os, spider) = match UAP.as_ref() {
        Some(x) => {
            let (b, o, d) = x.extract(ua);
            (
                b.and_then(|b| known(&b.family)),
                o.and_then(|o| known(&o.os)),
                d.is_some_and(|d| d.device == "Spider"),
            )
        }
        None => (None, None, false),
    };
    if spider || BOTS.is_bot(ua) {
        return UserAgent {
            bot: Some(browser.clone().unwrap_or_else(|| "bot".into())),
            browser,
            os,
            device: None,
        };
    }
    let has = |n: &str| ua.contains(n);
    let device = if has("iPad")
        || has("Tablet")
        || has("Kindle")
        || has("Silk/")
        || has("PlayBook")
        || (has("Android") && !has("Mobile"))
    {
        "Tablet"
    } else if has("Mobi") || has("iPhone") || has("iPod") || has("Android") || has("Windows Phone")
    {
        "Mobile"
    } else {
        "Desktop"
    };
    UserAgent {
        device: Some(device.into()),
        browser,
        os,
        bot: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ua: &str) -> (Option<String>, Option<String>, Option<String>, bool) {
        let u = parse(ua);
        (u.device, u.browser, u.os, u.bot.is_some())
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn rules_load() {
        assert!(UAP.is_some(), "uap-regexes.json must parse and compile");
    }

    #[test]
    fn classes() {
        assert_eq!(
            p("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"),
            (s("Desktop"), s("Chrome"), s("Windows"), false)
        );
        assert_eq!(
            p("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"),
            (s("Mobile"), s("Mobile Safari"), s("iOS"), false)
        );
        assert_eq!(
            p("Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1").0,
            s("Tablet")
        );
        assert_eq!(
            p("Mozilla/5.0 (Linux; Android 14; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36").0,
            s("Tablet")
        );
    }

    #[test]
    fn bots() {
        for ua in [
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "python-requests/2.31.0",
            "curl/8.0",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36",
        ] {
            let u = parse(ua);
            assert!(u.bot.is_some(), "{ua}");
            assert_eq!(u.device, None);
        }
        assert_eq!(
            parse("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)").bot,
            s("Googlebot")
        );
        // Cached answers are the same answers.
        assert_eq!(parse("curl/8.0"), parse("curl/8.0"));
    }
}

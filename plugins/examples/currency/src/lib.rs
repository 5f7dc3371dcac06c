//! Currency normalisation: converts `revenue_micros` from the event's `currency` into one
//! base currency with configured exchange rates, so revenue can be summed across currencies.
//!
//! Config (JSON; `base` is required):
//!
//! ```json
//! {
//!   "base": "EUR",
//!   "rates": {"USD": 0.92, "GBP": "1.17", "JPY": 0.0061},
//!   "on_unknown": "keep",
//!   "flag_property": "unknown_currency"
//! }
//! ```
//!
//! - `base`: the currency everything is converted into.
//! - `rates`: base-currency units per one unit of each currency (`"USD": 0.92` means
//!   1 USD = 0.92 EUR). A JSON number or a string with a plain decimal (`"0.92"`; no
//!   exponent). Numbers are taken as the shortest decimal that reads back as the same
//!   double (`0.92` is exactly 0.92), then all arithmetic is exact integer arithmetic. At most
//!   18 significant digits and 36 decimal places; must be > 0. Codes are case-insensitive
//!   (stored upper-case); a rate for `base` itself must be 1.
//! - `on_unknown`: what to do with an event that has revenue but whose currency has no rate
//!   (or that has no currency): `keep` (default: leave it unchanged), `error` (refuse the
//!   batch, naming the event and currency) or `flag` (leave it unchanged and set property
//!   `flag_property`, default `unknown_currency`, to the currency code, or `(missing)`).
//!
//! A converted event gets `revenue_micros` = round(original × rate), `currency` = `base`,
//! and properties `original_currency` (the code, upper-case), `original_revenue_micros`
//! and `fx_rate` (the rate as a decimal string). Rounding is **half to even** (banker's
//! rounding: 0.5 → 0, 1.5 → 2, −2.5 → −2) on the exact product, so it is deterministic and
//! unbiased over many events. A result that does not fit in `i64` refuses the batch.
//!
//! Events without `revenue_micros` pass unchanged (even with a currency); events already
//! in the base currency keep their revenue (their currency code is only upper-cased), so
//! running the plugin twice changes nothing.

use std::collections::BTreeMap;

use beacon_plugin_sdk::batch::Batch;
use beacon_plugin_sdk::{parse_config, PluginError};
use serde::Deserialize;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnUnknown {
    #[default]
    Keep,
    Error,
    Flag,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RateValue {
    Number(f64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    base: Option<String>,
    rates: BTreeMap<String, RateValue>,
    on_unknown: OnUnknown,
    flag_property: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            base: None,
            rates: BTreeMap::new(),
            on_unknown: OnUnknown::Keep,
            flag_property: "unknown_currency".into(),
        }
    }
}

/// An exact positive decimal: `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub mantissa: u64,
    pub scale: u32,
}

const MAX_DIGITS: usize = 18;
const MAX_SCALE: u32 = 36;

impl Rate {
    /// Parses a plain decimal (`12`, `0.92`, `.5`, `1.170`).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let t = s.trim();
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        if (int.is_empty() && frac.is_empty())
            || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit())
        {
            return Err(format!("`{s}` is not a plain decimal number"));
        }
        let frac = frac.trim_end_matches('0');
        let digits = format!("{int}{frac}");
        let digits = digits.trim_start_matches('0');
        if digits.is_empty() {
            return Err("a rate must be greater than 0".into());
        }
        if digits.len() > MAX_DIGITS {
            return Err(format!(
                "`{s}` has more than {MAX_DIGITS} significant digits"
            ));
        }
        let scale = frac.len() as u32;
        if scale > MAX_SCALE {
            return Err(format!("`{s}` has more than {MAX_SCALE} decimal places"));
        }
        Ok(Rate {
            mantissa: digits.parse().expect("at most 18 digits"),
            scale,
        })
    }

    fn from_value(v: &RateValue) -> Result<Rate, String> {
        match v {
            // Rust prints the shortest decimal that reads back as the same f64, never in
            // exponent notation: 0.92 -> "0.92", 1e-7 -> "0.0000001".
            RateValue::Number(f) if f.is_finite() && *f > 0.0 => Rate::parse(&format!("{f}")),
            RateValue::Number(_) => Err("a rate must be greater than 0".into()),
            RateValue::Text(s) => Rate::parse(s),
        }
    }

    /// `micros × rate`, rounded half to even; `None` if it does not fit in `i64`.
    pub fn convert(&self, micros: i64) -> Option<i64> {
        let num = i128::from(micros) * i128::from(self.mantissa);
        let den = 10i128.pow(self.scale);
        let q = num / den;
        let r = num % den; // same sign as num
        let twice = r.abs() * 2;
        let round_away = twice > den || (twice == den && q % 2 != 0);
        let q = if round_away { q + num.signum() } else { q };
        i64::try_from(q).ok()
    }

    /// The rate as a decimal string (`0.92`, `1`, `0.0000001`).
    pub fn to_decimal(&self) -> String {
        let digits = self.mantissa.to_string();
        let scale = self.scale as usize;
        if scale == 0 {
            return digits;
        }
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        format!("{int}.{frac}")
    }
}

fn normalize_code(code: &str) -> Result<String, String> {
    let c = code.trim().to_ascii_uppercase();
    if c.is_empty() || c.len() > 16 || !c.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("`{code}` is not a currency code"));
    }
    Ok(c)
}

struct Plan {
    base: String,
    rates: BTreeMap<String, Rate>,
    on_unknown: OnUnknown,
    flag_property: String,
}

fn plan(config: &str) -> Result<Plan, PluginError> {
    let config: Config = parse_config(config)?;
    let bad = |m: String| PluginError::new(format!("invalid plugin config: {m}"));
    let base = config
        .base
        .as_deref()
        .ok_or_else(|| {
            bad("`base` (the currency to convert into, e.g. \"EUR\") is required".into())
        })
        .and_then(|b| normalize_code(b).map_err(|e| bad(format!("base: {e}"))))?;
    let mut rates = BTreeMap::new();
    for (code, value) in &config.rates {
        let c = normalize_code(code).map_err(|e| bad(format!("rates: {e}")))?;
        let rate = Rate::from_value(value).map_err(|e| bad(format!("rates.{code}: {e}")))?;
        if c == base {
            if rate
                != (Rate {
                    mantissa: 1,
                    scale: 0,
                })
            {
                return Err(bad(format!(
                    "rates.{code}: the base currency's rate must be 1"
                )));
            }
            continue;
        }
        if rates.insert(c, rate).is_some() {
            return Err(bad(format!("rates: `{code}` is given twice")));
        }
    }
    if config.on_unknown == OnUnknown::Flag && config.flag_property.is_empty() {
        return Err(bad("`flag_property` is empty".into()));
    }
    Ok(Plan {
        base,
        rates,
        on_unknown: config.on_unknown,
        flag_property: config.flag_property,
    })
}

/// Processes one batch (the component's `process-batch` export; natively through
/// `beacon_plugin_sdk::batch::run`).
pub fn process(config: &str, batch: &mut Batch) -> Result<(), PluginError> {
    let plan = plan(config)?;
    for mut event in batch.events_mut() {
        let Some(micros) = event.revenue_micros() else {
            continue;
        };
        let code = event
            .currency()
            .map(|c| c.trim().to_ascii_uppercase())
            .unwrap_or_default();
        if code == plan.base {
            if event.currency() != Some(code.as_str()) {
                event.set_currency(Some(code));
            }
            continue;
        }
        match plan.rates.get(&code) {
            Some(rate) => {
                let converted = rate.convert(micros).ok_or_else(|| {
                    PluginError::new(format!(
                        "event {}: {micros} micro-{code} x {} does not fit in revenue_micros",
                        event.event_id(),
                        rate.to_decimal()
                    ))
                })?;
                event.set_property("original_currency", code.as_str());
                event.set_property("original_revenue_micros", micros.to_string());
                event.set_property("fx_rate", rate.to_decimal());
                event.set_revenue_micros(Some(converted));
                event.set_currency(Some(plan.base.clone()));
            }
            None => match plan.on_unknown {
                OnUnknown::Keep => {}
                OnUnknown::Error => {
                    return Err(PluginError::new(if code.is_empty() {
                        format!("event {}: revenue without a currency", event.event_id())
                    } else {
                        format!(
                            "event {}: no exchange rate for `{code}` into {}",
                            event.event_id(),
                            plan.base
                        )
                    }))
                }
                OnUnknown::Flag => {
                    let value = if code.is_empty() {
                        "(missing)".to_string()
                    } else {
                        code
                    };
                    event.set_property(plan.flag_property.as_str(), value);
                }
            },
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

    const CONFIG: &str = r#"{"base": "EUR", "rates": {"USD": 0.92, "gbp": "1.17", "JPY": 0.0061}}"#;

    fn sale(id: &str, micros: i64, currency: &str) -> Event {
        Event::new(id, "purchase", 1).with_revenue(micros, currency)
    }

    #[test]
    fn converts_and_keeps_the_original() {
        let out = process(
            CONFIG,
            vec![
                sale("usd", 10_000_000, "USD"),
                sale("gbp", 19_990_000, "gbp"),
                sale("jpy", 1_500_000_000, " JPY "),
                sale("eur", 5_000_000, "eur"),
            ],
        )
        .unwrap();
        assert_eq!(out[0].revenue_micros, Some(9_200_000));
        assert_eq!(out[0].currency.as_deref(), Some("EUR"));
        assert_eq!(out[0].property("original_currency"), Some("USD"));
        assert_eq!(out[0].property("original_revenue_micros"), Some("10000000"));
        assert_eq!(out[0].property("fx_rate"), Some("0.92"));
        // 19.99 GBP x 1.17 = 23.3883 EUR
        assert_eq!(out[1].revenue_micros, Some(23_388_300));
        assert_eq!(out[1].property("original_currency"), Some("GBP"));
        // 1500 JPY x 0.0061 = 9.15 EUR
        assert_eq!(out[2].revenue_micros, Some(9_150_000));
        assert_eq!(out[2].property("fx_rate"), Some("0.0061"));
        // Base currency: unchanged but for the code's case.
        assert_eq!(out[3].revenue_micros, Some(5_000_000));
        assert_eq!(out[3].currency.as_deref(), Some("EUR"));
        assert!(out[3].properties.is_empty());
    }

    #[test]
    fn rounding_is_half_to_even_on_the_exact_product() {
        let half = Rate::parse("0.5").unwrap();
        assert_eq!(half.convert(1), Some(0)); // 0.5 -> 0
        assert_eq!(half.convert(3), Some(2)); // 1.5 -> 2
        assert_eq!(half.convert(5), Some(2)); // 2.5 -> 2
        assert_eq!(half.convert(7), Some(4)); // 3.5 -> 4
        assert_eq!(half.convert(-1), Some(0));
        assert_eq!(half.convert(-3), Some(-2));
        assert_eq!(half.convert(-5), Some(-2));
        let r = Rate::parse("0.333").unwrap();
        assert_eq!(r.convert(1_000), Some(333));
        assert_eq!(r.convert(2), Some(1)); // 0.666
        assert_eq!(r.convert(-2), Some(-1));
        assert_eq!(r.convert(1), Some(0)); // 0.333
                                           // 0.1 as a double is 0.1000000000000000055..., but the rate is exactly 0.1.
        let out = process(
            r#"{"base": "EUR", "rates": {"X": 0.1}}"#,
            vec![sale("x", 25, "X")],
        )
        .unwrap();
        assert_eq!(out[0].revenue_micros, Some(2)); // 2.5 -> 2
    }

    #[test]
    fn refunds_and_zero() {
        let out = process(
            CONFIG,
            vec![sale("r", -10_000_000, "USD"), sale("z", 0, "USD")],
        )
        .unwrap();
        assert_eq!(out[0].revenue_micros, Some(-9_200_000));
        assert_eq!(out[1].revenue_micros, Some(0));
    }

    #[test]
    fn rate_parsing() {
        assert_eq!(
            Rate::parse("0.92"),
            Ok(Rate {
                mantissa: 92,
                scale: 2
            })
        );
        assert_eq!(
            Rate::parse("1.170"),
            Ok(Rate {
                mantissa: 117,
                scale: 2
            })
        );
        assert_eq!(
            Rate::parse("12"),
            Ok(Rate {
                mantissa: 12,
                scale: 0
            })
        );
        assert_eq!(
            Rate::parse(".5"),
            Ok(Rate {
                mantissa: 5,
                scale: 1
            })
        );
        assert_eq!(
            Rate::parse("007.50"),
            Ok(Rate {
                mantissa: 75,
                scale: 1
            })
        );
        assert_eq!(
            Rate::parse("0.000000000000000000000000000000000001")
                .unwrap()
                .scale,
            36
        );
        assert!(Rate::parse("0.0000000000000000000000000000000000001").is_err());
        assert!(Rate::parse("1234567890.123456789").is_err());
        assert!(Rate::parse("0").is_err());
        assert!(Rate::parse("0.000").is_err());
        assert!(Rate::parse("-1").is_err());
        assert!(Rate::parse("1e3").is_err());
        assert!(Rate::parse(".").is_err());
        assert!(Rate::parse("").is_err());
        assert!(Rate::parse("1.2.3").is_err());
        for (f, s) in [
            (0.92, "0.92"),
            (1e-7, "0.0000001"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1.17e0, "1.17"),
            (150.0, "150"),
        ] {
            assert_eq!(
                Rate::from_value(&RateValue::Number(f))
                    .unwrap()
                    .to_decimal(),
                s
            );
        }
        assert_eq!(Rate::parse("0.0061").unwrap().to_decimal(), "0.0061");
    }

    #[test]
    fn overflow_is_an_error() {
        let err = process(
            r#"{"base": "EUR", "rates": {"XXX": 1000}}"#,
            vec![sale("big", i64::MAX / 10, "XXX")],
        )
        .unwrap_err();
        assert!(
            err.message.contains("event big") && err.message.contains("does not fit"),
            "{}",
            err.message
        );
        let r = Rate::parse("999999999999999999").unwrap();
        assert_eq!(r.convert(i64::MAX), None);
        assert_eq!(r.convert(i64::MIN), None);
        assert_eq!(Rate::parse("1").unwrap().convert(i64::MIN), Some(i64::MIN));
    }

    #[test]
    fn unknown_currencies() {
        let batch = vec![sale("chf", 1_000_000, "CHF"), {
            let mut e = Event::new("nocur", "purchase", 1);
            e.revenue_micros = Some(1);
            e
        }];
        let out = process(CONFIG, batch.clone()).unwrap();
        assert_eq!(out, batch);

        let out = process(
            r#"{"base": "EUR", "rates": {}, "on_unknown": "flag"}"#,
            batch.clone(),
        )
        .unwrap();
        assert_eq!(out[0].property("unknown_currency"), Some("CHF"));
        assert_eq!(out[0].revenue_micros, Some(1_000_000));
        assert_eq!(out[1].property("unknown_currency"), Some("(missing)"));

        let err = process(r#"{"base": "EUR", "on_unknown": "error"}"#, batch.clone()).unwrap_err();
        assert_eq!(
            err.message,
            "event chf: no exchange rate for `CHF` into EUR"
        );
        let err = process(
            r#"{"base": "EUR", "on_unknown": "error"}"#,
            batch[1..].to_vec(),
        )
        .unwrap_err();
        assert_eq!(err.message, "event nocur: revenue without a currency");
    }

    #[test]
    fn events_without_revenue_pass_unchanged() {
        let mut e = Event::new("p", "pageview", 1).with_url("/x");
        e.currency = Some("usd".into());
        let out = process(r#"{"base": "EUR", "on_unknown": "error"}"#, vec![e.clone()]).unwrap();
        assert_eq!(out, vec![e]);
    }

    #[test]
    fn idempotent_and_deterministic() {
        let batch: Vec<Event> = (0..100)
            .map(|i| {
                sale(
                    &format!("e{i}"),
                    i * 1_234_567,
                    ["USD", "GBP", "EUR", "JPY"][i as usize % 4],
                )
            })
            .collect();
        let once = process(CONFIG, batch.clone()).unwrap();
        assert_eq!(once, process(CONFIG, batch).unwrap());
        assert_eq!(process(CONFIG, once.clone()).unwrap(), once);
        assert!(once.iter().all(|e| e.currency.as_deref() == Some("EUR")));
    }

    #[test]
    fn config_errors() {
        for (config, needle) in [
            ("", "`base`"),
            (r#"{"rates": {"USD": 1}}"#, "`base`"),
            (
                r#"{"base": "E U R"}"#,
                "base: `E U R` is not a currency code",
            ),
            (
                r#"{"base": "EUR", "rates": {"USD": 0}}"#,
                "rates.USD: a rate must be greater than 0",
            ),
            (
                r#"{"base": "EUR", "rates": {"USD": -1.5}}"#,
                "greater than 0",
            ),
            (
                r#"{"base": "EUR", "rates": {"USD": "abc"}}"#,
                "not a plain decimal",
            ),
            (
                r#"{"base": "EUR", "rates": {"USD": true}}"#,
                "did not match any variant",
            ),
            (r#"{"base": "EUR", "rates": {"EUR": 2}}"#, "must be 1"),
            (
                r#"{"base": "EUR", "rates": {"usd": 1, "USD": 1}}"#,
                "given twice",
            ),
            (
                r#"{"base": "EUR", "on_unknown": "drop"}"#,
                "unknown variant `drop`",
            ),
            (
                r#"{"base": "EUR", "on_unknown": "flag", "flag_property": ""}"#,
                "`flag_property` is empty",
            ),
            (r#"{"base": "EUR", "rate": {}}"#, "unknown field `rate`"),
        ] {
            let err = process(config, vec![]).unwrap_err();
            assert!(err.message.contains(needle), "{config}: {}", err.message);
        }
        assert!(process(r#"{"base": "EUR", "rates": {"EUR": 1.0}}"#, vec![]).is_ok());
    }
}

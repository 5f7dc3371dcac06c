//! The breakdown dimensions, in one table: what the metrics API calls each, the `events`
//! column that holds it, whether it belongs to the event or to the visit, how ingest gets
//! it, and whether the hourly rollups carry it. The `events` schema
//! ([`EVENT_DIMENSIONS`]), ingest's conversion, the rollup job ([`rolled_up`]) and the
//! metrics API all read this table, so a new dimension is one row here (plus its
//! derivation in core-ingest's `dimensions` module when it is derived).
//!
//! Besides these, the API knows `event:goal` (each goal named in the `goal` property) and
//! `event:props:<key>` (custom properties), which are not columns; both are rolled up.

/// Whose attribute a dimension is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Differs between the events of one visit (a page, an event name).
    Event,
    /// The visit's: taken from its first event (acquisition, geo, device). The `sessions`
    /// view has a column of the same name.
    Visit,
}

/// How `events` gets the column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Sent with the event (after the plugins): a column of the event itself.
    Sent,
    /// Derived at ingest from the processed event (core-ingest's `dimensions` module):
    /// one of the [`EVENT_DIMENSIONS`] columns at the end of `events`, in table order.
    Derived,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Dimension {
    /// Its name in the metrics API and in `breakdowns_hourly.dimension`.
    pub api: &'static str,
    /// The column of `events` (and of `sessions`, for visit dimensions).
    pub column: &'static str,
    pub scope: Scope,
    pub origin: Origin,
    /// Kept per hour in `breakdowns_hourly`.
    pub rolled_up: bool,
    /// The `sessions` view has a column of the same name (for an event dimension: the value
    /// of the visit's first event), so visit metrics can be broken down and filtered by it.
    pub in_sessions: bool,
}

const fn dim(
    api: &'static str,
    column: &'static str,
    scope: Scope,
    origin: Origin,
    rolled_up: bool,
) -> Dimension {
    Dimension {
        api,
        column,
        scope,
        origin,
        rolled_up,
        in_sessions: matches!(scope, Scope::Visit),
    }
}

impl Dimension {
    /// An event dimension that `sessions` carries too (the visit's first event's value).
    const fn also_per_visit(self) -> Self {
        Self {
            in_sessions: true,
            ..self
        }
    }
}

use Origin::{Derived, Sent};
use Scope::{Event, Visit};

/// Every breakdown dimension; the derived ones in the order of their `events` columns.
pub const DIMENSIONS: &[Dimension] = &[
    dim("event:hostname", "hostname", Event, Derived, true),
    dim("event:page", "path", Event, Derived, true),
    dim("visit:source", "source", Visit, Derived, true),
    dim("visit:medium", "medium", Visit, Derived, true),
    dim("visit:utm_source", "utm_source", Visit, Derived, true),
    dim("visit:utm_medium", "utm_medium", Visit, Derived, true),
    dim("visit:utm_campaign", "utm_campaign", Visit, Derived, true),
    dim("visit:country", "country", Visit, Derived, true),
    dim("visit:region", "region", Visit, Derived, true),
    dim("visit:city", "city", Visit, Derived, true),
    dim("visit:device", "device", Visit, Derived, true),
    dim("visit:browser", "browser", Visit, Derived, true),
    dim("visit:os", "os", Visit, Derived, true),
    dim("event:name", "name", Event, Sent, true),
    // Revenue is kept per currency; breaking down or filtering by it picks one.
    dim("event:currency", "currency", Event, Sent, false),
    // The pipeline version that produced the event (`v3`; none when no plugins ran): a
    // canary's figures beside the stable version's, from `events`. A canary splits by
    // visitor, so a visit's events share one version (but for visits that straddle the
    // canary's start or end): visit metrics split by the version of the visit's first event.
    dim(
        "event:pipeline_version",
        "pipeline_version",
        Event,
        Sent,
        false,
    )
    .also_per_visit(),
];

const DERIVED_COUNT: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < DIMENSIONS.len() {
        if matches!(DIMENSIONS[i].origin, Derived) {
            n += 1;
        }
        i += 1;
    }
    n
};

/// The derived dimension columns at the end of `events`, in order.
pub const EVENT_DIMENSIONS: [&str; DERIVED_COUNT] = {
    let mut out = [""; DERIVED_COUNT];
    let (mut i, mut n) = (0, 0);
    while i < DIMENSIONS.len() {
        if matches!(DIMENSIONS[i].origin, Derived) {
            out[n] = DIMENSIONS[i].column;
            n += 1;
        }
        i += 1;
    }
    out
};

/// The dimension the API calls `api`.
pub fn by_api(api: &str) -> Option<&'static Dimension> {
    DIMENSIONS.iter().find(|d| d.api == api)
}

/// The dimensions `breakdowns_hourly` carries.
pub fn rolled_up() -> impl Iterator<Item = &'static Dimension> {
    DIMENSIONS.iter().filter(|d| d.rolled_up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_scopes_match_the_api_prefix() {
        for (i, d) in DIMENSIONS.iter().enumerate() {
            assert!(DIMENSIONS[..i]
                .iter()
                .all(|o| o.api != d.api && o.column != d.column));
            let prefix = match d.scope {
                Scope::Event => "event:",
                Scope::Visit => "visit:",
            };
            assert!(d.api.starts_with(prefix), "{}", d.api);
        }
        assert_eq!(EVENT_DIMENSIONS.len(), 13);
        assert_eq!(EVENT_DIMENSIONS[0], "hostname");
        assert_eq!(EVENT_DIMENSIONS[12], "os");
    }
}

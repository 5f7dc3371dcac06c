//! Views for the common questions, so analysts need not re-derive them (every SQL session
//! gets them, beside the rollup views in [`crate::rollup::VIEWS`]).
//!
//! - `sessions`: one row per visit, from the pre-aggregated `visits` table ([`crate::visits`]),
//!   current up to the last rollup run. A visit is the events of one tracker session id (or,
//!   for trackers without one, one visitor id) with no gap over 30 minutes: a session id
//!   reused after 30 idle minutes starts a new visit, as in Google Analytics. Anonymous
//!   events without either are visits of their own. Entry and exit page (path), and the
//!   acquisition, geo and device columns and the pipeline version of the visit's first event.
//! - `daily_metrics`: per merchant and UTC day: events, pageviews and unique visitors from
//!   the hourly rollups (current up to the last rollup run, NULL for a day not rolled up yet;
//!   visitors are merged HLL sketches, a true distinct estimate), and visits, bounce rate
//!   (share of visits with at most one pageview), average visit duration and views per
//!   visit from `sessions`.

pub const VIEWS: &[&str] = &[
    // Visits are numbered per key in time order (`sa#1`, `sa#2`): a window over the key's
    // rows, which the optimizer drops when `session` is not read.
    "CREATE VIEW sessions AS \
     SELECT merchant_id, \
            visit_key || '#' || CAST(row_number() OVER (PARTITION BY merchant_id, visit_key \
                                                      ORDER BY started_at) AS VARCHAR) AS session, \
            visitor_id, started_at, ended_at, duration_ms, events, pageviews, \
            entry_url, exit_url, entry_page, exit_page, source, medium, \
            utm_source, utm_medium, utm_campaign, country, region, city, device, browser, os, \
            pipeline_version, bounce, revenue_micros \
     FROM visits",
    "CREATE VIEW daily_metrics AS \
     SELECT COALESCE(r.merchant_id, s.merchant_id) AS merchant_id, COALESCE(r.day, s.day) AS day, \
            r.events, r.pageviews, r.visitors, \
            COALESCE(s.visits, 0) AS visits, s.bounce_rate, s.avg_duration_s, s.views_per_visit \
     FROM ( \
         SELECT merchant_id, date_trunc('day', hour) AS day, \
                CAST(sum(events) AS BIGINT) AS events, \
                CAST(sum(pageviews) AS BIGINT) AS pageviews, \
                CAST(round(hll_estimate(hll_union(visitors_hll))) AS BIGINT) AS visitors \
         FROM rollups_hourly GROUP BY 1, 2) r \
     FULL OUTER JOIN ( \
         SELECT merchant_id, date_trunc('day', started_at) AS day, \
                count(*) AS visits, \
                avg(CASE WHEN bounce THEN 1.0 ELSE 0.0 END) AS bounce_rate, \
                avg(CAST(duration_ms AS DOUBLE)) / 1000.0 AS avg_duration_s, \
                avg(CAST(pageviews AS DOUBLE)) AS views_per_visit \
         FROM sessions GROUP BY 1, 2) s \
     ON r.merchant_id = s.merchant_id AND r.day = s.day",
];

//! Views for the common questions, so analysts need not re-derive them (every SQL session
//! gets them, beside the rollup views in [`crate::rollup::VIEWS`]).
//!
//! - `sessions`: one row per visit. A visit is the events of one tracker session id (or, for
//!   trackers without one, one visitor id) with no gap over 30 minutes: a session id reused
//!   after 30 idle minutes starts a new visit, as in Google Analytics. Anonymous events
//!   without either are visits of their own. Computed from `events`, so always current.
//!   Entry and exit page (path), and the acquisition, geo and device columns and the
//!   pipeline version of the visit's first event.
//! - `daily_metrics`: per merchant and UTC day: events, pageviews and unique visitors from
//!   the hourly rollups (current up to the last rollup run, NULL for a day not rolled up yet;
//!   visitors are merged HLL sketches, a true distinct estimate), and visits, bounce rate
//!   (share of visits with at most one pageview), average visit duration and views per
//!   visit from `sessions`.

pub const VIEWS: &[&str] = &[
    "CREATE VIEW sessions AS \
     WITH keyed AS ( \
         SELECT merchant_id, visitor_id, name, url, path, ts, revenue_micros, \
                source, medium, utm_source, utm_medium, utm_campaign, \
                country, region, city, device, browser, os, pipeline_version, \
                COALESCE(session_id, visitor_id, event_id) AS visit_key \
         FROM events), \
     gaps AS ( \
         SELECT *, CASE WHEN lag(ts) OVER (PARTITION BY merchant_id, visit_key ORDER BY ts) IS NULL \
                          OR ts - lag(ts) OVER (PARTITION BY merchant_id, visit_key ORDER BY ts) > INTERVAL '30 minutes' \
                        THEN 1 ELSE 0 END AS starts_visit \
         FROM keyed), \
     numbered AS ( \
         SELECT *, sum(starts_visit) OVER (PARTITION BY merchant_id, visit_key ORDER BY ts \
                                           ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS visit_no \
         FROM gaps) \
     SELECT merchant_id, \
            visit_key || '#' || CAST(visit_no AS VARCHAR) AS session, \
            min(visitor_id) AS visitor_id, \
            min(ts) AS started_at, \
            max(ts) AS ended_at, \
            (CAST(max(ts) AS BIGINT) - CAST(min(ts) AS BIGINT)) / 1000 AS duration_ms, \
            count(*) AS events, \
            CAST(sum(CASE WHEN name = 'pageview' THEN 1 ELSE 0 END) AS BIGINT) AS pageviews, \
            first_value(url ORDER BY ts) AS entry_url, \
            last_value(url ORDER BY ts) AS exit_url, \
            first_value(path ORDER BY ts) AS entry_page, \
            last_value(path ORDER BY ts) AS exit_page, \
            first_value(source ORDER BY ts) AS source, \
            first_value(medium ORDER BY ts) AS medium, \
            first_value(utm_source ORDER BY ts) AS utm_source, \
            first_value(utm_medium ORDER BY ts) AS utm_medium, \
            first_value(utm_campaign ORDER BY ts) AS utm_campaign, \
            first_value(country ORDER BY ts) AS country, \
            first_value(region ORDER BY ts) AS region, \
            first_value(city ORDER BY ts) AS city, \
            first_value(device ORDER BY ts) AS device, \
            first_value(browser ORDER BY ts) AS browser, \
            first_value(os ORDER BY ts) AS os, \
            first_value(pipeline_version ORDER BY ts) AS pipeline_version, \
            sum(CASE WHEN name = 'pageview' THEN 1 ELSE 0 END) <= 1 AS bounce, \
            CAST(sum(revenue_micros) AS BIGINT) AS revenue_micros \
     FROM numbered GROUP BY merchant_id, visit_key, visit_no",
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

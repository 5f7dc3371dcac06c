//! The SQL front end, structure-aware: the bytes pick tokens from a vocabulary rich in what
//! hurts parsers (`NOT (`, parentheses, `UNION ALL`, `OR` chains, unary minus, quotes and
//! comments). The limits must never panic, and whatever they admit must parse within a
//! bounded time without overflowing the stack.
#![no_main]
use libfuzzer_sys::fuzz_target;

const VOCAB: &[&str] = &["SELECT ", "1", " FROM t", " WHERE ", "NOT (", "(", ")", " UNION ALL SELECT 1", " OR ", " AND ", "-", "'x'", "\"c\"", " -- c\n", "/* c */", "a", ",", " CASE WHEN a THEN 1 END", " IN (", " EXISTS (SELECT ", "[", "]", "::int"];

fuzz_target!(|data: &[u8]| {
    let sql: String = data.iter().map(|b| VOCAB[*b as usize % VOCAB.len()]).collect();
    let limits = beacon_query::sql_limits::SqlLimits::default();
    if beacon_query::sql_limits::check(&sql, &limits).is_ok() {
        let started = std::time::Instant::now();
        let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
        let _ = datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, &sql);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "admitted SQL took {:?} to parse: {sql}", started.elapsed());
    }
    // Raw bytes too: the limits take any text.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = beacon_query::sql_limits::check(text, &limits);
    }
});

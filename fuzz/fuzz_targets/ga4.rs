//! GA4 Measurement Protocol bodies and gtag hits (query + body lines).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let q = "measurement_id=G-1&api_secret=s";
    let _ = beacon_collect::ga4::decode_mp(q, data, 1_795_673_360_000);
    let (query, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(query) = std::str::from_utf8(query) {
        let _ = beacon_collect::ga4::decode_gtag(query, body, 1_795_673_360_000);
    }
});

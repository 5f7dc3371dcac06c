//! Snowplow tp2 bodies and `/i` query strings.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beacon_collect::snowplow::decode_post(data, 1_795_673_360_000);
    if let Ok(q) = std::str::from_utf8(data) {
        let _ = beacon_collect::snowplow::decode_get(q, 1_795_673_360_000);
    }
});

//! Plausible `/api/event` bodies.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beacon_collect::plausible::decode(data, 1_795_673_360_000);
});

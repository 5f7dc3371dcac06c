//! What a batch plugin (contract 1.1) sends back: the host's changes decoder must refuse
//! anything malformed with an error, never panic or over-allocate; what it accepts must
//! iterate. Also the batch reader's header check (`Input::open`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Against a batch of 3 events, at most 64 output events (the host passes its limits).
    if let Ok(changes) = beacon_plugin_abi::Changes::parse(data, 3, 64) {
        for i in 0..3 {
            let _ = changes.uses(i);
        }
        for (_, edits) in changes.records() {
            for edit in edits {
                std::hint::black_box(edit);
            }
        }
    }
    let _ = beacon_plugin_abi::Input::open(data);
});

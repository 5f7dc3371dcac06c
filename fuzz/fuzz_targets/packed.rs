//! Packed buffers from outside the process: a client's batch (`wire::decode_batch`) and an
//! envelope read from the bus (`Envelope::decode`). Anything malformed must be an error,
//! never a panic, and what validates must read without one within the allocation bound.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beacon_proto::wire::decode_batch(data);
    let _ = beacon_proto::Envelope::decode(data);
    if let Ok(input) = beacon_plugin_abi::Input::open(data) {
        if input.validate(data.len() as u64).is_ok() {
            for i in 0..input.len() {
                for f in beacon_plugin_abi::Str::ALL {
                    std::hint::black_box(input.str(i, f));
                }
                std::hint::black_box(input.properties(i).count());
                std::hint::black_box(input.property(i, "k"));
            }
        }
    }
});

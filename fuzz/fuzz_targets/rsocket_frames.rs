//! Arbitrary bytes on the RSocket-over-QUIC stream: the frame reader must return frames or
//! an error, never panic, whatever the split into chunks.
#![no_main]
use beacon_proto::wire::FrameReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut reader = FrameReader::new(64 * 1024);
    for chunk in data.chunks(split) {
        reader.extend(chunk);
        loop {
            match reader.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

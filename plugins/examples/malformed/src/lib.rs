//! Test fixture: a batch plugin (world `batch-processor`) whose answer is its config, hex
//! decoded: the host's tests send valid, truncated, corrupted and random changes buffers
//! through a real component. Config `trap` traps instead.

#[cfg(target_arch = "wasm32")]
mod export {
    use beacon_plugin_sdk::batch_bindings::{Guest, PluginError};

    struct Malformed;

    fn unhex(s: &str) -> Option<Vec<u8>> {
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        s.as_bytes()
            .chunks(2)
            .map(|p| match p {
                [h, l] => Some(digit(*h)? << 4 | digit(*l)?),
                _ => None,
            })
            .collect()
    }

    impl Guest for Malformed {
        fn process_batch(config: String, _batch: Vec<u8>) -> Result<Vec<u8>, PluginError> {
            if config == "trap" {
                panic!("trapping on purpose");
            }
            unhex(config.trim()).ok_or_else(|| PluginError {
                message: "config is not hex".into(),
            })
        }
    }

    beacon_plugin_sdk::batch_bindings::export_batch_processor!(Malformed with_types_in beacon_plugin_sdk::batch_bindings);
}

//! Nothing here: see `tests/chain.rs`, which links every example plugin natively into one
//! binary. That only links because `beacon_plugin_sdk::export_batch_plugin!` emits the
//! component export (`process-batch`, `cabi_post_process-batch`) for `wasm32` only.

//! Nothing here: see `tests/chain.rs`, which links every example plugin natively into one
//! binary. That only links because `beacon_plugin_sdk::export_plugin!` emits the component
//! export (`process`, `cabi_post_process`) for `wasm32` only.

//! Test fixture: reads a file (the path in its config, default `/etc/hostname`) into a
//! property. Beacon must refuse this component at load (it imports `wasi:filesystem`).

use beacon_plugin_sdk::{Event, EventExt, PluginError};

pub fn process(config: &str, mut batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
    let path = match config.trim() {
        "" => "/etc/hostname",
        p => p,
    };
    let contents = std::fs::read_to_string(path)
        .map_err(|e| PluginError::new(format!("reading {path}: {e}")))?;
    for event in &mut batch {
        event.set_property("file", contents.trim());
    }
    Ok(batch)
}

beacon_plugin_sdk::export_plugin!(process);

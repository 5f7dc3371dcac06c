//! Test fixture: shuffles the batch through a std `HashMap`, whose default hasher is seeded
//! from `wasi:random`. Output order would differ run to run, so Beacon must refuse this
//! component at load (it imports `wasi:random`).

use std::collections::HashMap;

use beacon_plugin_sdk::{Event, PluginError};

pub fn process(_config: &str, batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
    let mut by_id: HashMap<String, Event> = HashMap::new();
    for event in batch {
        by_id.insert(event.event_id.clone(), event);
    }
    Ok(by_id.into_values().collect())
}

beacon_plugin_sdk::export_plugin!(process);

//! Test fixture: a record plugin (world `processor`) built against `beacon:plugin@1.0.0`,
//! from a frozen copy of that contract (`wit/plugin.wit`, as released). Sets property
//! `contract` = `1.0` on every event, after checking it can read what the host sent.

wit_bindgen::generate!({ path: "wit", world: "processor" });

struct Record10;

impl Guest for Record10 {
    fn process(_config: String, mut batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        for e in &mut batch {
            if e.event_id.is_empty() {
                return Err(PluginError {
                    message: "an event without an id".into(),
                });
            }
            e.properties.retain(|(k, _)| k != "contract");
            e.properties.push(("contract".into(), "1.0".into()));
        }
        Ok(batch)
    }
}

export!(Record10);

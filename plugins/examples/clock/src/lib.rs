//! Test fixture: stamps events with the wall clock. Reading a clock makes processing
//! non-deterministic, so Beacon must refuse this component (it imports `wasi:clocks`).

wit_bindgen::generate!({ path: "../../../wit", world: "processor" });

struct Clock;

impl Guest for Clock {
    fn process(_config: String, mut batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        for e in &mut batch {
            e.properties.push(("processed_at".into(), now.to_string()));
        }
        Ok(batch)
    }
}

export!(Clock);

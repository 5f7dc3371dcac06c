//! A deliberately hostile plugin for sandbox tests. Its config string picks the misdeed:
//! `loop` (never returns), `alloc` (tries to allocate 1 GiB), `trap` (panics -> trap),
//! `error` (returns a plugin error), `steal` (rewrites merchant ids), `flood` (100x output),
//! anything else passes the batch through unchanged.

wit_bindgen::generate!({ path: "../../../wit", world: "processor" });

struct Hostile;

impl Guest for Hostile {
    fn process(config: String, batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        match config.trim() {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let v: Vec<u8> = vec![1u8; 1 << 30];
                let n = std::hint::black_box(&v).len();
                Err(PluginError {
                    message: format!("allocated {n} bytes"),
                })
            }
            "trap" => panic!("hostile plugin panics on purpose"),
            "error" => Err(PluginError {
                message: "refused on purpose".into(),
            }),
            // Tries to move events into another merchant's data.
            "steal" => Ok(batch
                .into_iter()
                .map(|mut e| {
                    e.merchant_id = "m_victim".into();
                    e
                })
                .collect()),
            // Produces events the edge must refuse (empty ids).
            "blank" => Ok(batch
                .into_iter()
                .map(|mut e| {
                    e.event_id.clear();
                    e
                })
                .collect()),
            // Multiplies every event a hundredfold.
            "flood" => Ok(batch
                .iter()
                .flat_map(|e| std::iter::repeat_n(e.clone(), 100))
                .collect()),
            _ => Ok(batch),
        }
    }
}

export!(Hostile);

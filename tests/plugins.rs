//! The plugin sandbox on real components built from `plugins/examples`.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use beacon_plugins::{Chain, PluginError, Runtime, SandboxLimits};
use beacon_proto::{Event, PipelineRef, PluginRef};
use common::plugin_path;

fn load(runtime: &Runtime, name: &str) -> Result<Arc<beacon_plugins::Plugin>, PluginError> {
    let bytes = std::fs::read(plugin_path(name)).expect("component");
    runtime.load(&Runtime::sha256(&bytes), &bytes)
}

fn sample(n: usize) -> Vec<Event> {
    let mut events = beacon::demo::generate(3, "det.example", n, 1_790_000_000_000, 3_600_000, 100);
    for e in &mut events {
        e.merchant_id = "m_det".into();
    }
    events
}

/// The example plugins with a config that makes each do real work on the demo traffic.
const EXAMPLES: &[(&str, &str)] = &[
    ("beacon_plugin_utm", r#"{"strip_from_url": true}"#),
    ("beacon_plugin_pii", ""),
    ("beacon_plugin_botfilter", r#"{"action": "flag"}"#),
    (
        "beacon_plugin_currency",
        r#"{"base": "USD", "rates": {"EUR": 1.08, "GBP": 1.27}, "on_unknown": "flag"}"#,
    ),
    (
        "beacon_plugin_goals",
        r#"{"goals": [{"name": "any-page", "path_prefix": "/"}, {"name": "buy", "event": "purchase"}]}"#,
    ),
];

#[test]
fn every_example_plugin_is_byte_identical_across_threads_and_instances() {
    let mut events = sample(2000);
    // Give the scrubbers and filters something to find.
    for (i, e) in events.iter_mut().enumerate().step_by(7) {
        e.properties
            .insert("note".into(), format!("mail me at user{i}@example.com"));
        e.properties.insert(
            "user_agent".into(),
            "Mozilla/5.0 (compatible; Googlebot/2.1)".into(),
        );
    }
    let events = Arc::new(events);
    for (name, config) in EXAMPLES {
        let runs: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                let events = events.clone();
                std::thread::spawn(move || {
                    // A separate runtime (engine, compilation) and instance per thread.
                    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
                    let plugin = load(&runtime, name).expect("load");
                    let out = plugin.process(config, &events).expect("process");
                    serde_json::to_vec(&out).expect("json")
                })
            })
            .map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(runs[0], runs[1], "{name}: output must be byte-identical");
        let out: Vec<Event> = serde_json::from_slice(&runs[0]).expect("json");
        assert!(out != *events, "{name} did no work on the sample");
    }
}

#[test]
fn example_plugins_do_their_jobs() {
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    let mut e = sample(1).remove(0);
    e.url = Some("https://s.example/thanks?utm_source=News&email=jo%40example.com".into());
    e.name = "purchase".into();
    e.revenue_micros = Some(10_000_000);
    e.currency = Some("USD".into());
    e.properties.insert(
        "user_agent".into(),
        "Googlebot/2.1 (+http://www.google.com/bot.html)".into(),
    );
    let run = |name: &str, config: &str, e: &Event| {
        load(&runtime, name)
            .expect("load")
            .process(config, std::slice::from_ref(e))
            .expect("process")
    };
    let utm = run("beacon_plugin_utm", "", &e);
    assert_eq!(
        utm[0].properties.get("utm_source").map(String::as_str),
        Some("news")
    );
    let pii = run("beacon_plugin_pii", "", &e);
    assert!(
        !pii[0].url.as_deref().unwrap_or("").contains("example.com"),
        "{:?}",
        pii[0].url
    );
    assert!(
        run("beacon_plugin_botfilter", "", &e).is_empty(),
        "bots dropped by default"
    );
    let eur = run(
        "beacon_plugin_currency",
        r#"{"base": "EUR", "rates": {"USD": 0.9}}"#,
        &e,
    );
    assert_eq!(eur[0].currency.as_deref(), Some("EUR"));
    assert_eq!(eur[0].revenue_micros, Some(9_000_000));
    let goals = run(
        "beacon_plugin_goals",
        r#"{"goals": [{"name": "buy", "event": "purchase"}]}"#,
        &e,
    );
    assert_eq!(
        goals[0].properties.get("goal").map(String::as_str),
        Some("buy")
    );
}

#[test]
fn every_forbidden_capability_and_a_foreign_world_are_refused_by_name() {
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    for (fixture, must_name) in [
        ("beacon_plugin_clock", "wasi:clocks/"),
        ("beacon_plugin_random", "wasi:random/"),
        ("beacon_plugin_fs", "wasi:filesystem/"),
        ("beacon_plugin_net", "wasi:sockets/"),
    ] {
        match load(&runtime, fixture) {
            Err(e @ PluginError::ForbiddenImport(_)) => {
                let msg = e.to_string();
                assert!(msg.contains(must_name), "{fixture}: {msg}")
            }
            Err(other) => panic!("{fixture}: expected ForbiddenImport, got {other}"),
            Ok(_) => panic!("{fixture} must be refused"),
        }
    }
    match load(&runtime, "beacon_plugin_otherworld") {
        Err(PluginError::Invalid(msg)) => {
            assert!(msg.contains("beacon:plugin/processor"), "{msg}")
        }
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(_) => panic!("a component for another world must be refused"),
    }
}

#[test]
fn stack_overflow_huge_output_and_huge_allocation_are_stopped() {
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    let plugin = load(&runtime, "beacon_plugin_hostile").expect("load");
    let events = sample(10);
    assert!(
        matches!(
            plugin.process("stack", &events),
            Err(PluginError::Trap { .. })
        ),
        "stack overflow traps"
    );
    // ~100 MB of output built from aliased strings: stopped while being copied out.
    match plugin.process("bigout", &events) {
        Err(PluginError::OutputCopyCapped { cap }) => assert!(cap < 2 << 20, "{cap}"),
        other => panic!("expected OutputCopyCapped, got {other:?}"),
    }
    // ~100 MB really allocated: the memory cap stops it first.
    assert!(matches!(
        plugin.process("bigout-alloc", &events),
        Err(PluginError::MemoryLimit { .. })
    ));
    assert_eq!(
        plugin.process("pass", &events).expect("still fine").len(),
        10
    );
}

#[test]
fn forbidden_imports_are_refused_with_their_name() {
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    match load(&runtime, "beacon_plugin_clock") {
        Err(PluginError::ForbiddenImport(name)) => {
            assert!(name.starts_with("wasi:clocks/"), "{name}")
        }
        Err(other) => panic!("expected ForbiddenImport, got {other}"),
        Ok(_) => panic!("a plugin reading the clock must be refused"),
    }
}

#[test]
fn not_a_component_and_wrong_hash_are_refused() {
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    let junk = b"\0asm not really".to_vec();
    assert!(matches!(
        runtime.load(&Runtime::sha256(&junk), &junk),
        Err(PluginError::Invalid(_))
    ));
    let bytes = std::fs::read(plugin_path("beacon_plugin_utm")).expect("component");
    assert!(matches!(
        runtime.load(&"0".repeat(64), &bytes),
        Err(PluginError::HashMismatch { .. })
    ));
    let small = SandboxLimits {
        max_component_bytes: 1000,
        ..SandboxLimits::default()
    };
    let runtime = Runtime::new(small, None).expect("runtime");
    assert!(matches!(
        runtime.load(&Runtime::sha256(&bytes), &bytes),
        Err(PluginError::TooLarge { .. })
    ));
}

#[test]
fn loops_allocations_and_traps_are_stopped_and_the_plugin_keeps_working() {
    let limits = SandboxLimits {
        fuel: 200_000_000,
        ..SandboxLimits::default()
    };
    let runtime = Runtime::new(limits, None).expect("runtime");
    let plugin = load(&runtime, "beacon_plugin_hostile").expect("load");
    let events = sample(10);
    assert!(matches!(
        plugin.process("loop", &events),
        Err(PluginError::OutOfFuel { .. })
    ));
    assert!(matches!(
        plugin.process("alloc", &events),
        Err(PluginError::MemoryLimit { .. })
    ));
    match plugin.process("trap", &events) {
        // The plugin's panic message (its stderr) is part of the reason.
        Err(e @ PluginError::Trap { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("wasm trap") && msg.contains("panics on purpose"),
                "{msg}"
            )
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(
        matches!(plugin.process("error", &events), Err(PluginError::Guest(m)) if m == "refused on purpose")
    );
    // After every failure the next batch runs in a fresh instance and works.
    assert_eq!(
        plugin.process("pass", &events).expect("pass").len(),
        events.len()
    );
}

#[test]
fn wall_clock_deadline_backs_up_fuel() {
    let limits = SandboxLimits {
        fuel: u64::MAX / 2,
        timeout: std::time::Duration::from_millis(200),
        ..SandboxLimits::default()
    };
    let runtime = Runtime::new(limits, None).expect("runtime");
    let plugin = load(&runtime, "beacon_plugin_hostile").expect("load");
    assert!(matches!(
        plugin.process("loop", &sample(1)),
        Err(PluginError::Timeout(_))
    ));
}

#[test]
fn compiled_code_is_cached_on_disk_by_content_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(plugin_path("beacon_plugin_utm")).expect("component");
    let sha = Runtime::sha256(&bytes);
    {
        let runtime =
            Runtime::new(SandboxLimits::default(), Some(dir.path().into())).expect("runtime");
        runtime.load(&sha, &bytes).expect("compile");
    }
    let cached: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .collect();
    assert_eq!(cached.len(), 1);
    assert!(cached[0].file_name().to_string_lossy().starts_with(&sha));
    // A new runtime (as after a restart) loads the cached code and it runs.
    let runtime = Runtime::new(SandboxLimits::default(), Some(dir.path().into())).expect("runtime");
    let plugin = runtime.load(&sha, &bytes).expect("from cache");
    assert_eq!(plugin.process("", &sample(5)).expect("run").len(), 5);
}

#[test]
fn a_chain_cannot_move_events_to_another_merchant_or_flood() {
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    let utm = load(&runtime, "beacon_plugin_utm").expect("load");
    let hostile = load(&runtime, "beacon_plugin_hostile").expect("load");
    let step = |p: &Arc<beacon_plugins::Plugin>, config: &str| {
        (
            PluginRef {
                name: "p".into(),
                sha256: p.sha256().into(),
                config: config.into(),
            },
            p.clone(),
        )
    };
    let chain = |steps: Vec<(PluginRef, Arc<beacon_plugins::Plugin>)>| {
        let refs = steps.iter().map(|s| s.0.clone()).collect();
        Chain::new(
            PipelineRef {
                merchant_id: "m_det".into(),
                version: 1,
                plugins: refs,
            },
            steps,
        )
    };
    let out = chain(vec![
        step(&utm, ""),
        step(&hostile, "steal"),
        step(&utm, r#"{"property_prefix":"c_"}"#),
    ])
    .run(&sample(50))
    .expect("chain");
    assert_eq!(out.len(), 50);
    assert!(
        out.iter().all(|e| e.merchant_id == "m_det"),
        "merchant ids restored"
    );
    assert!(out
        .iter()
        .any(|e| e.properties.contains_key("c_source") && e.properties.contains_key("utm_source")));

    let failure = chain(vec![step(&hostile, "flood")])
        .run(&sample(50))
        .expect_err("flood is capped");
    assert!(
        matches!(
            failure.error,
            // Refused while being copied out (the batch's copy budget) or by the count cap.
            PluginError::OutputTooLarge { what: "events", .. }
                | PluginError::OutputCopyCapped { .. }
        ),
        "{:?}",
        failure.error
    );
    assert!(failure.plugin.starts_with("p@"));
}

#[test]
fn beacon_plugin_test_runs_a_component_over_jsonl_locally() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sample = dir.path().join("sample.jsonl");
    std::fs::write(
        &sample,
        "{\"event_id\":\"e1\",\"name\":\"pageview\",\"ts\":1790000000000,\"url\":\"https://s.example/?utm_source=News\"}\n\n\
         {\"event_id\":\"e2\",\"name\":\"signup\",\"ts\":1790000000001}\n",
    )
    .expect("write");
    let out = std::process::Command::new(common::beacon_bin())
        .args(["plugin", "test"])
        .arg(plugin_path("beacon_plugin_utm"))
        .arg("--events")
        .arg(&sample)
        .args(["--plugin-config", r#"{"strip_from_url": true}"#])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Event> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("event json"))
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0].properties.get("utm_source").map(String::as_str),
        Some("news")
    );
    assert_eq!(events[0].url.as_deref(), Some("https://s.example/"));

    let refused = std::process::Command::new(common::beacon_bin())
        .args(["plugin", "test"])
        .arg(plugin_path("beacon_plugin_clock"))
        .arg("--events")
        .arg(&sample)
        .output()
        .expect("run");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("wasi:clocks"));
}

/// The native build of each example plugin (linked into this test binary) and its component
/// give the same output on the same batch: the sandbox and the packed transport change
/// nothing.
#[test]
fn components_match_the_same_plugins_linked_natively() {
    use beacon_plugin_sdk::batch::{run, BatchFn};
    let mut events = sample(1500);
    for (i, e) in events.iter_mut().enumerate().step_by(5) {
        e.properties
            .insert("contact".into(), format!("write to user{i}@example.com"));
        e.url = e.url.take().map(|u| format!("{u}?utm_source=News{i}&x=1"));
    }
    for e in events.iter_mut().step_by(7) {
        e.properties.insert(
            "user_agent".into(),
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)".into(),
        );
    }
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    // Every example, with the configuration that makes it do real work on demo traffic.
    let natives: [(&str, BatchFn); 5] = [
        ("beacon_plugin_utm", beacon_plugin_utm::process),
        ("beacon_plugin_pii", beacon_plugin_pii::process),
        ("beacon_plugin_botfilter", beacon_plugin_botfilter::process),
        ("beacon_plugin_currency", beacon_plugin_currency::process),
        ("beacon_plugin_goals", beacon_plugin_goals::process),
    ];
    assert_eq!(natives.len(), EXAMPLES.len());
    for (name, native) in natives {
        let config = EXAMPLES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
            .expect("an example's configuration");
        let plugin = load(&runtime, name).expect("load");
        assert!(plugin.is_batch(), "{name} is a batch plugin");
        assert_eq!(plugin.contract(), "1.1.0");
        let wasm = plugin.process(config, &events).expect("component");
        let guest: Vec<_> = events.iter().map(common::guest::to_guest).collect();
        let native: Vec<Event> = run(native, config, guest)
            .expect("native")
            .into_iter()
            .map(common::guest::from_guest)
            .collect();
        assert_eq!(wasm, native, "{name}: component and native outputs differ");
        assert!(wasm != events, "{name} did no work on the sample");
    }
}

/// A component built against contract 1.0 (records) still loads and runs on this 1.1 host,
/// also between batch plugins in one chain, and the chain's output is what the plugins
/// would give one by one.
#[test]
fn a_contract_1_0_component_runs_beside_batch_plugins() {
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    let old = load(&runtime, "beacon_plugin_record10").expect("a 1.0 component loads");
    assert_eq!(old.contract(), "1.0.0");
    assert!(!old.is_batch());
    let events = sample(300);
    let tagged = old.process("", &events).expect("1.0 component runs");
    assert_eq!(tagged.len(), events.len());
    assert!(tagged
        .iter()
        .all(|e| e.properties.get("contract").map(String::as_str) == Some("1.0")));

    let steps = [
        ("beacon_plugin_utm", r#"{"strip_from_url": true}"#),
        ("beacon_plugin_record10", ""),
        (
            "beacon_plugin_goals",
            r#"{"goals": [{"name": "any", "path_prefix": "/"}]}"#,
        ),
        ("beacon_plugin_record10", ""),
        ("beacon_plugin_pii", ""),
    ];
    let plugins: Vec<(PluginRef, Arc<beacon_plugins::Plugin>)> = steps
        .iter()
        .map(|(name, config)| {
            let bytes = std::fs::read(plugin_path(name)).expect("component");
            let sha256 = Runtime::sha256(&bytes);
            let plugin = runtime.load(&sha256, &bytes).expect("load");
            let r = PluginRef {
                name: name.to_string(),
                sha256,
                config: config.to_string(),
            };
            (r, plugin)
        })
        .collect();
    let chain = Chain::new(
        PipelineRef {
            merchant_id: "m_det".into(),
            version: 1,
            plugins: plugins.iter().map(|p| p.0.clone()).collect(),
        },
        plugins.clone(),
    );
    let mut one_by_one = events.clone();
    for (r, plugin) in &plugins {
        one_by_one = plugin.process(&r.config, &one_by_one).expect("step");
    }
    let chained = chain.run(&events).expect("chain");
    assert_eq!(chained, one_by_one);
    assert!(chained
        .iter()
        .all(|e| e.properties.get("contract").map(String::as_str) == Some("1.0")));
    let page_views = events
        .iter()
        .filter(|e| e.name == "pageview" && e.url.is_some())
        .count();
    let goals = chained
        .iter()
        .filter(|e| e.properties.get("goal").map(String::as_str) == Some("any"))
        .count();
    assert!(page_views > 0);
    assert_eq!(goals, page_views);
}

/// Many small properties cost the host far more memory than their bytes in the changes
/// buffer (two `String`s and a map entry each): the output cap charges for that, and stops
/// a record while its edits are applied, so a small buffer cannot make a huge output.
#[test]
fn many_tiny_properties_count_against_the_output_cap() {
    use beacon_plugin_abi::{Edit, Origin, Writer};
    let limits = SandboxLimits {
        max_output_bytes: 64 << 10,
        ..SandboxLimits::default()
    };
    let runtime = Runtime::new(limits, None).expect("runtime");
    let plugin = load(&runtime, "beacon_plugin_malformed").expect("load");
    let events = sample(3);
    let keys: Vec<String> = (0..2_000).map(|i| format!("k{i}")).collect();
    let changes = |n: usize| {
        let mut w = Writer::new();
        w.record(Origin::Input(0));
        for k in &keys[..n] {
            w.edit(Edit::SetProperty(k, ""));
        }
        w.finish()
    };
    // 2,000 properties in about 20 KiB of changes: under the 64 KiB cap as bytes, over it
    // as what the host builds from them.
    let big = changes(2_000);
    assert!(big.len() < 32 << 10, "{}", big.len());
    match plugin.process(&hex::encode(&big), &events) {
        Err(PluginError::OutputTooLarge { what: "bytes", .. }) => {}
        other => panic!("expected OutputTooLarge, got {other:?}"),
    }
    // A few hundred still pass.
    let out = plugin
        .process(&hex::encode(changes(200)), &events)
        .expect("200 properties");
    assert!(out[0].properties.len() >= 200);
}

/// Whatever changes buffer a batch plugin returns, the host either applies it or fails that
/// batch with `InvalidOutput`: never a panic, never a partial output, and the plugin keeps
/// working. Fed through a real component (the `malformed` fixture returns its config,
/// hex-decoded): named cases first, then a few hundred random corruptions.
#[test]
fn malformed_changes_from_a_component_fail_only_its_batch() {
    use beacon_plugin_abi::{Edit, Origin, Str, Writer};
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");
    let plugin = load(&runtime, "beacon_plugin_malformed").expect("load");
    assert!(plugin.is_batch());
    let events = sample(3);

    // A valid answer: the second event with a new URL, then a new event.
    let valid = {
        let mut w = Writer::new();
        w.record(Origin::Input(1));
        w.edit(Edit::SetStr(Str::Url, "/changed"));
        w.record(Origin::New);
        w.edit(Edit::SetStr(Str::EventId, "new-1"));
        w.edit(Edit::SetStr(Str::Name, "split"));
        w.finish()
    };
    let out = plugin
        .process(&hex::encode(&valid), &events)
        .expect("valid changes");
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].event_id, events[1].event_id);
    assert_eq!(out[0].url.as_deref(), Some("/changed"));
    assert_eq!(out[0].properties, events[1].properties);
    assert_eq!(
        (out[1].event_id.as_str(), out[1].name.as_str()),
        ("new-1", "split")
    );

    let invalid = |bytes: &[u8], needle: &str| match plugin.process(&hex::encode(bytes), &events) {
        Err(PluginError::InvalidOutput(m)) => assert!(m.contains(needle), "{needle}: {m}"),
        other => panic!("{needle}: expected InvalidOutput, got {other:?}"),
    };
    invalid(b"", "magic");
    invalid(&valid[..valid.len() - 1], "changes end inside");
    let mut v = valid.clone();
    v[13] = 3; // input index 3 of a batch of 3
    invalid(&v, "input event 3 does not exist");
    // Too many output events is a resource breach, as for record plugins (it counts towards
    // quarantine), checked before anything is allocated for them.
    let too_many = |bytes: &[u8]| match plugin.process(&hex::encode(bytes), &events) {
        Err(PluginError::OutputTooLarge { what: "events", .. }) => {}
        other => panic!("expected OutputTooLarge, got {other:?}"),
    };
    let mut v = valid.clone();
    v[8] = 0xff; // a record count far past the output limit
    too_many(&v);
    let mut v = valid.clone();
    v[24] = 0xff; // inside "/changed" (header 12, record 5, op 2, length 4)
    invalid(&v, "not UTF-8");
    let mut v = valid.clone();
    v.extend_from_slice(&[0, 0]);
    invalid(&v, "bytes after the last record");
    // Copying one event more than the output limit allows is refused before it is copied.
    let mut w = Writer::new();
    for _ in 0..SandboxLimits::default().max_output_events(3) + 1 {
        w.record(Origin::Input(0));
    }
    too_many(&w.finish());
    assert!(matches!(
        plugin.process("trap", &events),
        Err(PluginError::Trap { .. })
    ));

    // Random corruptions of the valid answer: each applied whole or refused whole.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut applied, mut refused) = (0, 0);
    for _ in 0..300 {
        let mut v = valid.clone();
        for _ in 0..1 + next() % 3 {
            let i = (next() % v.len() as u64) as usize;
            match next() % 3 {
                0 => v[i] ^= 1 << (next() % 8),
                1 => v[i] = [0, 1, 2, 0xff][(next() % 4) as usize],
                _ => v.truncate(i),
            }
            if v.is_empty() {
                break;
            }
        }
        match plugin.process(&hex::encode(&v), &events) {
            Ok(out) => {
                applied += 1;
                assert!(out.len() <= SandboxLimits::default().max_output_events(3));
            }
            Err(PluginError::InvalidOutput(_) | PluginError::OutputTooLarge { .. }) => refused += 1,
            Err(other) => panic!("a corrupted answer gave {other:?}"),
        }
    }
    assert!(
        applied > 0 && refused > 0,
        "{applied} applied, {refused} refused"
    );
    assert_eq!(
        plugin
            .process(&hex::encode(&valid), &events)
            .expect("still works")
            .len(),
        2
    );
}

/// Instances come from a fixed pool; more calls at once than it has slots wait for one
/// instead of failing, and every one of them gives the same answer.
#[test]
fn more_concurrent_calls_than_pool_slots_wait_their_turn() {
    let limits = SandboxLimits {
        concurrent_calls: 2,
        ..SandboxLimits::default()
    };
    let runtime = Runtime::new(limits, None).expect("runtime");
    let plugin = load(&runtime, "beacon_plugin_utm").expect("load");
    let events = Arc::new(sample(1000));
    let expected = plugin.process("", &events).expect("one call");
    let expected = &expected;
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (plugin, events) = (plugin.clone(), events.clone());
            s.spawn(move || {
                for _ in 0..20 {
                    let out = plugin.process("", &events).expect("pooled call");
                    assert_eq!(out, *expected);
                }
            });
        }
    });
}

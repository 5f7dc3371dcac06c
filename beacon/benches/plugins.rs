//! Plugin cost: a chain of three example plugins (utm -> pii -> goals) run as sandboxed Wasm
//! components, against the same plugin code compiled natively into this process, in the same
//! run; plus compile, cache-load and per-call instantiation times. Prints a Markdown report.
//!
//!     cargo bench -p beacon --bench plugins                 # 100,000 events
//!     BEACON_BENCH_EVENTS=300000 cargo bench -p beacon --bench plugins

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_plugin_sdk::batch::{run, BatchFn};
use beacon_plugins::{Chain, Plugin, Runtime, SandboxLimits};
use beacon_proto::{Event, PipelineRef, PluginRef};
use common::guest::{from_guest, to_guest};

const CHAIN: [(&str, &str, BatchFn); 3] = [
    (
        "beacon_plugin_utm",
        r#"{"strip_from_url": true}"#,
        beacon_plugin_utm::process,
    ),
    ("beacon_plugin_pii", "", beacon_plugin_pii::process),
    (
        "beacon_plugin_goals",
        r#"{"goals": [{"name": "checkout", "path": "/checkout"}, {"name": "buy", "event": "purchase", "min_revenue_micros": 50000000}]}"#,
        beacon_plugin_goals::process,
    ),
];
const BATCH: usize = 500;
const ROUNDS: usize = 3;

/// The native baseline: the same plugin functions called in-process, through the same packed
/// encoding the sandbox uses (batch buffer in, changes applied), with the host event <-> SDK
/// event conversions at either end.
fn native_chain(steps: &[(&str, &str, BatchFn)], batch: &[Event]) -> Vec<Event> {
    let mut b: Vec<_> = batch.iter().map(to_guest).collect();
    for (_, config, f) in steps {
        b = run(*f, config, b).expect("native plugin");
    }
    b.into_iter().map(from_guest).collect()
}

fn wasm_chain(runtime: &Runtime, steps: &[(&str, &str, BatchFn)]) -> Chain {
    let plugins: Vec<(PluginRef, Arc<Plugin>)> = steps
        .iter()
        .map(|(name, config, _)| {
            let bytes = std::fs::read(common::plugin_path(name)).expect("component");
            let sha = Runtime::sha256(&bytes);
            let p = runtime.load(&sha, &bytes).expect("load");
            (
                PluginRef {
                    name: name.to_string(),
                    sha256: sha,
                    config: config.to_string(),
                },
                p,
            )
        })
        .collect();
    let refs = plugins.iter().map(|p| p.0.clone()).collect();
    Chain::new(
        PipelineRef {
            merchant_id: "m_bench".into(),
            version: 1,
            plugins: refs,
        },
        plugins,
    )
}

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn best(runs: &[Duration]) -> Duration {
    runs.iter().copied().min().unwrap_or_default()
}

fn main() {
    let n: usize = std::env::var("BEACON_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let now = beacon_edge::now_ms();
    let mut events =
        beacon::demo::generate(5, "bench.example", n, now - 3_600_000, 3_600_000, 20_000);
    for (i, e) in events.iter_mut().enumerate() {
        e.merchant_id = "m_bench".into();
        if i % 10 == 0 {
            e.properties
                .insert("contact".into(), format!("write to user{i}@example.com"));
        }
    }
    let batches: Vec<&[Event]> = events.chunks(BATCH).collect();
    let runtime = Runtime::new(SandboxLimits::default(), None).expect("runtime");

    println!("\n## Plugin benchmark ({n} events, batches of {BATCH}, best of {ROUNDS} interleaved rounds)\n");
    println!("| chain | native events/s | Wasm events/s | Wasm / native time |");
    println!("|---|---:|---:|---:|");
    let mut rows = Vec::new();
    for upto in [1, 3] {
        let steps = &CHAIN[..upto];
        let chain = wasm_chain(&runtime, steps);
        // Same output both ways: the benchmark compares equal work.
        let a = native_chain(steps, batches[0]);
        let b = chain.run(batches[0]).expect("wasm chain");
        assert_eq!(a, b, "native and Wasm outputs differ");
        let (mut native, mut wasm) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            native.push(time(|| {
                for b in &batches {
                    std::hint::black_box(native_chain(steps, b));
                }
            }));
            wasm.push(time(|| {
                for b in &batches {
                    std::hint::black_box(chain.run(b).expect("wasm"));
                }
            }));
        }
        let (nt, wt) = (best(&native), best(&wasm));
        let names: Vec<&str> = steps
            .iter()
            .map(|s| &s.0["beacon_plugin_".len()..])
            .collect();
        println!(
            "| {} | {:.0} | {:.0} | {:.2}x |",
            names.join(" -> "),
            n as f64 / nt.as_secs_f64(),
            n as f64 / wt.as_secs_f64(),
            wt.as_secs_f64() / nt.as_secs_f64()
        );
        rows.push((upto, nt, wt));
    }

    // Where the Wasm time goes: an identity plugin is the sandbox boundary alone. The record
    // transport (contract 1.0: the `hostile` fixture passing the batch back) against the
    // packed one (1.1: `goals` with no goals keeps every event unchanged), same run.
    let component = |name: &str| {
        let bytes = std::fs::read(common::plugin_path(name)).expect("component");
        runtime
            .load(&Runtime::sha256(&bytes), &bytes)
            .expect("load")
    };
    let per_event = |plugin: &Plugin, config: &str| {
        let t = best(
            &(0..ROUNDS)
                .map(|_| {
                    time(|| {
                        for b in &batches {
                            let _ = std::hint::black_box(plugin.process(config, b));
                        }
                    })
                })
                .collect::<Vec<_>>(),
        );
        t.as_secs_f64() * 1e6 / n as f64
    };
    let records = component("beacon_plugin_hostile");
    let packed = component("beacon_plugin_goals");
    // The identities must succeed, or the bench times an error path (only `error`, which
    // measures copying in alone, fails on purpose).
    for (plugin, config) in [(&records, "pass"), (&packed, "")] {
        let out = plugin.process(config, batches[0]).expect("identity plugin");
        assert_eq!(out, batches[0], "{config:?} is not an identity");
    }
    let (record_boundary, record_in) = (per_event(&records, "pass"), per_event(&records, "error"));
    let packed_boundary = per_event(&packed, "");
    println!(
        "\nSandbox boundary alone (identity plugin, batch in and out), us/event: records (1.0) \
         {record_boundary:.2} (of which copying in {record_in:.2}), packed (1.1) \
         {packed_boundary:.2}: {:.1}x cheaper.",
        record_boundary / packed_boundary
    );
    // An empty batch is instantiation + call overhead only.
    let utm = {
        let bytes = std::fs::read(common::plugin_path("beacon_plugin_utm")).expect("component");
        (Runtime::sha256(&bytes), bytes)
    };
    let plugin = runtime.load(&utm.0, &utm.1).expect("load");
    let calls = 2_000;
    let empty = time(|| {
        for _ in 0..calls {
            std::hint::black_box(plugin.process("", &[]).expect("empty"));
        }
    });
    let cache = tempfile::tempdir().expect("tempdir");
    let cold_rt = Runtime::new(SandboxLimits::default(), Some(cache.path().into())).expect("rt");
    let compile = time(|| {
        cold_rt.load(&utm.0, &utm.1).expect("compile");
    });
    let warm_rt = Runtime::new(SandboxLimits::default(), Some(cache.path().into())).expect("rt");
    let mut first = None;
    let from_cache = time(|| {
        let p = warm_rt.load(&utm.0, &utm.1).expect("from cache");
        first = Some(p);
    });
    let first_call = time(|| {
        first
            .expect("loaded")
            .process("", &events[..BATCH])
            .expect("first call");
    });
    println!("\n| step (utm component, {} bytes) | time |", utm.1.len());
    println!("|---|---:|");
    println!(
        "| compile (cold, no cache) | {:.1} ms |",
        compile.as_secs_f64() * 1e3
    );
    println!(
        "| load from the disk cache (edge restart) | {:.2} ms |",
        from_cache.as_secs_f64() * 1e3
    );
    println!(
        "| first call after load, {BATCH} events | {:.2} ms |",
        first_call.as_secs_f64() * 1e3
    );
    println!(
        "| per call: fresh instance + call with an empty batch | {:.1} us |",
        empty.as_secs_f64() * 1e6 / calls as f64
    );
    let (_, nt, wt) = rows[rows.len() - 1];
    println!(
        "\nThree-plugin chain: {:.2} us/event native, {:.2} us/event Wasm.",
        nt.as_secs_f64() * 1e6 / n as f64,
        wt.as_secs_f64() * 1e6 / n as f64
    );
    envelopes(&batches, n);
}

/// What the edge publishes per batch and ingest reads back: envelopes without plugins (raw
/// only) and with the utm -> pii output (raw and processed), encoded and decoded as JSON and
/// packed, best of interleaved rounds. In-process, so the figures are the codecs' alone.
fn envelopes(batches: &[&[Event]], n: usize) {
    use beacon_proto::envelope::{Encoding, ENVELOPE_VERSION};
    use beacon_proto::Envelope;
    let envelope = |raw: &[Event], processed: Option<Vec<Event>>| Envelope {
        v: ENVELOPE_VERSION,
        batch_id: "bench:1".into(),
        merchant_id: "m_bench".into(),
        edge_id: "edge-1".into(),
        received_at: 1,
        pipeline: None,
        raw: raw.to_vec(),
        processed,
        canary: None,
        failures: Vec::new(),
        shares: Vec::new(),
    };
    println!(
        "\n| envelopes ({n} events) | encoding | bytes/event | encode us/event | decode us/event |"
    );
    println!("|---|---|---:|---:|---:|");
    for (name, with_plugins) in [("raw only", false), ("raw + utm -> pii output", true)] {
        let envs: Vec<Envelope> = batches
            .iter()
            .map(|b| envelope(b, with_plugins.then(|| native_chain(&CHAIN[..2], b))))
            .collect();
        let mut cells = Vec::new();
        for enc in [Encoding::Json, Encoding::Packed] {
            let bytes: Vec<Vec<u8>> = envs.iter().map(|e| e.encode(enc)).collect();
            for (e, b) in envs.iter().zip(&bytes) {
                assert_eq!(
                    &Envelope::decode(b).expect("decode"),
                    e,
                    "{enc:?} round trip"
                );
            }
            let size: usize = bytes.iter().map(Vec::len).sum();
            let (mut encode, mut decode) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                encode.push(time(|| {
                    for e in &envs {
                        std::hint::black_box(e.encode(enc));
                    }
                }));
                decode.push(time(|| {
                    for b in &bytes {
                        std::hint::black_box(Envelope::decode(b).expect("decode"));
                    }
                }));
            }
            let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
            cells.push((size, us(best(&encode)), us(best(&decode))));
            println!(
                "| {name} | {enc:?} | {:.0} | {:.3} | {:.3} |",
                size as f64 / n as f64,
                us(best(&encode)),
                us(best(&decode))
            );
        }
        let (json, packed) = (cells[0], cells[1]);
        println!(
            "| {name}: packed / JSON | | {:.2}x | {:.2}x | {:.2}x |",
            packed.0 as f64 / json.0 as f64,
            packed.1 / json.1,
            packed.2 / json.2
        );
    }
}

//! The host side of Beacon's processing plugins: WebAssembly components implementing the
//! `beacon:plugin/processor` world (see `wit/plugin.wit`), run by wasmtime in a sandbox.
//!
//! - **Content-addressed**: a plugin version is the sha256 of its component bytes.
//! - **Deterministic**: a plugin can import only the WASI interfaces a Rust std guest needs
//!   for stdio (captured, bounded) and an empty environment. No clocks, randomness,
//!   filesystem or network; a component importing them is refused with the import's name.
//!   Every call gets a fresh instance, so no state leaks from one batch into the next: the
//!   same input and config always give the same output.
//! - **Bounded**: each call has a fuel budget (deterministic CPU limit), a wall-clock backstop
//!   (epoch interruption), a memory cap and output caps. A breach fails that batch only.
//! - **Cached**: compiled code is kept on disk by content hash, so restarts do not recompile.

mod convert;
mod log;
mod sandbox;
pub mod stage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beacon_proto::{Event, PipelineRef, PluginRef};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::Engine;

pub use sandbox::{SandboxLimits, CONTRACT_MAJOR, CONTRACT_MINOR};

mod bindings {
    // Borrowing: the batch is lowered straight from the host's strings, not cloned first.
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "processor",
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

mod batch_bindings {
    // Contract 1.1: one packed buffer in, one changes buffer out.
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "batch-processor",
    });
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("component is {size} bytes, over the {max}-byte limit for plugins")]
    TooLarge { size: usize, max: usize },
    #[error("component hash is {actual}, not the expected {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("not a valid plugin component: {0}")]
    Invalid(String),
    #[error("incompatible plugin: {0}")]
    Incompatible(String),
    #[error("plugin imports `{0}`, which plugins may not use (no clocks, randomness, filesystem, network or host calls: processing must be deterministic)")]
    ForbiddenImport(String),
    #[error("plugin used its whole CPU budget ({fuel} fuel) without finishing")]
    OutOfFuel { fuel: u64 },
    #[error("plugin ran past its {0:?} wall-clock deadline")]
    Timeout(Duration),
    #[error("plugin tried to use more than its {limit_bytes}-byte memory limit")]
    MemoryLimit { limit_bytes: usize },
    /// `stderr`: the end of what the plugin wrote there (a Rust panic message), for
    /// operators; [`PluginError::public`] leaves it out.
    #[error("plugin trapped: {message}{}", if stderr.is_empty() { String::new() } else { format!("; plugin stderr: {stderr}") })]
    Trap { message: String, stderr: String },
    #[error("plugin returned an error: {0}")]
    Guest(String),
    #[error("plugin output {what} {actual}, over the limit of {max}")]
    OutputTooLarge {
        what: &'static str,
        actual: usize,
        max: usize,
    },
    #[error("plugin output is over the {cap}-byte copy-out budget of this batch (16x its input + 1 MiB, at most twice the output limit)")]
    OutputCopyCapped { cap: usize },
    #[error("plugin produced an invalid event: {0}")]
    InvalidOutput(String),
    #[error("plugin runtime: {0}")]
    Runtime(String),
}

impl PluginError {
    fn runtime(e: wasmtime::Error) -> Self {
        Self::Runtime(format!("{e:#}"))
    }

    /// A short stable name for the kind of failure (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::HashMismatch { .. } => "hash_mismatch",
            Self::Invalid(_) => "invalid",
            Self::Incompatible(_) => "incompatible",
            Self::ForbiddenImport(_) => "forbidden_import",
            Self::OutOfFuel { .. } => "out_of_fuel",
            Self::Timeout(_) => "timeout",
            Self::MemoryLimit { .. } => "memory_limit",
            Self::Trap { .. } => "trap",
            Self::Guest(_) => "guest_error",
            Self::OutputTooLarge { .. } => "output_too_large",
            Self::OutputCopyCapped { .. } => "output_copy_capped",
            Self::InvalidOutput(_) => "invalid_output",
            Self::Runtime(_) => "runtime",
        }
    }

    /// The error as the client that sent the batch may see it: without the plugin's stderr,
    /// which may echo its configuration or other events (operators find it in
    /// `failed_events` and the edge log).
    pub fn public(&self) -> String {
        match self {
            Self::Trap { message, .. } => format!("plugin trapped: {message}"),
            other => other.to_string(),
        }
    }
}

/// Which world a component implements, pre-linked.
enum Entry {
    /// `processor` (1.0): records in, records out.
    Records(bindings::ProcessorPre<sandbox::HostState>),
    /// `batch-processor` (1.1): a packed buffer in, changes out.
    Batch(batch_bindings::BatchProcessorPre<sandbox::HostState>),
}

/// A batch between two steps of a chain, in the form the last step left it.
enum Stage<'a> {
    /// The chain's input.
    Input(&'a [Event]),
    /// A batch plugin's output.
    Host(Vec<Event>),
    /// A record plugin's output: passed to a next record plugin without converting it.
    Guest(Vec<convert::EventResult>),
}

impl Stage<'_> {
    fn into_events(self) -> Vec<Event> {
        match self {
            Stage::Input(e) => e.to_vec(),
            Stage::Host(e) => e,
            Stage::Guest(g) => g.into_iter().map(convert::from_guest).collect(),
        }
    }
}

/// A compiled, validated plugin version, ready to instantiate.
pub struct Plugin {
    sha256: String,
    contract: String,
    entry: Entry,
    engine: Engine,
    limits: SandboxLimits,
    slots: Arc<sandbox::CallSlots>,
}

impl Plugin {
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The plugin contract version the component was built against, e.g. `1.0.0`.
    pub fn contract(&self) -> &str {
        &self.contract
    }

    /// Whether the component implements the packed `batch-processor` world (contract 1.1).
    pub fn is_batch(&self) -> bool {
        matches!(self.entry, Entry::Batch(_))
    }

    /// Runs one batch in a fresh instance. Never panics on anything the guest does.
    pub fn process(&self, config: &str, events: &[Event]) -> Result<Vec<Event>, PluginError> {
        Ok(self.step(config, Stage::Input(events), None)?.into_events())
    }

    /// Like [`Plugin::process`], also returning what the plugin wrote to stdout and stderr
    /// (bounded by `max_log_bytes` each), for authors testing locally.
    pub fn process_with_log(
        &self,
        config: &str,
        events: &[Event],
    ) -> (Result<Vec<Event>, PluginError>, Vec<u8>) {
        let mut log = Vec::new();
        let result = self
            .step(config, Stage::Input(events), Some(&mut log))
            .map(Stage::into_events);
        (result, log)
    }

    /// One plugin's step of a chain: takes the batch in whatever form the previous step
    /// left it, converting only where the two plugins' transports differ.
    fn step<'a>(
        &self,
        config: &str,
        batch: Stage<'a>,
        log: Option<&mut Vec<u8>>,
    ) -> Result<Stage<'a>, PluginError> {
        match &self.entry {
            Entry::Records(_) => Ok(Stage::Guest(match batch {
                Stage::Input(e) => self.call_events(config, e, log)?,
                Stage::Host(e) => self.call_events(config, &e, log)?,
                Stage::Guest(g) => self.call_guest(config, &g, log)?,
            })),
            Entry::Batch(pre) => {
                let source = match batch {
                    Stage::Input(e) => convert::Source::Borrowed(e),
                    Stage::Host(e) => convert::Source::Owned(e.into_iter().map(Some).collect()),
                    Stage::Guest(g) => convert::Source::Owned(
                        g.into_iter()
                            .map(|e| Some(convert::from_guest(e)))
                            .collect(),
                    ),
                };
                let inputs = source.len();
                let out = self.call_batch(pre, config, &source.encode(), log)?;
                let max_events = self.limits.max_output_events(inputs);
                // Too many events is a resource breach (it counts towards quarantine), as for
                // record plugins; anything else wrong with the buffer is invalid output.
                match beacon_plugin_abi::Changes::declared_records(&out) {
                    Some(n) if n > max_events => {
                        return Err(PluginError::OutputTooLarge {
                            what: "events",
                            actual: n,
                            max: max_events,
                        })
                    }
                    _ => {}
                }
                let changes = beacon_plugin_abi::Changes::parse(&out, inputs, max_events)
                    .map_err(|e| PluginError::InvalidOutput(format!("malformed changes: {e}")))?;
                Ok(Stage::Host(convert::apply(
                    &changes,
                    source,
                    self.limits.max_output_bytes,
                )?))
            }
        }
    }

    /// One call of a batch plugin: the packed batch in, its changes buffer out (unparsed).
    fn call_batch(
        &self,
        pre: &batch_bindings::BatchProcessorPre<sandbox::HostState>,
        config: &str,
        batch: &[u8],
        log: Option<&mut Vec<u8>>,
    ) -> Result<Vec<u8>, PluginError> {
        // Changes are smaller than the events they describe; the same budget as records.
        let copy_budget = batch.len().saturating_mul(16).saturating_add(1 << 20);
        // Declared before the store: returned to the pool after the store drops.
        let _slot = self.slots.acquire();
        let (mut store, pipes) = sandbox::new_store(&self.engine, &self.limits, copy_budget)?;
        let result = pre
            .instantiate(&mut store)
            .and_then(|p| p.call_process_batch(&mut store, config, batch));
        if let Some(log) = log {
            log.extend_from_slice(&pipes.stdout.contents());
            log.extend_from_slice(&pipes.stderr.contents());
        }
        let out = match result {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(PluginError::Guest(e.message)),
            Err(e) => {
                return Err(match sandbox::classify(e, &store, &self.limits) {
                    PluginError::Trap { message, .. } => PluginError::Trap {
                        message,
                        stderr: pipes.stderr.tail(512),
                    },
                    other => other,
                })
            }
        };
        if out.len() > self.limits.max_output_bytes {
            return Err(PluginError::OutputTooLarge {
                what: "bytes",
                actual: out.len(),
                max: self.limits.max_output_bytes,
            });
        }
        Ok(out)
    }

    /// One call with host events in, WIT events out (lowered from borrowed host strings).
    fn call_events(
        &self,
        config: &str,
        events: &[Event],
        log: Option<&mut Vec<u8>>,
    ) -> Result<Vec<convert::EventResult>, PluginError> {
        let props: Vec<_> = events
            .iter()
            .map(|e| convert::pairs(&e.properties))
            .collect();
        let input: Vec<convert::EventParam> = events
            .iter()
            .zip(&props)
            .map(|(e, p)| convert::param(e, p))
            .collect();
        self.call_logged(config, &input, log)
    }

    /// One call with WIT events in and out: how a chain passes a batch from one plugin to
    /// the next without converting it back to host events in between.
    fn call_guest(
        &self,
        config: &str,
        events: &[convert::EventResult],
        log: Option<&mut Vec<u8>>,
    ) -> Result<Vec<convert::EventResult>, PluginError> {
        let props: Vec<_> = events
            .iter()
            .map(|e| convert::pairs(e.properties.iter().map(|(k, v)| (k, v))))
            .collect();
        let input: Vec<convert::EventParam> = events
            .iter()
            .zip(&props)
            .map(|(e, p)| convert::reborrow(e, p))
            .collect();
        self.call_logged(config, &input, log)
    }

    fn call_logged(
        &self,
        config: &str,
        input: &[convert::EventParam],
        log: Option<&mut Vec<u8>>,
    ) -> Result<Vec<convert::EventResult>, PluginError> {
        // What the host may allocate copying the output out scales with the batch: 16x its
        // size plus 1 MiB (room for plugins that enrich or split).
        let input_bytes: usize = input.iter().map(convert::param_size).sum();
        let copy_budget = input_bytes.saturating_mul(16).saturating_add(1 << 20);
        // Declared before the store: returned to the pool after the store drops.
        let _slot = self.slots.acquire();
        let (mut store, pipes) = sandbox::new_store(&self.engine, &self.limits, copy_budget)?;
        let result = self.call(&mut store, config, input);
        if let Some(log) = log {
            log.extend_from_slice(&pipes.stdout.contents());
            log.extend_from_slice(&pipes.stderr.contents());
        }
        // A Rust plugin's panic message is on stderr: it says far more than "unreachable".
        result.map_err(|e| match e {
            PluginError::Trap { message, .. } => PluginError::Trap {
                message,
                stderr: pipes.stderr.tail(512),
            },
            other => other,
        })
    }

    fn call(
        &self,
        store: &mut wasmtime::Store<sandbox::HostState>,
        config: &str,
        input: &[convert::EventParam],
    ) -> Result<Vec<convert::EventResult>, PluginError> {
        let Entry::Records(pre) = &self.entry else {
            return Err(PluginError::Runtime(
                "a batch plugin called with records".into(),
            ));
        };
        // The output's lift into host memory is capped by the store's hostcall fuel (see
        // `sandbox::new_store`), so a plugin returning 10,000 references to one 4 MB string
        // fails here instead of making the host allocate 40 GB.
        let result = pre
            .instantiate(&mut *store)
            .and_then(|p| p.call_process(&mut *store, config, input));
        let output = match result {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(PluginError::Guest(e.message)),
            Err(e) => return Err(sandbox::classify(e, store, &self.limits)),
        };
        let max_events = self.limits.max_output_events(input.len());
        if output.len() > max_events {
            return Err(PluginError::OutputTooLarge {
                what: "events",
                actual: output.len(),
                max: max_events,
            });
        }
        let bytes: usize = output.iter().map(convert::approx_size).sum();
        if bytes > self.limits.max_output_bytes {
            return Err(PluginError::OutputTooLarge {
                what: "bytes",
                actual: bytes,
                max: self.limits.max_output_bytes,
            });
        }
        Ok(output)
    }
}

/// Compiles, validates and caches plugin components.
pub struct Runtime {
    engine: Engine,
    linker: Linker<sandbox::HostState>,
    limits: SandboxLimits,
    slots: Arc<sandbox::CallSlots>,
    cache_dir: Option<PathBuf>,
    loaded: Mutex<HashMap<String, Arc<Plugin>>>,
}

impl Runtime {
    pub fn new(limits: SandboxLimits, cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        let engine = sandbox::engine(&limits)?;
        let linker = sandbox::linker(&engine)?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| PluginError::Runtime(format!("cache dir {}: {e}", dir.display())))?;
        }
        Ok(Self {
            engine,
            linker,
            slots: Arc::new(sandbox::CallSlots::new(limits.concurrent_calls)),
            limits,
            cache_dir,
            loaded: Mutex::default(),
        })
    }

    pub fn sha256(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// A plugin already loaded in this process.
    pub fn cached(&self, sha256: &str) -> Option<Arc<Plugin>> {
        self.loaded.lock().ok()?.get(sha256).cloned()
    }

    /// Validates and compiles `bytes` (whose hash must be `sha256`), or loads the compiled
    /// code from the disk cache. CPU-heavy on a miss: call from a blocking thread.
    pub fn load(&self, sha256: &str, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        if let Some(p) = self.cached(sha256) {
            return Ok(p);
        }
        if bytes.len() > self.limits.max_component_bytes {
            return Err(PluginError::TooLarge {
                size: bytes.len(),
                max: self.limits.max_component_bytes,
            });
        }
        let actual = Self::sha256(bytes);
        if actual != sha256 {
            return Err(PluginError::HashMismatch {
                expected: sha256.to_string(),
                actual,
            });
        }
        let component = self.compile(sha256, bytes)?;
        let contract = sandbox::check_imports(&self.engine, &component)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Invalid(format!("{e:#}")))?;
        // A component implements one of the two worlds; the packed one is tried first.
        let entry = match batch_bindings::BatchProcessorPre::new(instance_pre.clone()) {
            Ok(pre) => Entry::Batch(pre),
            // Both reasons: a component meant as a batch plugin learns what is wrong with
            // its `process-batch`, not only why it is no record plugin.
            Err(batch) => {
                Entry::Records(bindings::ProcessorPre::new(instance_pre).map_err(|e| {
                    PluginError::Invalid(format!(
                        "implements neither beacon:plugin/batch-processor ({batch:#}) nor \
                         beacon:plugin/processor ({e:#})"
                    ))
                })?)
            }
        };

        let plugin = Arc::new(Plugin {
            sha256: sha256.to_string(),
            contract,
            entry,
            engine: self.engine.clone(),
            limits: self.limits.clone(),
            slots: self.slots.clone(),
        });
        if let Ok(mut l) = self.loaded.lock() {
            l.insert(sha256.to_string(), plugin.clone());
        }
        Ok(plugin)
    }

    fn compile(&self, sha256: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        let cache_file = self.cache_dir.as_ref().map(|d| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.engine.precompile_compatibility_hash().hash(&mut h);
            d.join(format!("{sha256}-{:016x}.cwasm", h.finish()))
        });
        if let Some(path) = &cache_file {
            if path.exists() {
                // SAFETY: the file was written by `Component::serialize` below, under a name
                // bound to the engine's compatibility hash, and is never modified in place.
                match unsafe { Component::deserialize_file(&self.engine, path) } {
                    Ok(c) => return Ok(c),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "stale compiled plugin; recompiling")
                    }
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| PluginError::Invalid(format!("{e:#}")))?;
        if let Some(path) = &cache_file {
            match component.serialize() {
                Ok(code) => {
                    let tmp = path.with_extension("tmp");
                    if std::fs::write(&tmp, code)
                        .and_then(|_| std::fs::rename(&tmp, path))
                        .is_err()
                    {
                        tracing::warn!(path = %path.display(), "could not cache compiled plugin");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %PluginError::runtime(e), "could not serialize compiled plugin")
                }
            }
        }
        Ok(component)
    }
}

/// A merchant's ordered plugins with their configs: one pipeline version.
pub struct Chain {
    pipeline: PipelineRef,
    plugins: Vec<(PluginRef, Arc<Plugin>)>,
}

/// Which plugin of a chain failed, and how.
#[derive(Debug)]
pub struct ChainFailure {
    /// `name@sha256-prefix`
    pub plugin: String,
    pub error: PluginError,
}

impl Chain {
    pub fn new(pipeline: PipelineRef, plugins: Vec<(PluginRef, Arc<Plugin>)>) -> Self {
        Self { pipeline, plugins }
    }

    pub fn pipeline(&self) -> &PipelineRef {
        &self.pipeline
    }

    /// Runs the batch through every plugin in order. The output keeps the merchant of the
    /// input: a plugin cannot move events into another merchant's data.
    pub fn run(&self, events: &[Event]) -> Result<Vec<Event>, ChainFailure> {
        let failure = |r: &PluginRef, error| ChainFailure {
            plugin: format!("{}@{}", r.name, &r.sha256[..r.sha256.len().min(12)]),
            error,
        };
        let mut stage = Stage::Input(events);
        for (r, plugin) in &self.plugins {
            stage = plugin
                .step(&r.config, stage, None)
                .map_err(|e| failure(r, e))?;
        }
        let mut batch = stage.into_events();
        let merchant = &self.pipeline.merchant_id;
        for e in &mut batch {
            if &e.merchant_id != merchant {
                e.merchant_id.clone_from(merchant);
            }
        }
        Ok(batch)
    }
}

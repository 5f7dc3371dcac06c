//! The sandbox: engine settings, what a plugin may import, and the per-call limits.

use std::time::Duration;

use crate::log::BoundedLog;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::PluginError;

/// Limits for one plugin call and one plugin binary. Defaults sit between Shopify Functions
/// (256 kB binary, 10 MB memory, instruction caps) and Cloudflare Workers (128 MB, CPU ms):
/// the example Rust plugins with serde are 130-210 kB, and a 1000-event batch needs a few MB.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    /// Deterministic CPU budget per call (roughly one unit per wasm instruction).
    pub fuel: u64,
    /// Wall-clock backstop per call, in case fuel accounting is not enough.
    pub timeout: Duration,
    /// Linear memory cap per call.
    pub memory_bytes: usize,
    pub max_component_bytes: usize,
    /// Output may hold at most `output_events_factor` x input + `output_events_slack` events.
    pub output_events_factor: usize,
    pub output_events_slack: usize,
    pub max_output_bytes: usize,
    /// Captured stdout/stderr per call, each (the rest is dropped): shown by `beacon plugin
    /// test`, and the end of stderr (a panic message) goes into a trap's failure reason.
    pub max_log_bytes: usize,
    /// Plugin calls running at once per runtime: the size of the instance pool. Further
    /// calls wait for a slot (each call is bounded by `timeout`).
    pub concurrent_calls: usize,
    /// Linear memory kept resident (zeroed, not unmapped) per pool slot between calls, so a
    /// fresh instance does not page-fault its way through memory the last one already
    /// touched. A 500-event batch needs between 1 and 4 MiB; this costs at most
    /// `concurrent_calls` x this much RSS.
    pub keep_resident_bytes: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            fuel: 2_000_000_000,
            timeout: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            max_component_bytes: 8 << 20,
            output_events_factor: 4,
            output_events_slack: 100,
            max_output_bytes: 32 << 20,
            max_log_bytes: 64 << 10,
            concurrent_calls: 32,
            keep_resident_bytes: 4 << 20,
        }
    }
}

impl SandboxLimits {
    pub fn max_output_events(&self, input: usize) -> usize {
        input
            .saturating_mul(self.output_events_factor)
            .saturating_add(self.output_events_slack)
    }
}

/// Interfaces a plugin may import: what a Rust std guest links for stdio and panics.
const ALLOWED_IMPORTS: &[&str] = &[
    // Our own contract's type definitions (no functions).
    "beacon:plugin/types",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
];

const EPOCH_TICK: Duration = Duration::from_millis(10);

pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// `StoreLimits` that remembers whether it refused memory, to name the failure correctly.
struct Limiter {
    inner: StoreLimits,
    memory_denied: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.memory_denied = true;
        }
        r
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
    fn instances(&self) -> usize {
        self.inner.instances()
    }
    fn tables(&self) -> usize {
        self.inner.tables()
    }
    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

pub(crate) fn engine(limits: &SandboxLimits) -> Result<Engine, PluginError> {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(512 * 1024)
        .cranelift_nan_canonicalization(true)
        // Relaxed SIMD may differ between CPUs unless pinned: processing must not.
        .relaxed_simd_deterministic(true);
    // Instances come from a pool whose slots keep their touched memory resident, zeroed: a
    // fresh instance per batch then costs a memset instead of a page fault per page. That
    // took the three-plugin chain from 2.2x to 1.75-1.78x native (docs/BENCHMARKS.md, "Plugins");
    // without keeping memory resident the pool alone gave 3%. Memory is reset between
    // instances, so nothing carries over from one batch to the next.
    let slots = u32::try_from(limits.concurrent_calls.max(1)).unwrap_or(u32::MAX);
    let mut pool = wasmtime::PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        // Per call: at most 16 core instances and 16 tables (the store's limiter, which
        // refuses more first) and one memory.
        .total_core_instances(slots.saturating_mul(16))
        .total_tables(slots.saturating_mul(16))
        .total_memories(slots)
        // The pool checks these when a component is loaded: as lenient as the limiter, so
        // the pool refuses nothing the sandbox accepted before it.
        .max_tables_per_module(16)
        .table_elements(100_000)
        // A wasm32 memory cannot pass 4 GiB, and the pool refuses more than its reservation.
        .max_memory_size(limits.memory_bytes.min(4 << 30))
        .linear_memory_keep_resident(limits.keep_resident_bytes)
        .table_keep_resident(64 << 10);
    cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&cfg).map_err(PluginError::runtime)?;
    // One ticker per engine drives every store's wall-clock deadline; it ends with the engine.
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || {
            while let Some(e) = weak.upgrade() {
                e.increment_epoch();
                drop(e);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map_err(|e| PluginError::Runtime(format!("epoch thread: {e}")))?;
    Ok(engine)
}

/// Links only stdio, environment (empty) and exit: nothing that could break determinism.
pub(crate) fn linker(engine: &Engine) -> Result<Linker<HostState>, PluginError> {
    use wasmtime::component::HasData;
    use wasmtime_wasi::cli::{WasiCli, WasiCliView as _};
    use wasmtime_wasi::p2::bindings::{cli, sync};

    struct HasIo;
    impl HasData for HasIo {
        type Data<'a> = &'a mut ResourceTable;
    }
    let mut l: Linker<HostState> = Linker::new(engine);
    let r = (|| -> wasmtime::Result<()> {
        sync::io::error::add_to_linker::<HostState, HasIo>(&mut l, |t| t.ctx().table)?;
        sync::io::poll::add_to_linker::<HostState, HasIo>(&mut l, |t| t.ctx().table)?;
        sync::io::streams::add_to_linker::<HostState, HasIo>(&mut l, |t| t.ctx().table)?;
        cli::environment::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::exit::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::stdin::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::stdout::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::stderr::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::terminal_input::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::terminal_output::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(&mut l, HostState::cli)?;
        Ok(())
    })();
    r.map_err(PluginError::runtime)?;
    Ok(l)
}

/// The plugin contract this host implements: `beacon:plugin@1.<CONTRACT_MINOR>`.
pub const CONTRACT_MAJOR: u64 = 1;
/// 1: the `batch-processor` world (packed buffers).
pub const CONTRACT_MINOR: u64 = 1;
const CONTRACT_TYPES: &str = "beacon:plugin/types";

/// Refuses components importing anything outside [`ALLOWED_IMPORTS`], naming the import, or
/// built against a plugin contract this host does not implement. Returns the contract
/// version the component was built against.
pub(crate) fn check_imports(engine: &Engine, component: &Component) -> Result<String, PluginError> {
    let ty = component.component_type();
    let mut contract = None;
    let mut forbidden = Vec::new();
    for (name, _) in ty.imports(engine) {
        let (base, version) = name.split_once('@').unwrap_or((name, ""));
        if !ALLOWED_IMPORTS.contains(&base) {
            forbidden.push(name.to_string());
            continue;
        }
        if base == CONTRACT_TYPES {
            let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
            let compatible = match (parts.next().flatten(), parts.next().flatten()) {
                (Some(major), Some(minor)) => major == CONTRACT_MAJOR && minor <= CONTRACT_MINOR,
                _ => false,
            };
            if !compatible {
                return Err(PluginError::Incompatible(format!(
                    "built against beacon:plugin@{version}; this host implements \
                     beacon:plugin@{CONTRACT_MAJOR}.0 to {CONTRACT_MAJOR}.{CONTRACT_MINOR} \
                     (rebuild it with the current wit/ or plugin SDK)"
                )));
            }
            contract = Some(version.to_string());
        }
    }
    if !forbidden.is_empty() {
        return Err(PluginError::ForbiddenImport(forbidden.join("`, `")));
    }
    // A component that uses none of the contract's types cannot implement the world; the
    // world check names that precisely, so report "unknown" here.
    Ok(contract.unwrap_or_else(|| "unknown".into()))
}

/// Bounds the calls running at once to the pool's size: a call waits for a slot instead of
/// failing to instantiate when the pool is exhausted.
pub(crate) struct CallSlots {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A held slot; returned on drop (after the call's store, declared later, is dropped).
pub(crate) struct Slot<'a>(&'a CallSlots);

impl CallSlots {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            free: std::sync::Mutex::new(n.max(1)),
            freed: std::sync::Condvar::new(),
        }
    }

    pub(crate) fn acquire(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.0.freed.notify_one();
    }
}

/// The plugin's captured stdout and stderr (bounded).
/// A call's stdout and stderr, each kept up to `max_log_bytes` (the rest dropped).
pub(crate) struct Pipes {
    pub stdout: BoundedLog,
    pub stderr: BoundedLog,
}

/// `copy_budget` caps, in bytes, what lifting the call's output may allocate in the host
/// (never more than twice the output limit).
pub(crate) fn new_store(
    engine: &Engine,
    limits: &SandboxLimits,
    copy_budget: usize,
) -> Result<(Store<HostState>, Pipes), PluginError> {
    let pipes = Pipes {
        stdout: BoundedLog::new(limits.max_log_bytes),
        stderr: BoundedLog::new(limits.max_log_bytes),
    };
    let wasi = WasiCtxBuilder::new()
        .stdout(pipes.stdout.clone())
        .stderr(pipes.stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build();
    let limiter = Limiter {
        inner: StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes)
            .table_elements(100_000)
            .instances(16)
            .tables(16)
            // One linear memory (a Rust component has one): the cap is the whole budget.
            .memories(1)
            .build(),
        memory_denied: false,
    };
    let mut store = Store::new(
        engine,
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter,
        },
    );
    store.limiter(|s| &mut s.limiter);
    // Hostcall fuel: about one unit per byte lifted out of the guest, checked before the host
    // allocates for it.
    store.set_hostcall_fuel(copy_budget.min(limits.max_output_bytes.saturating_mul(2)));
    store.set_fuel(limits.fuel).map_err(PluginError::runtime)?;
    let ticks = (limits.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
    store.set_epoch_deadline(ticks);
    Ok((store, pipes))
}

/// Names a failed call: fuel, deadline, memory, or another trap.
pub(crate) fn classify(
    e: wasmtime::Error,
    store: &Store<HostState>,
    limits: &SandboxLimits,
) -> PluginError {
    let memory_denied = store.data().limiter.memory_denied;
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PluginError::OutOfFuel { fuel: limits.fuel },
        Some(Trap::Interrupt) => PluginError::Timeout(limits.timeout),
        // A Rust guest aborts (unreachable) when an allocation is refused.
        _ if memory_denied => PluginError::MemoryLimit {
            limit_bytes: limits.memory_bytes,
        },
        Some(t) => PluginError::Trap {
            message: t.to_string(),
            stderr: String::new(),
        },
        None if format!("{e:#}").contains("too much data is being copied") => {
            PluginError::OutputCopyCapped {
                cap: store.hostcall_fuel(),
            }
        }
        None => PluginError::Trap {
            message: format!("{e:#}"),
            stderr: String::new(),
        },
    }
}

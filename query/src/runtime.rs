//! Query work runs on its own runtime, never on the one that collects events.
//!
//! A query can be slow (a cold scan), deep (a long but admitted expression) or hostile; none
//! of that may delay the edge, ingest, rollups or the admin API. So the metrics API and the
//! SQL server, their connections, planning and DataFusion's execution all live on a
//! separate tokio runtime whose worker threads
//! - have a large stack (what the complexity limits admit must fit with room to spare:
//!   planning recursion is proportional to expression depth),
//! - run at a lower CPU priority (`nice`), so when the two cores are busy the scheduler
//!   prefers collection and ingest, and queries take what is left.

use std::future::Future;
use std::time::Duration;

/// Settings of the query runtime.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeSettings {
    /// Worker threads (default: the number of cores).
    pub threads: usize,
    /// Stack size of each worker and blocking thread.
    pub stack_bytes: usize,
    /// `nice` increment of its threads (0-19; Linux applies it per thread).
    pub nice: i32,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            stack_bytes: 64 << 20,
            nice: 10,
        }
    }
}

impl RuntimeSettings {
    /// For background work that must never hold a worker of the runtime collecting events
    /// (scheduled maintenance, history rewrites): one worker at a low CPU priority.
    pub fn background() -> Self {
        Self {
            threads: 1,
            stack_bytes: 8 << 20,
            nice: 15,
        }
    }
}

/// A tokio runtime for queries; dropping it stops what runs on it.
pub struct QueryRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl QueryRuntime {
    pub fn new(settings: RuntimeSettings) -> std::io::Result<Self> {
        let nice = settings.nice.clamp(0, 19);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.threads.max(1))
            .max_blocking_threads(4 * settings.threads.max(1))
            .thread_name("beacon-query")
            .thread_stack_size(settings.stack_bytes)
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.runtime {
            Some(rt) => rt.handle().clone(),
            None => unreachable!("the runtime is only taken in drop"),
        }
    }

    /// Runs `future` on the query runtime; the returned handle can be awaited from any
    /// runtime.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle().spawn(future)
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's async context panics; this does not wait.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_millis(0));
        }
    }
}

/// Lowers the calling thread's CPU priority (Linux: `setpriority` with `who = 0` acts on the
/// calling thread, not the whole process).
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, (current + nice).min(19));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_threads_are_niced_and_have_a_large_stack() {
        let rt = QueryRuntime::new(RuntimeSettings {
            threads: 1,
            stack_bytes: 32 << 20,
            nice: 5,
        })
        .unwrap();
        let base = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let (prio, deep) = rt.handle().block_on(async {
            rt.spawn(async {
                // 8 MiB of stack frames: more than a default 2 MiB worker has.
                fn recurse(n: u32) -> u32 {
                    let pad = std::hint::black_box([0u8; 1024]);
                    if n == 0 {
                        pad[0] as u32
                    } else {
                        recurse(n - 1) + pad[1] as u32
                    }
                }
                let prio = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
                (prio, recurse(8 * 1024))
            })
            .await
            .unwrap()
        });
        assert_eq!(prio, (base + 5).min(19));
        assert_eq!(deep, 0);
    }
}

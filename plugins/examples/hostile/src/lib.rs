//! A deliberately hostile plugin for sandbox tests. Its config string picks the misdeed:
//! - `loop`: never returns;
//! - `alloc`: tries to allocate 1 GiB;
//! - `trap`: panics (a trap);
//! - `error`: returns a plugin error;
//! - `steal`: rewrites merchant ids;
//! - `blank`: blanks event ids (invalid output);
//! - `flood`: 100x as many events as it got;
//! - `stack`: unbounded recursion with 4 KiB frames (stack overflow -> trap);
//! - `bigout` / `bigout:<MiB>`: returns about 100 MiB (or `<MiB>`) of output — events each
//!   with a 4 MiB property value — while using only about 4 MiB of its own memory: every
//!   value points at the same buffer, which the canonical ABI allows, so the host has to
//!   bound what it lifts, not just the guest's memory;
//! - `bigout-alloc`: the same output, but each value really allocated (about 100 MiB of
//!   guest memory, so it runs into the memory limit first);
//!
//! anything else passes the batch through unchanged.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

wit_bindgen::generate!({ path: "../../../wit", world: "processor" });

/// Size of one `bigout` property value.
const CHUNK: usize = 4 << 20;

/// Address of the buffer shared by all `bigout` values (0 = none).
static SHARED: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, except that it never frees the shared `bigout` buffer: the
/// generated post-return code frees every returned string, and many of them point at it.
struct KeepShared;

unsafe impl GlobalAlloc for KeepShared {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ptr as usize != SHARED.load(Ordering::Relaxed) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: KeepShared = KeepShared;

/// Recurses forever (the `black_box`es keep the frames and the recursion).
#[inline(never)]
fn dive(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[(depth % 4096) as usize] = depth as u8;
    let frame = std::hint::black_box(frame);
    if std::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    dive(depth + 1).wrapping_add(u64::from(frame[(depth % 7) as usize]))
}

/// `count` events, each with a `CHUNK`-byte property value; `shared`: all values alias one
/// buffer.
fn big_output(batch: Vec<Event>, total_mib: usize, shared: bool) -> Vec<Event> {
    let count = (total_mib << 20).div_ceil(CHUNK).max(1);
    let template = batch.into_iter().next().unwrap_or_else(|| Event {
        event_id: "big".into(),
        merchant_id: String::new(),
        name: "big".into(),
        ts: 1_790_000_000_000,
        received_at: 0,
        url: None,
        referrer: None,
        title: None,
        visitor_id: None,
        session_id: None,
        user_id: None,
        revenue_micros: None,
        currency: None,
        properties: Vec::new(),
    });
    let buffer = if shared {
        let mut v = std::mem::ManuallyDrop::new(vec![b'x'; CHUNK]);
        SHARED.store(v.as_mut_ptr() as usize, Ordering::Relaxed);
        Some(v.as_mut_ptr())
    } else {
        None
    };
    (0..count)
        .map(|i| {
            let mut e = template.clone();
            e.event_id = format!("{}.big{i}", template.event_id);
            let value = match buffer {
                // SAFETY: the buffer is never written and never freed (see `KeepShared`);
                // the strings are only read, by the bindings lowering the result.
                Some(ptr) => unsafe { String::from_raw_parts(ptr, CHUNK, CHUNK) },
                None => "x".repeat(CHUNK),
            };
            e.properties.push(("big".into(), value));
            e
        })
        .collect()
}

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
            "stack" => Err(PluginError {
                message: format!("returned from depth {}", dive(0)),
            }),
            "bigout" => Ok(big_output(batch, 100, true)),
            "bigout-alloc" => Ok(big_output(batch, 100, false)),
            other => match other.strip_prefix("bigout:").map(str::parse::<usize>) {
                Some(Ok(mib)) => Ok(big_output(batch, mib, true)),
                _ => Ok(batch),
            },
        }
    }
}

export!(Hostile);

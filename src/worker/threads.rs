//! The CPU path's threads in the browser. The worker has two builds: the plain one runs the engine on the worker's
//! own thread; the `threads` one (scripts/worker-threads.sh, atomics and shared memory) starts rayon's pool in Web
//! Workers that share the worker's memory (wasm-bindgen-rayon), so the engine's parallel products and attention
//! use every core, as natively. Shared memory needs a cross-origin isolated page (the COOP and COEP headers), so
//! the page starts the threaded build only where `crossOriginIsolated` is true (`ui::client`).
//!
//! The pool starts while the worker already takes requests (a visit's first request reads the model from the
//! cache meanwhile); anything that computes waits for it first (`ready`), since rayon would otherwise build a
//! one-thread pool on its first use and keep it.

#[cfg(feature = "threads")]
use std::cell::Cell;

/// At most this many pool threads, whatever the browser reports: each is a Web Worker with its own stack, and the
/// small models gain little beyond it.
#[cfg(feature = "threads")]
const MAX_THREADS: usize = 8;

#[cfg(feature = "threads")]
thread_local! {
    /// Whether the pool has started (or failed to, and the engine runs on this thread).
    static POOL_SETTLED: Cell<bool> = const { Cell::new(false) };
}

/// Starts the pool, one thread per core the browser reports. Returns a note for the page when it could not start.
#[cfg(feature = "threads")]
pub async fn start_pool() -> Option<String> {
    let reported = js_sys::Reflect::get(&js_sys::global(), &"navigator".into())
        .and_then(|n| js_sys::Reflect::get(&n, &"hardwareConcurrency".into()))
        .ok()
        .and_then(|c| c.as_f64())
        .unwrap_or(1.0) as usize;
    let threads = reported.clamp(1, MAX_THREADS);
    let started = wasm_bindgen_futures::JsFuture::from(wasm_bindgen_rayon::init_thread_pool(threads)).await;
    POOL_SETTLED.with(|s| s.set(true));
    started.err().map(|e| format!("the engine's CPU threads could not start ({e:?}); it runs on one thread"))
}

/// The longest wait for the pool: its workers tell when they are ready, and one that fails to start (a blocked
/// `blob:` worker) never does; the engine then goes on with rayon's one-thread fallback rather than never answer.
#[cfg(feature = "threads")]
const POOL_WAIT_MS: f64 = 30_000.0;

/// Waits until the pool has started, at most `POOL_WAIT_MS` (at once in the plain build).
pub async fn ready() {
    #[cfg(feature = "threads")]
    {
        let since = js_sys::Date::now();
        while !POOL_SETTLED.with(|s| s.get()) {
            if js_sys::Date::now() - since > POOL_WAIT_MS {
                POOL_SETTLED.with(|s| s.set(true));
                let text = "the engine's CPU threads did not start within 30 s; it runs on one thread".to_string();
                super::post(0, crate::protocol::Response::Notice { text });
                break;
            }
            gloo::timers::future::TimeoutFuture::new(2).await;
        }
    }
}

/// Whether this global (the page, or the worker) may share memory with workers: served with COOP and COEP.
pub fn cross_origin_isolated() -> bool {
    js_sys::Reflect::get(&js_sys::global(), &"crossOriginIsolated".into()).is_ok_and(|v| v.as_bool() == Some(true))
}

/// How the CPU path runs here, for the model card: "WebAssembly, 2 threads".
pub fn describe() -> String {
    #[cfg(feature = "threads")]
    let threads = rayon::current_num_threads();
    #[cfg(not(feature = "threads"))]
    let threads = 1;
    match threads {
        1 if cross_origin_isolated() => "WebAssembly, one thread".into(),
        1 => "WebAssembly, one thread (the page is not cross-origin isolated)".into(),
        n => format!("WebAssembly, {n} threads"),
    }
}

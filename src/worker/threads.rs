//! The CPU path's threads in the browser. The worker has two builds: the plain one runs the engine on the worker's
//! own thread; the `threads` one (scripts/worker-threads.sh, atomics and shared memory) starts rayon's pool in Web
//! Workers that share the worker's memory (wasm-bindgen-rayon), so the engine's parallel products and attention
//! use every core, as natively. Shared memory needs a cross-origin isolated page (the COOP and COEP headers), so
//! the page starts the threaded build only where `crossOriginIsolated` is true (`ui::client`).

/// At most this many pool threads, whatever the browser reports: each is a Web Worker with its own stack, and the
/// small models gain little beyond it.
#[cfg(feature = "threads")]
const MAX_THREADS: usize = 8;

/// Starts the pool before the worker takes requests (rayon would otherwise build a one-thread pool on first use).
/// Returns a note for the page when the pool could not start; the engine then runs on this thread.
#[cfg(feature = "threads")]
pub async fn start_pool() -> Option<String> {
    let reported = js_sys::Reflect::get(&js_sys::global(), &"navigator".into())
        .and_then(|n| js_sys::Reflect::get(&n, &"hardwareConcurrency".into()))
        .ok()
        .and_then(|c| c.as_f64())
        .unwrap_or(1.0) as usize;
    let threads = reported.clamp(1, MAX_THREADS);
    match wasm_bindgen_futures::JsFuture::from(wasm_bindgen_rayon::init_thread_pool(threads)).await {
        Ok(_) => None,
        Err(e) => Some(format!("the engine's CPU threads could not start ({e:?}); it runs on one thread")),
    }
}

/// How the CPU path runs here, for the model card: "WebAssembly, 2 threads".
pub fn describe() -> String {
    #[cfg(feature = "threads")]
    let threads = rayon::current_num_threads();
    #[cfg(not(feature = "threads"))]
    let threads = 1;
    match threads {
        1 if cfg!(feature = "threads") => "WebAssembly, one thread".into(),
        1 => "WebAssembly, one thread (the page is not cross-origin isolated)".into(),
        n => format!("WebAssembly, {n} threads"),
    }
}

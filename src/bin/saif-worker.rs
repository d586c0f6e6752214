//! The engine's Web Worker (built for wasm32 by trunk as a worker; see index.html).

#[cfg(target_arch = "wasm32")]
fn main() {
    saif_app::worker::start();
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!("saif-worker runs inside the web page's Web Worker; run `make serve`.");
}

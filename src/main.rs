//! The page's entry point (built for wasm32 by trunk; see index.html).

#[cfg(target_arch = "wasm32")]
fn main() {
    saif_app::ui::start();
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!("saif-app is the web page; run `make serve` and open it in a browser.");
}

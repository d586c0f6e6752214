//! SAIF in the browser: the page (`ui`, built from `src/main.rs`) and the Web Worker that hosts the engine
//! (`worker`, built from `src/bin/saif-worker.rs`), which talk through `protocol`. The page never touches the
//! model: it sends requests and renders what comes back, so a long load or generation never freezes it.
//!
//! `catalog` lists the models the page offers; `link` reads and writes the shareable URL. Both are plain Rust
//! and tested natively. `untrusted` gathers every reader of a stranger's bytes for the fuzz targets.

pub mod catalog;
pub mod link;
pub mod protocol;
pub mod untrusted;

#[cfg(target_arch = "wasm32")]
pub mod ui;
#[cfg(target_arch = "wasm32")]
pub mod worker;

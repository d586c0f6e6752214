//! The SAE trainer's kernels in the browser (wasm-bindgen-test in headless Chromium, on WebGPU: SwiftShader where
//! there is no GPU; `make test` runs it): the same checks against the CPU twins as `gpu_training.rs` runs natively.
#![cfg(target_arch = "wasm32")]

mod common;

use common::kernel_checks;
use saif_engine::gpu::Gpu;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

async fn gpu() -> Gpu {
    Gpu::new().await.expect("WebGPU in headless Chromium (crates/saif/webdriver.json enables it)")
}

#[wasm_bindgen_test]
async fn adam_on_webgpu_is_the_cpu_trainer_s_adam() {
    kernel_checks::adam_on_the_gpu_is_the_cpu_trainer_s_adam(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_normalises_decoder_rows_as_the_cpu_does() {
    kernel_checks::the_gpu_normalises_decoder_rows_as_the_cpu_does(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn dense_products_on_webgpu_match_the_definition() {
    kernel_checks::dense_products_match_the_definition_in_every_layout_and_form(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn top_k_on_webgpu_selects_what_the_cpu_selects() {
    kernel_checks::top_k_and_aux_k_select_what_the_cpu_selects(&gpu().await).await;
}

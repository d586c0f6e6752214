//! The WGSL kernels against their CPU twins, natively (on Mesa's lavapipe where the machine has no GPU). The
//! cases live in gpu_cases/ and also run in headless Chromium (tests/wasm.rs).

mod gpu_cases;

use saif_engine::block_on;
use saif_engine::gpu::kernels::MatmulForm;
use saif_engine::gpu::Gpu;

fn gpu() -> Gpu {
    block_on(Gpu::new()).expect("a wgpu adapter (make setup installs Mesa's Vulkan drivers)")
}

/// The form CPU adapters get (a thread per row).
#[test]
fn matmul_matches_cpu_for_every_type() {
    block_on(gpu_cases::matmul_matches_cpu_for_every_type(&gpu().with_matmul_form(MatmulForm::PerRow)));
}

/// The form real GPUs get (16 threads share a row and add up through workgroup memory), on this adapter too.
#[test]
fn cooperative_matmul_matches_cpu_for_every_type() {
    block_on(gpu_cases::matmul_matches_cpu_for_every_type(&gpu().with_matmul_form(MatmulForm::Cooperative)));
}

/// The lanes' sums through subgroup shuffles, as GPUs with subgroups get them (lavapipe's subgroups hold 8).
fn subgroup_gpu() -> Gpu {
    let gpu = gpu();
    assert!(gpu.subgroup_size.is_some(), "{} offers no subgroups", gpu.describe());
    gpu.with_matmul_form(MatmulForm::Subgroup)
}

#[test]
fn subgroup_matmul_matches_cpu_for_every_type() {
    block_on(gpu_cases::matmul_matches_cpu_for_every_type(&subgroup_gpu()));
}

#[test]
fn split_matrices_give_the_same_products() {
    block_on(gpu_cases::split_matrices_give_the_same_products(&gpu()));
}

#[test]
fn embedding_matches_cpu_for_every_type() {
    block_on(gpu_cases::embedding_matches_cpu_for_every_type(&gpu()));
}

#[test]
fn rms_norms_match_cpu() {
    block_on(gpu_cases::rms_norms_match_cpu(&gpu()));
}

#[test]
fn head_preparation_matches_cpu() {
    block_on(gpu_cases::head_preparation_matches_cpu(&gpu()));
}

/// Residual adds and gated MLPs in the products' epilogues, in both forms (the lanes reduce the up rows too).
#[test]
fn fused_products_match_cpu() {
    block_on(gpu_cases::fused_products_match_cpu(&gpu().with_matmul_form(MatmulForm::PerRow)));
    block_on(gpu_cases::fused_products_match_cpu(&gpu().with_matmul_form(MatmulForm::Cooperative)));
    block_on(gpu_cases::fused_products_match_cpu(&subgroup_gpu()));
}

#[test]
fn attention_matches_cpu() {
    block_on(gpu_cases::attention_matches_cpu(&gpu()));
}

#[test]
fn step_attention_matches_prepare_then_attend() {
    block_on(gpu_cases::step_attention_matches_prepare_then_attend(&gpu()));
}

#[test]
fn attention_gives_each_sequence_what_it_gets_alone() {
    block_on(gpu_cases::attention_gives_each_sequence_what_it_gets_alone(&gpu()));
}

#[test]
fn normalized_products_equal_norm_then_product() {
    use candle_core::quantized::GgmlDType;
    use gpu_cases::{normalized_products_equal_norm_then_product as check, NORMALIZED_TYPES};
    // Every type in the form lavapipe runs; the two GPU forms (their lanes split a row) on one block type and one
    // K-quant.
    block_on(check(&gpu().with_matmul_form(MatmulForm::PerRow), &NORMALIZED_TYPES));
    block_on(check(&subgroup_gpu(), &[GgmlDType::Q4_1, GgmlDType::Q6K]));
    block_on(check(&gpu().with_matmul_form(MatmulForm::Cooperative), &[GgmlDType::Q4_1, GgmlDType::Q6K]));
}

#[test]
fn add_norm_products_equal_norm_add_then_product() {
    use candle_core::quantized::GgmlDType;
    use gpu_cases::{add_norm_products_equal_norm_add_then_product as check, NORMALIZED_TYPES};
    block_on(check(&gpu().with_matmul_form(MatmulForm::PerRow), &NORMALIZED_TYPES));
    block_on(check(&subgroup_gpu(), &[GgmlDType::Q5_0, GgmlDType::Q8_0]));
    block_on(check(&gpu().with_matmul_form(MatmulForm::Cooperative), &[GgmlDType::Q5_0, GgmlDType::Q8_0]));
}

#[test]
fn embed_norm_products_equal_embed_then_norm_product() {
    use candle_core::quantized::GgmlDType;
    use gpu_cases::embed_norm_products_equal_embed_then_norm_product as check;
    // Every table type against a block-type product and a K-quant product, in the form lavapipe runs; the two GPU
    // forms on one product type.
    block_on(check(&gpu().with_matmul_form(MatmulForm::PerRow), &[GgmlDType::Q4_1, GgmlDType::Q6K]));
    block_on(check(&subgroup_gpu(), &[GgmlDType::Q8_0]));
    block_on(check(&gpu().with_matmul_form(MatmulForm::Cooperative), &[GgmlDType::Q8_0]));
}

#[test]
fn largest_products_pick_as_argmax() {
    block_on(gpu_cases::largest_products_pick_as_argmax(&gpu().with_matmul_form(MatmulForm::PerRow)));
    block_on(gpu_cases::largest_products_pick_as_argmax(&subgroup_gpu()));
    block_on(gpu_cases::largest_products_pick_as_argmax(&gpu().with_matmul_form(MatmulForm::Cooperative)));
}

#[test]
fn elementwise_steps_match_cpu() {
    block_on(gpu_cases::elementwise_steps_match_cpu(&gpu()));
}

#[test]
fn token_selection_matches_the_cpu_sampler() {
    block_on(gpu_cases::token_selection_matches_the_cpu_sampler(&gpu()));
}

#[test]
fn projection_matches_cpu() {
    block_on(gpu_cases::projection_matches_cpu(&gpu()));
}

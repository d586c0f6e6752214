//! The SAE trainer's GPU step (crates/saif/src/train/gpu.rs and its kernels) against its CPU references, natively
//! on the machine's wgpu adapter (Mesa's lavapipe where there is no GPU): the kernel checks shared with the browser
//! test (`common/kernel_checks.rs`: both forms of the dense product, TopK/AuxK, Adam's update, the decoder's row
//! normalisation), one whole step's gradients against candle's autograd (read from Adam's first moments in the
//! checkpoints), and a whole run against the CPU run on data with a known answer.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::kernel_checks;
use saif::train::{train_on, StepReport, TrainConfig, TrainError};
use saif_engine::block_on;
use saif_engine::gpu::Gpu;

fn gpu() -> Gpu {
    block_on(Gpu::new()).expect("a wgpu adapter (make setup installs Mesa's Vulkan drivers)")
}

#[test]
fn adam_on_the_gpu_is_the_cpu_trainer_s_adam() {
    block_on(kernel_checks::adam_on_the_gpu_is_the_cpu_trainer_s_adam(&gpu()));
}

#[test]
fn the_gpu_normalises_decoder_rows_as_the_cpu_does() {
    block_on(kernel_checks::the_gpu_normalises_decoder_rows_as_the_cpu_does(&gpu()));
}

#[test]
fn dense_products_match_the_definition_in_every_layout_and_form() {
    block_on(kernel_checks::dense_products_match_the_definition_in_every_layout_and_form(&gpu()));
}

#[test]
fn top_k_and_aux_k_select_what_the_cpu_selects() {
    block_on(kernel_checks::top_k_and_aux_k_select_what_the_cpu_selects(&gpu()));
}

fn step_config(aux_weight: f64) -> TrainConfig {
    let mut c = common::config();
    c.epochs = 1;
    // Every latent counts as dead by the first step (128 tokens seen): AuxK takes part at once.
    c.dead_after = 64;
    c.aux_weight = aux_weight;
    c
}

/// Runs one step on the CPU or the GPU and stops: returns the step's report and the checkpoint it wrote.
fn one_step(
    gpu: Option<&Gpu>,
    rows: &[f32],
    config: &TrainConfig,
    dir: &Path,
) -> (StepReport, HashMap<String, Tensor>) {
    let checkpoint = dir.join(if gpu.is_some() { "gpu.safetensors" } else { "cpu.safetensors" });
    let mut report = None;
    let stopped = train_on(gpu, rows, 32, config, Some(&checkpoint), |s| {
        report = Some(s.clone());
        false
    });
    assert!(matches!(stopped, Err(TrainError::Stopped { step: 1 })));
    (report.unwrap(), candle_core::safetensors::load(&checkpoint, &Device::Cpu).unwrap())
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()
}

#[test]
fn one_gpu_step_has_the_cpu_step_gradients() {
    let gpu = gpu();
    let rows = common::sparse_data(256, 32, 48, 99, 1);
    let dir = std::env::temp_dir().join(format!("saif-gpu-step-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for aux_weight in [1.0 / 32.0, 0.0] {
        let config = step_config(aux_weight);
        let (cpu_report, cpu) = one_step(None, &rows, &config, &dir);
        let (gpu_report, gpu_state) = one_step(Some(&gpu), &rows, &config, &dir);
        assert!((cpu_report.fvu - gpu_report.fvu).abs() < 1e-5, "FVU {} vs {}", cpu_report.fvu, gpu_report.fvu);
        assert!((cpu_report.aux_loss - gpu_report.aux_loss).abs() < 1e-4 * cpu_report.aux_loss.max(1.0));
        if aux_weight > 0.0 {
            assert!(cpu_report.aux_loss > 0.0 && cpu_report.dead == 64, "AuxK took part");
        }
        assert_eq!(flat(&cpu["last_fired"]), flat(&gpu_state["last_fired"]), "the same latents fired");
        // After one step Adam's first moment is (1 - beta1) times the gradient.
        for name in ["w_enc", "b_enc", "w_dec", "b_dec"] {
            let key = format!("adam_m.{name}");
            let (want, got) = (flat(&cpu[&key]), flat(&gpu_state[&key]));
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{name} has a gradient");
            let worst = want.iter().zip(&got).map(|(w, g)| (w - g).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-4 * scale, "gradient of {name} (aux weight {aux_weight}): off by {worst} of {scale}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_gpu_learns_the_dictionary_repeatably_and_resumes_exactly() {
    let gpu = gpu();
    common::learns_repeatably_and_resumes(Some(&gpu));
}

#[test]
fn a_gpu_run_ends_near_the_cpu_run() {
    let gpu = gpu();
    let d = 32;
    let rows = common::sparse_data(4096, d, 48, 99, 1);
    let held_out = common::sparse_data(512, d, 48, 99, 2);
    let (cpu, _) = train_on(None, &rows, d, &common::config(), None, |_| true).unwrap();
    let (on_gpu, _) = train_on(Some(&gpu), &rows, d, &common::config(), None, |_| true).unwrap();
    let (a, b) = (common::fvu(&cpu, &held_out, d), common::fvu(&on_gpu, &held_out, d));
    assert!((a - b).abs() < 0.03, "held-out FVU: CPU {a}, GPU {b}");
}

//! The SAE trainer's GPU step (crates/saif/src/train/gpu.rs and its kernels) against its CPU references, natively
//! on the machine's wgpu adapter (Mesa's lavapipe where there is no GPU): both forms of the dense product (the
//! tiled one GPUs use, the direct one CPU adapters use) against a plain triple loop, TopK/AuxK against `top_k_mask`,
//! Adam's update and the decoder's row normalisation against the CPU trainer's own, one whole step's gradients
//! against candle's autograd (read from
//! Adam's first moments in the checkpoints), and a whole run against the CPU run on data with a known answer.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use saif::train::gpu::{adam_update, dense_product, normalized_rows, top_k_rows, Matmul};
use saif::train::{top_k_mask, train_on, StepReport, TrainConfig, TrainError};
use saif_engine::block_on;
use saif_engine::gpu::Gpu;

fn gpu() -> Gpu {
    block_on(Gpu::new()).expect("a wgpu adapter (make setup installs Mesa's Vulkan drivers)")
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut next = common::generator(seed);
    (0..n).map(|_| (next() * 2.0 - 1.0) as f32).collect()
}

/// `a b` by the definition, in f64; `a` is (m x k) or, transposed, stored (k x m); likewise `b`.
fn reference_product(a: &[f32], a_t: bool, b: &[f32], b_t: bool, m: usize, k: usize, n: usize) -> Vec<f32> {
    let at = |i: usize, l: usize| if a_t { a[l * m + i] } else { a[i * k + l] } as f64;
    let bt = |l: usize, j: usize| if b_t { b[j * k + l] } else { b[l * n + j] } as f64;
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|l| at(i, l) * bt(l, j)).sum::<f64>() as f32;
        }
    }
    c
}

fn tensor(values: &[f32]) -> Tensor {
    Tensor::from_slice(values, values.len(), &Device::Cpu).unwrap()
}

fn close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tolerance * (1.0 + w.abs()), "{what}[{i}]: {g} on the GPU, {w} on the CPU");
    }
}

/// `adam.wgsl`'s update against `cpu::adam_update`, the CPU trainer's own, on random values over several steps (the
/// bias corrections differ most at the first), with moments carried over as training carries them. 1027 values:
/// not a multiple of the 256-wide workgroup.
#[test]
fn adam_on_the_gpu_is_the_cpu_trainer_s_adam() {
    let gpu = gpu();
    let n = 1027;
    let (mut param, mut m, mut v) = (values(n, 1), vec![0f32; n], vec![0f32; n]);
    for t in [1usize, 2, 3, 50] {
        let grad: Vec<f32> = values(n, 10 + t as u64).iter().map(|g| g * (t as f32)).collect();
        let [gp, gm, gv] = adam_update(&gpu, [&param, &grad, &m, &v], t, 4e-4).unwrap();
        let [cp, cm, cv] =
            saif::train::cpu::adam_update(&tensor(&param), &tensor(&grad), &tensor(&m), &tensor(&v), t, 4e-4).unwrap();
        let flat = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        close(&format!("step {t}: first moment"), &gm, &flat(&cm), 1e-6);
        close(&format!("step {t}: second moment"), &gv, &flat(&cv), 1e-6);
        close(&format!("step {t}: parameter"), &gp, &flat(&cp), 1e-6);
        assert!(gp.iter().zip(&param).any(|(a, b)| a != b), "step {t}: nothing moved");
        (param, m, v) = (gp, gm, gv);
    }
}

/// `normalize_rows` against `cpu::normalize_rows`: random rows, a row of zeros (kept at zero by the 1e-8 floor) and
/// a row far from unit norm; 300 rows, more than one workgroup.
#[test]
fn the_gpu_normalises_decoder_rows_as_the_cpu_does() {
    let gpu = gpu();
    let (rows, cols) = (300, 37);
    let mut w = values(rows * cols, 5);
    w[cols..2 * cols].iter_mut().for_each(|x| *x = 0.0);
    w[2 * cols..3 * cols].iter_mut().for_each(|x| *x *= 1000.0);
    let got = normalized_rows(&gpu, &w, rows, cols).unwrap();
    let want = saif::train::cpu::normalize_rows(&Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    close("normalised rows", &got, &want, 1e-6);
    assert!(got[cols..2 * cols].iter().all(|&x| x == 0.0), "a zero row stays zero");
    let norm = |r: usize| got[r * cols..(r + 1) * cols].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm(0) - 1.0).abs() < 1e-5 && (norm(2) - 1.0).abs() < 1e-5);
}

#[test]
fn dense_products_match_the_definition_in_every_layout_and_form() {
    let gpu = gpu();
    // Sizes that are not multiples of the tiles (64 and 32) or of the 16-deep steps, and span several tiles.
    for (m, k, n) in [(70, 37, 131), (5, 3, 2)] {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        for form in [Matmul::Tiled, Matmul::Direct] {
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let a_shape = if a_t { (k, m) } else { (m, k) };
                let b_shape = if b_t { (n, k) } else { (k, n) };
                let got = dense_product(&gpu, form, (&a, a_shape.0, a_shape.1, a_t), (&b, b_shape.0, b_shape.1, b_t))
                    .unwrap();
                let want = reference_product(&a, a_t, &b, b_t, m, k, n);
                let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{form:?} {m}x{k}x{n}, transposed A {a_t} B {b_t}: off by {worst}");
            }
        }
    }
}

#[test]
fn top_k_and_aux_k_select_what_the_cpu_selects() {
    let gpu = gpu();
    let (rows, width) = (12, 300);
    // Values on a grid of eighths, so that ties at the k-th value are common; ReLU applied.
    let mut pre: Vec<f32> = values(rows * width, 3).iter().map(|v| ((v * 8.0).round() / 8.0).max(0.0)).collect();
    // A row with fewer positive values than k, and a row with none.
    pre[width..2 * width].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 100 == 7 { 0.5 } else { 0.0 });
    pre[2 * width..3 * width].iter_mut().for_each(|v| *v = 0.0);
    let dead: Vec<bool> = values(width, 4).iter().map(|v| *v > 0.2).collect();
    for (k, aux_k) in [(5, 7), (32, 0), (1, 64)] {
        let (lat, fired) = top_k_rows(&gpu, &pre, rows, width, k, aux_k, &dead).unwrap();
        let mask = top_k_mask(&pre, rows, width, k, None);
        let aux_mask = top_k_mask(&pre, rows, width, aux_k, Some(&dead));
        let want: Vec<f32> = mask.iter().chain(&aux_mask).zip(pre.iter().chain(&pre)).map(|(m, p)| m * p).collect();
        assert_eq!(lat, want, "k {k}, aux_k {aux_k}");
        let want_fired: Vec<bool> = (0..width).map(|i| (0..rows).any(|r| mask[r * width + i] > 0.0)).collect();
        assert_eq!(fired, want_fired);
    }
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

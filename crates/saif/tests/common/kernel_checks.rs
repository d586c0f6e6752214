//! The SAE trainer's kernel checks, shared by the native tests (`gpu_training.rs`, on lavapipe where there is no GPU)
//! and the browser's (`wasm.rs`, on WebGPU in headless Chromium): both forms of the dense product against a plain
//! triple loop, TopK/AuxK against `top_k_mask`, and Adam's update and the decoder's row normalisation against the CPU
//! trainer's own functions (`saif::train::cpu`). Each is async, as a browser reads GPU memory back only once its
//! event loop runs.

use candle_core::{Device, Tensor};
use saif::train::gpu::{adam_update, dense_product, normalized_rows, top_k_rows, Matmul};
use saif::train::top_k_mask;
use saif_engine::gpu::Gpu;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut next = super::generator(seed);
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
pub async fn adam_on_the_gpu_is_the_cpu_trainer_s_adam(gpu: &Gpu) {
    // A rate far above training's 4e-4, so that each update is large next to the parameter's f32 rounding, and the
    // parameter check sees a 1e-4 relative error in the update.
    const LR: f64 = 0.05;
    let n = 1027;
    let (mut param, mut m, mut v) = (values(n, 1), vec![0f32; n], vec![0f32; n]);
    for t in [1usize, 2, 3, 50] {
        let grad: Vec<f32> = values(n, 10 + t as u64).iter().map(|g| g * (t as f32)).collect();
        let [gp, gm, gv] = adam_update(gpu, [&param, &grad, &m, &v], t, LR).await.unwrap();
        let [cp, cm, cv] =
            saif::train::cpu::adam_update(&tensor(&param), &tensor(&grad), &tensor(&m), &tensor(&v), t, LR).unwrap();
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
pub async fn the_gpu_normalises_decoder_rows_as_the_cpu_does(gpu: &Gpu) {
    let (rows, cols) = (300, 37);
    let mut w = values(rows * cols, 5);
    w[cols..2 * cols].iter_mut().for_each(|x| *x = 0.0);
    w[2 * cols..3 * cols].iter_mut().for_each(|x| *x *= 1000.0);
    let got = normalized_rows(gpu, &w, rows, cols).await.unwrap();
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

pub async fn dense_products_match_the_definition_in_every_layout_and_form(gpu: &Gpu) {
    // Sizes that are not multiples of the tiles (64 and 32) or of the 16-deep steps, and span several tiles.
    for (m, k, n) in [(70, 37, 131), (5, 3, 2)] {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        for form in [Matmul::Tiled, Matmul::Direct] {
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let a_shape = if a_t { (k, m) } else { (m, k) };
                let b_shape = if b_t { (n, k) } else { (k, n) };
                let got = dense_product(gpu, form, (&a, a_shape.0, a_shape.1, a_t), (&b, b_shape.0, b_shape.1, b_t))
                    .await
                    .unwrap();
                let want = reference_product(&a, a_t, &b, b_t, m, k, n);
                let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{form:?} {m}x{k}x{n}, transposed A {a_t} B {b_t}: off by {worst}");
            }
        }
    }
}

pub async fn top_k_and_aux_k_select_what_the_cpu_selects(gpu: &Gpu) {
    let (rows, width) = (12, 300);
    // Values on a grid of eighths, so that ties at the k-th value are common; ReLU applied.
    let mut pre: Vec<f32> = values(rows * width, 3).iter().map(|v| ((v * 8.0).round() / 8.0).max(0.0)).collect();
    // A row with fewer positive values than k, and a row with none.
    pre[width..2 * width].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 100 == 7 { 0.5 } else { 0.0 });
    pre[2 * width..3 * width].iter_mut().for_each(|v| *v = 0.0);
    let dead: Vec<bool> = values(width, 4).iter().map(|v| *v > 0.2).collect();
    for (k, aux_k) in [(5, 7), (32, 0), (1, 64)] {
        let (lat, fired) = top_k_rows(gpu, &pre, rows, width, k, aux_k, &dead).await.unwrap();
        let mask = top_k_mask(&pre, rows, width, k, None);
        let aux_mask = top_k_mask(&pre, rows, width, aux_k, Some(&dead));
        let want: Vec<f32> = mask.iter().chain(&aux_mask).zip(pre.iter().chain(&pre)).map(|(m, p)| m * p).collect();
        assert_eq!(lat, want, "k {k}, aux_k {aux_k}");
        let want_fired: Vec<bool> = (0..width).map(|i| (0..rows).any(|r| mask[r * width + i] > 0.0)).collect();
        assert_eq!(fired, want_fired);
    }
}

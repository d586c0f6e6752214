//! Each WGSL kernel against its CPU twin on random inputs: every quantization, odd sizes, sizes that are not a
//! multiple of the workgroup. Written once as async functions and run natively (tests/gpu_kernels.rs, lavapipe
//! where there is no GPU) and in headless Chromium (tests/wasm.rs, WebGPU on SwiftShader).
#![allow(dead_code)]

use bytemuck::Pod;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use saif_engine::gpu::kernels::*;
use saif_engine::gpu::weights::GpuMatrix;
use saif_engine::gpu::Gpu;
use saif_engine::quant::QuantMatrix;
use saif_engine::sampler::{pick, Sampling};

/// Deterministic pseudo-random values in [-1, 1).
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tolerance * (1.0 + w.abs()), "{what}: value {i}: GPU {g} vs CPU {w}");
    }
}

fn uniform<T: Pod>(gpu: &Gpu, value: &T) -> wgpu::Buffer {
    gpu.uniform_with("test params", bytemuck::bytes_of(value))
}

fn step(gpu: &Gpu, tokens: u32, start: u32) -> wgpu::Buffer {
    uniform(gpu, &StepParams { tokens, start, pad: [0; 2] })
}

fn floats(gpu: &Gpu, values: &[f32]) -> wgpu::Buffer {
    gpu.storage_with("test values", bytemuck::cast_slice(values))
}

/// Runs `kernel` once over `groups` workgroups.
fn dispatch(gpu: &Gpu, kernel: &Kernel, buffers: &[&wgpu::Buffer], groups: [u32; 3]) {
    let bind = kernel.bind(gpu, buffers);
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(kernel.pipeline());
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }
    gpu.queue.submit([encoder.finish()]);
}

async fn read(gpu: &Gpu, buffer: &wgpu::Buffer, count: usize) -> Vec<f32> {
    let staging = gpu.readback("test read", (count * 4) as u64);
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, (count * 4) as u64);
    gpu.queue.submit([encoder.finish()]);
    gpu.read_f32(&staging, count).await.unwrap()
}

/// The rows of `tokens` consecutive tokens of one sequence from position `start`, its cache from row `first`.
fn token_rows(gpu: &Gpu, first: u32, start: u32, tokens: u32) -> wgpu::Buffer {
    rows_of(gpu, &TokenRow::of_call(first, start, tokens))
}

fn rows_of(gpu: &Gpu, rows: &[TokenRow]) -> wgpu::Buffer {
    gpu.storage_with("token rows", bytemuck::cast_slice(rows))
}

/// The forms of the KV cache `gpu` can hold: f32, f16 packed two to a word, and f16 where it has `shader-f16`.
fn cache_forms(gpu: &Gpu) -> Vec<CacheForm> {
    let mut forms = vec![CacheForm::F32, CacheForm::PackedF16];
    if gpu.shader_f16 {
        forms.push(CacheForm::F16);
    }
    forms
}

/// `x` as a cache of `form` keeps it: rounded to the nearest f16 (ties to even) for the f16 forms.
fn as_cached(x: f32, form: CacheForm) -> f32 {
    match form {
        CacheForm::F32 => x,
        CacheForm::F16 | CacheForm::PackedF16 => half::f16::from_f32(x).to_f32(),
    }
}

/// A cache buffer of `form` holding `values` (both f16 forms hold f16's bytes).
fn cache_buffer(gpu: &Gpu, values: &[f32], form: CacheForm) -> wgpu::Buffer {
    match form {
        CacheForm::F32 => floats(gpu, values),
        CacheForm::F16 | CacheForm::PackedF16 => {
            let halves: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
            gpu.storage_with("test cache", bytemuck::cast_slice(&halves))
        }
    }
}

/// The first `count` values of a cache buffer of `form`, widened to f32.
async fn read_cache(gpu: &Gpu, buffer: &wgpu::Buffer, count: usize, form: CacheForm) -> Vec<f32> {
    if form == CacheForm::F32 {
        return read(gpu, buffer, count).await;
    }
    let bytes = (count * 2) as u64;
    let staging = gpu.readback("test read", bytes);
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    gpu.queue.submit([encoder.finish()]);
    let raw = gpu.read(&staging, bytes).await.unwrap();
    raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

/// `assert_close` for values a cache of `form` holds: each GPU value is what the cache makes of a value within the
/// tolerance of the CPU's (for f16, one of the f16 values that bracket that interval, as rounding either end gives).
fn assert_close_as_cached(got: &[f32], want: &[f32], tolerance: f32, form: CacheForm, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = tolerance * (1.0 + w.abs());
        let (low, high) = (as_cached(w - e, form), as_cached(w + e, form));
        assert!(low <= g && g <= high, "{what}: value {i}: GPU {g} vs CPU {w} ({form:?} cache)");
    }
}

fn quantized(rows: usize, cols: usize, dtype: GgmlDType, seed: u64) -> QTensor {
    let w = Tensor::from_vec(noise(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    QTensor::quantize(&w, dtype).unwrap()
}

/// Runs the matrix product of `m` with `tokens` rows of `x` through every part of `m`.
async fn gpu_matmul(
    gpu: &Gpu,
    kernels: &Kernels,
    m: &GpuMatrix,
    x: &[f32],
    tokens: usize,
    last_only: bool,
    start: usize,
) -> Vec<f32> {
    gpu_product(gpu, kernels, m, x, tokens, last_only, start, Epilogue::Store, None).await
}

/// `epilogue(m x)` for `tokens` rows of `x`, into an output that starts as `y0` (zeros if `None`).
#[allow(clippy::too_many_arguments)]
async fn gpu_product(
    gpu: &Gpu,
    kernels: &Kernels,
    m: &GpuMatrix,
    x: &[f32],
    tokens: usize,
    last_only: bool,
    start: usize,
    epilogue: Epilogue,
    y0: Option<&[f32]>,
) -> Vec<f32> {
    gpu_product_of(gpu, kernels, m, x, tokens, last_only, start, epilogue, y0, None).await
}

/// How a test dispatches a matrix product over every part of `m`.
struct PartsCall<'a> {
    kernel: &'a Kernel,
    epilogue: Epilogue,
    start: usize,
    last_only: bool,
    eps: f32,
    /// `MatmulParams::add` (matmul_input_add_norm.wgsl).
    add: bool,
    /// Whether part 0 writes h (`MatmulParams::write_sum`).
    write_sum: bool,
    /// The embedding table's bytes per row and scale (matmul_input_embed_norm.wgsl).
    table: (u32, f32),
    /// Workgroups along z.
    tiles: u32,
}

/// Dispatches `call.kernel` over every part of `m`, each bound to its blocks, then `buffers` (the input, the output
/// and what the kernel reads after them), its `MatmulParams` and the step block `s`.
fn dispatch_parts(gpu: &Gpu, m: &GpuMatrix, call: PartsCall, buffers: &[&wgpu::Buffer], s: &wgpu::Buffer) {
    let per_output = call.epilogue.weight_rows_per_output();
    let mut first_group = 0;
    for (index, part) in m.parts.iter().enumerate() {
        let rows = (part.rows / per_output) as u32;
        let (gx, gy) = split_groups(rows.div_ceil(matmul_rows_per_group(gpu)));
        let p = uniform(
            gpu,
            &MatmulParams {
                rows,
                cols: m.cols as u32,
                row_bytes: m.row_bytes as u32,
                out_stride: (m.rows / per_output) as u32,
                out_col: part.first_row as u32,
                at_position: (call.start > 0) as u32,
                last_only: call.last_only as u32,
                groups_x: gx,
                eps: call.eps,
                add: call.add as u32,
                write_sum: (call.write_sum && index == 0) as u32,
                table_row_bytes: call.table.0,
                table_scale: call.table.1,
                first_group,
                pad: [0; 2],
            },
        );
        first_group += rows.div_ceil(matmul_rows_per_group(gpu));
        let mut all = vec![&part.buffer];
        all.extend(buffers);
        all.extend([&p, s]);
        dispatch(gpu, call.kernel, &all, [gx, gy, call.tiles]);
    }
}

/// As `gpu_product`, with `norm` (weights, epsilon) the product that normalizes its input rows itself.
#[allow(clippy::too_many_arguments)]
async fn gpu_product_of(
    gpu: &Gpu,
    kernels: &Kernels,
    m: &GpuMatrix,
    x: &[f32],
    tokens: usize,
    last_only: bool,
    start: usize,
    epilogue: Epilogue,
    y0: Option<&[f32]>,
    norm: Option<(&[f32], f32)>,
) -> Vec<f32> {
    let out_rows = if last_only { 1 } else { start + tokens };
    let width = m.rows / epilogue.weight_rows_per_output();
    let y = match y0 {
        Some(values) => floats(gpu, values),
        None => gpu.storage("y", (out_rows * width * 4) as u64),
    };
    let xb = floats(gpu, x);
    let s = step(gpu, tokens as u32, start as u32);
    let inputs = if last_only { 1 } else { tokens as u32 };
    // The normalizing product takes one token per workgroup.
    let tiled = inputs > 1 && norm.is_none();
    let tile = if tiled { PREFILL_TILE } else { 1 };
    let (pair, normalized);
    let kernel: &Kernel = match norm {
        None => {
            pair = kernels.matmul(gpu, m.dtype, epilogue).unwrap();
            pair.pick(tiled)
        }
        Some(_) => {
            normalized = kernels.normalized_matmul(gpu, m.dtype, epilogue, m.cols, NormalizedInput::Norm).unwrap();
            &normalized
        }
    };
    let norm_weights = norm.map(|(w, _)| floats(gpu, w));
    let mut buffers = vec![&xb, &y];
    buffers.extend(&norm_weights);
    let eps = norm.map_or(0.0, |n| n.1);
    let tiles = inputs.div_ceil(tile);
    let (add, write_sum, table) = (false, false, (0, 1.0));
    let call = PartsCall { kernel, epilogue, start, last_only, eps, add, write_sum, table, tiles };
    dispatch_parts(gpu, m, call, &buffers, &s);
    read(gpu, &y, out_rows * width).await
}

pub async fn matmul_matches_cpu_for_every_type(gpu: &Gpu) {
    for dtype in saif_engine::gguf::SUPPORTED_TYPES {
        let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K);
        // 37, 70 and 19 rows: none a multiple of a workgroup's rows (64 a thread per row, 4 cooperative); 96
        // columns: 3 chunks, fewer than the 16 lanes of the cooperative form; 1280: 40 chunks, so lanes get 2 or 3.
        for (rows, cols) in [(37, if k_quant { 256 } else { 96 }), (70, 512), (19, 1280)] {
            let q = quantized(rows, cols, dtype, rows as u64 + cols as u64);
            let data = q.data().unwrap().to_vec();
            let m = GpuMatrix::upload(gpu, "w", dtype, rows, cols, &data).unwrap();
            let cpu = QuantMatrix::new("w", std::sync::Arc::new(q)).unwrap();
            let kernels = Kernels::new(gpu, &[dtype]).unwrap();
            for tokens in [1, 3, 9] {
                let x = noise(tokens * cols, 7 + tokens as u64);
                let got = gpu_matmul(gpu, &kernels, &m, &x, tokens, false, 0).await;
                let want = cpu.matmul(&x).unwrap();
                assert_close(&got, &want, 1e-4, &format!("matmul {dtype:?} {rows}x{cols}, {tokens} tokens"));
            }
            // The last input row only (the LM head while decoding).
            let x = noise(3 * cols, 99);
            let got = gpu_matmul(gpu, &kernels, &m, &x, 3, true, 0).await;
            let want = cpu.matmul(&x[2 * cols..]).unwrap();
            assert_close(&got, &want, 1e-4, &format!("matmul {dtype:?} last row"));
        }
    }
}

/// A matrix split over several buffers (as Gemma 3's 178 MB embedding is on devices with a 128 MiB binding):
/// products and lookups give what one buffer gives.
pub async fn split_matrices_give_the_same_products(gpu: &Gpu) {
    let (rows, cols, dtype) = (203, 64, GgmlDType::Q8_0);
    let q = quantized(rows, cols, dtype, 5);
    let data = q.data().unwrap().to_vec();
    let row_bytes = cols / 32 * 34;
    let split = GpuMatrix::upload_with_limit(gpu, "w", dtype, rows, cols, &data, 70 * row_bytes + 4).unwrap();
    assert_eq!(split.parts.len(), 3);
    let whole = GpuMatrix::upload(gpu, "w", dtype, rows, cols, &data).unwrap();
    assert_eq!(whole.parts.len(), 1);
    let kernels = Kernels::new(gpu, &[dtype]).unwrap();
    let x = noise(2 * cols, 3);
    let a = gpu_matmul(gpu, &kernels, &split, &x, 2, false, 0).await;
    let b = gpu_matmul(gpu, &kernels, &whole, &x, 2, false, 0).await;
    assert_close(&a, &b, 0.0, "split product");
    let tokens = [0u32, 69, 70, 140, 202];
    let a = gpu_embed(gpu, &kernels, &split, &tokens, 1.0).await;
    let b = gpu_embed(gpu, &kernels, &whole, &tokens, 1.0).await;
    assert_close(&a, &b, 0.0, "split lookup");
}

/// The products' epilogues against their CPU twins: a residual add (y + W x) and the gated MLP
/// (act(W_gate x) * (W_up x)) over the gate's and the up product's rows stacked in one matrix.
pub async fn fused_products_match_cpu(gpu: &Gpu) {
    let kernels = Kernels::new(gpu, &[]).unwrap();
    let dev = Device::Cpu;
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        // 37 rows: not a multiple of a workgroup's rows; 1280 columns: 40 chunks, unequal shares for 16 lanes.
        let (rows, cols) = (37, if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { 256 } else { 1280 });
        let gate = quantized(rows, cols, dtype, 51);
        let up = quantized(rows, cols, dtype, 52);
        let mut stacked = gate.data().unwrap().to_vec();
        stacked.extend_from_slice(&up.data().unwrap());
        let gate_up = GpuMatrix::upload(gpu, "gate + up", dtype, 2 * rows, cols, &stacked).unwrap();
        let gate_gpu = GpuMatrix::upload(gpu, "gate", dtype, rows, cols, &gate.data().unwrap()).unwrap();
        let gate = QuantMatrix::new("gate", std::sync::Arc::new(gate)).unwrap();
        let up = QuantMatrix::new("up", std::sync::Arc::new(up)).unwrap();
        for tokens in [1, 9] {
            let x = noise(tokens * cols, 53 + tokens as u64);
            let g = gate.matmul(&x).unwrap();
            let u = up.matmul(&x).unwrap();
            let gt = Tensor::from_vec(g.clone(), g.len(), &dev).unwrap();
            for (act, activated) in
                [(GluActivation::Gelu, gt.gelu().unwrap()), (GluActivation::Silu, gt.silu().unwrap())]
            {
                let want: Vec<f32> = activated.to_vec1::<f32>().unwrap().iter().zip(&u).map(|(a, b)| a * b).collect();
                let got = gpu_product(gpu, &kernels, &gate_up, &x, tokens, false, 0, Epilogue::Glu(act), None).await;
                assert_close(&got, &want, 1e-4, &format!("{act:?} product {dtype:?}, {tokens} tokens"));
            }
            let y0 = noise(tokens * rows, 54);
            let want: Vec<f32> = y0.iter().zip(&g).map(|(a, b)| a + b).collect();
            let got =
                gpu_product(gpu, &kernels, &gate_gpu, &x, tokens, false, 0, Epilogue::Accumulate, Some(&y0)).await;
            assert_close(&got, &want, 1e-4, &format!("accumulating product {dtype:?}, {tokens} tokens"));
        }
    }
}

/// Weight types for the normalized products' test: a plain one, two block types and two K-quants.
pub const NORMALIZED_TYPES: [GgmlDType; 5] =
    [GgmlDType::F32, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K];

/// Products that take the RMSNorm of their input themselves (one-token decoding steps) against the norm's
/// dispatch followed by the plain product, bit for bit, for every epilogue and for the last row only (the LM head);
/// and against the CPU's norm and product.
pub async fn normalized_products_equal_norm_then_product(gpu: &Gpu, types: &[GgmlDType]) {
    let kernels = Kernels::new(gpu, &[]).unwrap();
    let eps = 1e-6f32;
    for &dtype in types {
        // 37 rows: not a multiple of a workgroup's rows; 576 columns as SmolLM2's residual (18 chunks, unequal
        // shares for 16 lanes), 512 for the K-quants' 256-value blocks.
        let (rows, cols) = (37, if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { 512 } else { 576 });
        let gate = quantized(rows, cols, dtype, 81);
        let up = quantized(rows, cols, dtype, 82);
        let mut stacked = gate.data().unwrap().to_vec();
        stacked.extend_from_slice(&up.data().unwrap());
        let gate_up = GpuMatrix::upload(gpu, "gate + up", dtype, 2 * rows, cols, &stacked).unwrap();
        let gate_gpu = GpuMatrix::upload(gpu, "gate", dtype, rows, cols, &gate.data().unwrap()).unwrap();
        let gate_cpu = QuantMatrix::new("gate", std::sync::Arc::new(gate)).unwrap();
        let weights = noise(cols, 83);
        for tokens in [1usize, 3] {
            // Scaled up so that the norm matters.
            let x: Vec<f32> = noise(tokens * cols, 84 + tokens as u64).iter().map(|v| v * 7.0).collect();
            // The norm's dispatch, as a several-token call runs it.
            let normed_buffer = gpu.storage("normed", (tokens * cols * 4) as u64);
            let p = uniform(gpu, &NormParams { width: cols as u32, last_only: 0, eps, pad: 0 });
            let buffers = [&floats(gpu, &x), &normed_buffer, &floats(gpu, &weights), &p, &step(gpu, tokens as u32, 0)];
            dispatch(gpu, &kernels.norm, &buffers, [tokens as u32, 1, 1]);
            let normed = read(gpu, &normed_buffer, tokens * cols).await;
            let y0 = noise(tokens * rows, 85);
            let epilogues = [
                (Epilogue::Store, &gate_gpu, None),
                (Epilogue::Accumulate, &gate_gpu, Some(&y0[..])),
                (Epilogue::Glu(GluActivation::Gelu), &gate_up, None),
                (Epilogue::Glu(GluActivation::Silu), &gate_up, None),
            ];
            for (epilogue, m, y0) in epilogues {
                for last_only in [false, true] {
                    if last_only && epilogue != Epilogue::Store {
                        continue;
                    }
                    let what = format!("{epilogue:?} {dtype:?}, {tokens} tokens, last only {last_only}");
                    let y0 = if last_only { None } else { y0 };
                    let want = gpu_product_of(gpu, &kernels, m, &normed, tokens, last_only, 0, epilogue, y0, None);
                    let want = want.await;
                    let norm = Some((&weights[..], eps));
                    let got = gpu_product_of(gpu, &kernels, m, &x, tokens, last_only, 0, epilogue, y0, norm).await;
                    assert_eq!(got, want, "{what}");
                }
            }
            // Against the CPU: the norm and the product.
            let normed_cpu: Vec<f32> = x.chunks(cols).flat_map(|r| rms_norm_cpu(r, &weights, eps)).collect();
            let want = gate_cpu.matmul(&normed_cpu).unwrap();
            let norm = Some((&weights[..], eps));
            let got = gpu_product_of(gpu, &kernels, &gate_gpu, &x, tokens, false, 0, Epilogue::Store, None, norm).await;
            assert_close(&got, &want, 1e-4, &format!("against the CPU, {dtype:?}, {tokens} tokens"));
        }
    }
}

/// The one-token product whose input is `norm(h + post_norm(o))` (`o` and `post` given) or `norm(h)`
/// (matmul_input_add_norm.wgsl), into an output that starts as `y0`: the product and the sum it writes.
#[allow(clippy::too_many_arguments)]
async fn gpu_add_norm_product(
    gpu: &Gpu,
    kernels: &Kernels,
    m: &GpuMatrix,
    h: &[f32],
    added: Option<(&[f32], &[f32])>,
    (weights, eps): (&[f32], f32),
    epilogue: Epilogue,
    y0: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let width = m.rows / epilogue.weight_rows_per_output();
    let y = match y0 {
        Some(values) => floats(gpu, values),
        None => gpu.storage("y", (width * 4) as u64),
    };
    let sum = gpu.storage("sum", (m.cols * 4) as u64);
    let s = step(gpu, 1, 0);
    let kernel = kernels.normalized_matmul(gpu, m.dtype, epilogue, m.cols, NormalizedInput::AddNorm).unwrap();
    let (hb, wb) = (floats(gpu, h), floats(gpu, weights));
    let (ob, pb) = match added {
        Some((o, post)) => (floats(gpu, o), floats(gpu, post)),
        None => (floats(gpu, weights), floats(gpu, weights)),
    };
    let call = PartsCall {
        kernel: &kernel,
        epilogue,
        start: 0,
        last_only: false,
        eps,
        add: added.is_some(),
        write_sum: true,
        table: (0, 1.0),
        tiles: 1,
    };
    dispatch_parts(gpu, m, call, &[&hb, &y, &wb, &ob, &pb, &sum], &s);
    (read(gpu, &y, width).await, read(gpu, &sum, m.cols).await)
}

/// The products that take Gemma's residual add and the next norm themselves (one-token calls) equal, bit for
/// bit, the dispatches they replace: norm_add_norm (the sum and its norm), then the product of the norm's output;
/// and without an output to add, the norm's dispatch then the product, with the sum h itself. And the sum and the
/// product against the CPU's norms and product.
pub async fn add_norm_products_equal_norm_add_then_product(gpu: &Gpu, types: &[GgmlDType]) {
    let kernels = Kernels::new(gpu, &[]).unwrap();
    let eps = 1e-6f32;
    for &dtype in types {
        // 37 rows, not a multiple of a workgroup's; 640 columns as Gemma 3 270M's residual (20 chunks), 512 for the
        // K-quants' 256-value blocks.
        let (rows, cols) = (37, if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { 512 } else { 640 });
        let gate = quantized(rows, cols, dtype, 91);
        let mut stacked = gate.data().unwrap().to_vec();
        stacked.extend_from_slice(&quantized(rows, cols, dtype, 92).data().unwrap());
        let gate_up = GpuMatrix::upload(gpu, "gate + up", dtype, 2 * rows, cols, &stacked).unwrap();
        let gate_gpu = GpuMatrix::upload(gpu, "gate", dtype, rows, cols, &gate.data().unwrap()).unwrap();
        let gate_cpu = QuantMatrix::new("gate", std::sync::Arc::new(gate)).unwrap();
        let gate = &gate_gpu;
        // Scaled so that both norms matter.
        let h: Vec<f32> = noise(cols, 93).iter().map(|v| v * 5.0).collect();
        let o: Vec<f32> = noise(cols, 94).iter().map(|v| v * 30.0).collect();
        let (post, weights) = (noise(cols, 95), noise(cols, 96));
        let s = step(gpu, 1, 0);
        let p = uniform(gpu, &NormParams { width: cols as u32, last_only: 0, eps, pad: 0 });

        // The dispatches a call of several tokens runs: norm_add_norm, and the norm alone.
        let (sum_buffer, normed_buffer) = (floats(gpu, &h), gpu.storage("normed", (cols * 4) as u64));
        let buffers =
            [&floats(gpu, &o), &sum_buffer, &floats(gpu, &post), &normed_buffer, &floats(gpu, &weights), &p, &s];
        dispatch(gpu, &kernels.norm_add_norm, &buffers, [1, 1, 1]);
        let (sum, normed_sum) = (read(gpu, &sum_buffer, cols).await, read(gpu, &normed_buffer, cols).await);
        let normed_buffer = gpu.storage("normed", (cols * 4) as u64);
        let buffers = [&floats(gpu, &h), &normed_buffer, &floats(gpu, &weights), &p, &s];
        dispatch(gpu, &kernels.norm, &buffers, [1, 1, 1]);
        let normed_h = read(gpu, &normed_buffer, cols).await;
        // The sum is h plus something that is not small: the add is not lost.
        assert!(sum.iter().zip(&h).any(|(a, b)| (a - b).abs() > 0.1), "{dtype:?}: the sum moved h");

        let y0 = noise(rows, 97);
        let epilogues = [
            (Epilogue::Store, gate, None),
            (Epilogue::Accumulate, gate, Some(&y0[..])),
            (Epilogue::Glu(GluActivation::Gelu), &gate_up, None),
            (Epilogue::Glu(GluActivation::Silu), &gate_up, None),
        ];
        for (epilogue, m, y0) in epilogues {
            for add in [true, false] {
                let what = format!("{epilogue:?} {dtype:?}, with the add {add}");
                let (want_sum, normed) = if add { (&sum, &normed_sum) } else { (&h, &normed_h) };
                let want = gpu_product_of(gpu, &kernels, m, normed, 1, false, 0, epilogue, y0, None).await;
                let added = add.then_some((&o[..], &post[..]));
                let (got, got_sum) =
                    gpu_add_norm_product(gpu, &kernels, m, &h, added, (&weights, eps), epilogue, y0).await;
                assert_eq!(&got_sum, want_sum, "{what}: the sum");
                assert_eq!(got, want, "{what}: the product");
            }
        }
        // Against the CPU: the sum, its norm and the product.
        let added = (&o[..], &post[..]);
        let (got, got_sum) =
            gpu_add_norm_product(gpu, &kernels, gate, &h, Some(added), (&weights, eps), Epilogue::Store, None).await;
        let sum_cpu: Vec<f32> = h.iter().zip(rms_norm_cpu(&o, &post, eps)).map(|(a, b)| a + b).collect();
        assert_close(&got_sum, &sum_cpu, 1e-5, &format!("the sum against the CPU, {dtype:?}"));
        let want = gate_cpu.matmul(&rms_norm_cpu(&sum_cpu, &weights, eps)).unwrap();
        assert_close(&got, &want, 1e-4, &format!("the product against the CPU, {dtype:?}"));
    }
}

/// The product of `m` with the RMSNorm (`weights`, `eps`) of `table`'s row `token` times `scale`, looked up by the
/// product itself (matmul_input_embed_norm.wgsl), and h after it (starting as `h0`; part 0 writes the row there
/// with `writes_h`).
#[allow(clippy::too_many_arguments)]
async fn gpu_embed_norm_product(
    gpu: &Gpu,
    kernels: &Kernels,
    m: &GpuMatrix,
    table: &GpuMatrix,
    token: u32,
    scale: f32,
    (weights, eps): (&[f32], f32),
    writes_h: bool,
    h0: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let y = gpu.storage("y", (m.rows * 4) as u64);
    let h = floats(gpu, h0);
    let s = step(gpu, 1, 0);
    let input = NormalizedInput::EmbedNorm(table.dtype);
    let kernel = kernels.normalized_matmul(gpu, m.dtype, Epilogue::Store, m.cols, input).unwrap();
    let (wb, tokens) = (floats(gpu, weights), gpu.storage_with("tokens", bytemuck::bytes_of(&token)));
    let call = PartsCall {
        kernel: &kernel,
        epilogue: Epilogue::Store,
        start: 0,
        last_only: false,
        eps,
        add: false,
        write_sum: writes_h,
        table: (table.row_bytes as u32, scale),
        tiles: 1,
    };
    dispatch_parts(gpu, m, call, &[&y, &wb, &table.parts[0].buffer, &tokens, &h], &s);
    (read(gpu, &y, m.rows).await, read(gpu, &h, m.cols).await)
}

/// The first layer's products that look the token's embedding up themselves (one-token calls) equal, bit for bit,
/// the dispatches they replace: the embedding lookup, then the product that takes the norm itself; h holds the
/// row afterwards exactly where the product is told to write it. And the product against the CPU's. Every table
/// type with each product type in `types`.
pub async fn embed_norm_products_equal_embed_then_norm_product(gpu: &Gpu, types: &[GgmlDType]) {
    let eps = 1e-5f32;
    // The last row and a middle one, of a table of 41; Gemma's scale and none.
    let (table_rows, token_scales) = (41, [(40u32, 25.3f32), (17, 1.0)]);
    for &dtype in types {
        // 37 rows, not a multiple of a workgroup's; 576 columns as SmolLM2's residual, 512 for the K-quants.
        let k_quant = |t: GgmlDType| matches!(t, GgmlDType::Q4K | GgmlDType::Q6K);
        for table_type in saif_engine::gguf::SUPPORTED_TYPES {
            let cols = if k_quant(dtype) || k_quant(table_type) { 512 } else { 576 };
            let q = quantized(37, cols, dtype, 61);
            let m = GpuMatrix::upload(gpu, "m", dtype, 37, cols, &q.data().unwrap()).unwrap();
            let m_cpu = QuantMatrix::new("m", std::sync::Arc::new(q)).unwrap();
            let t = quantized(table_rows, cols, table_type, 62);
            let table = GpuMatrix::upload(gpu, "table", table_type, table_rows, cols, &t.data().unwrap()).unwrap();
            let table_cpu = QuantMatrix::new("table", std::sync::Arc::new(t)).unwrap();
            let kernels = Kernels::new(gpu, &[table_type]).unwrap();
            let weights = noise(cols, 63);
            let h0 = noise(cols, 64);
            for (token, scale) in token_scales {
                let what = format!("{dtype:?} product, {table_type:?} table, token {token}");
                let row = gpu_embed(gpu, &kernels, &table, &[token], scale).await;
                let want =
                    gpu_product_of(gpu, &kernels, &m, &row, 1, false, 0, Epilogue::Store, None, Some((&weights, eps)))
                        .await;
                for writes_h in [true, false] {
                    let (got, h) =
                        gpu_embed_norm_product(gpu, &kernels, &m, &table, token, scale, (&weights, eps), writes_h, &h0)
                            .await;
                    assert_eq!(got, want, "{what}: the product");
                    assert_eq!(&h, if writes_h { &row } else { &h0 }, "{what}: h, written {writes_h}");
                }
                let mut row_cpu = vec![0f32; cols];
                table_cpu.dequantize_rows(token as usize, &mut row_cpu).unwrap();
                let row_cpu: Vec<f32> = row_cpu.iter().map(|v| v * scale).collect();
                let want_cpu = m_cpu.matmul(&rms_norm_cpu(&row_cpu, &weights, eps)).unwrap();
                let (got, _) =
                    gpu_embed_norm_product(gpu, &kernels, &m, &table, token, scale, (&weights, eps), true, &h0).await;
                assert_close(&got, &want_cpu, 1e-4, &format!("{what}: against the CPU"));
            }
        }
    }
}

/// `m x` for one input row `x` by a product that keeps each workgroup's largest sum (matmul_largest.wgsl), taking
/// the RMSNorm (`norm`: weights, epsilon) itself where given: the logits, and the token `pick_largest` picks from
/// the largest sums.
async fn gpu_greedy_head(
    gpu: &Gpu,
    kernels: &Kernels,
    m: &GpuMatrix,
    x: &[f32],
    norm: Option<(&[f32], f32)>,
) -> (Vec<f32>, u32) {
    let epilogue = Epilogue::StoreKeepingLargest;
    let slots: usize = m.parts.iter().map(|p| p.rows.div_ceil(matmul_rows_per_group(gpu) as usize)).sum();
    let (y, largest) = (gpu.storage("y", (m.rows * 4) as u64), gpu.storage("largest", (slots * 8) as u64));
    let (xb, s) = (floats(gpu, x), step(gpu, 1, 0));
    let (pair, normalized);
    let kernel: &Kernel = match norm {
        None => {
            pair = kernels.matmul(gpu, m.dtype, epilogue).unwrap();
            pair.pick(false)
        }
        Some(_) => {
            normalized = kernels.normalized_matmul(gpu, m.dtype, epilogue, m.cols, NormalizedInput::Norm).unwrap();
            &normalized
        }
    };
    let norm_weights = norm.map(|(w, _)| floats(gpu, w));
    let mut buffers = vec![&xb, &y];
    buffers.extend(&norm_weights);
    buffers.push(&largest);
    let eps = norm.map_or(0.0, |n| n.1);
    let call = PartsCall {
        kernel,
        epilogue,
        start: 0,
        last_only: false,
        eps,
        add: false,
        write_sum: false,
        table: (0, 1.0),
        tiles: 1,
    };
    dispatch_parts(gpu, m, call, &buffers, &s);
    let staging = gpu.readback("test read", (slots * 8) as u64);
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(&largest, 0, &staging, 0, (slots * 8) as u64);
    gpu.queue.submit([encoder.finish()]);
    let bytes = gpu.read(&staging, (slots * 8) as u64).await.unwrap();
    let pairs: Vec<u32> = bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
    (read(gpu, &y, m.rows).await, saif_engine::gpu::model::pick_largest(&pairs))
}

/// An LM head that keeps each workgroup's largest logit for a greedy pick writes the plain product's logits, bit for
/// bit, and `pick_largest` picks `sampler::argmax` of them: the maximum tied between rows of one workgroup and of
/// two, a NaN logit before it, rows over three buffers, every logit negative, and every logit -inf (argmax's 0).
/// With and without the norm taken inside the product.
pub async fn largest_products_pick_as_argmax(gpu: &Gpu) {
    let kernels = Kernels::new(gpu, &[]).unwrap();
    let (rows, cols, eps) = (150, 64, 1e-5f32);
    let x: Vec<f32> = noise(cols, 71).iter().map(|v| v.abs() + 0.1).collect();
    let norm = noise(cols, 72).iter().map(|v| v.abs() + 0.1).collect::<Vec<f32>>();
    let mut weights = noise(rows * cols, 73);
    // Rows 9, 11 and 140 (one workgroup of 64 rows, and another; several of 4) are one large row.
    let top: Vec<f32> = noise(cols, 74).iter().map(|v| v.abs() * 4.0).collect();
    for r in [9, 11, 140] {
        weights[r * cols..(r + 1) * cols].copy_from_slice(&top);
    }
    weights[2 * cols] = f32::NAN;
    // Every logit negative (the keys of negative numbers run the other way), the largest at rows 77 and 120 (for
    // any positive input); and every logit -inf.
    let mut negative: Vec<f32> = weights.iter().map(|w| -w.abs() - 1.0).collect();
    let small: Vec<f32> = top.iter().map(|v| -v * 0.001).collect();
    for r in [77, 120] {
        negative[r * cols..(r + 1) * cols].copy_from_slice(&small);
    }
    let all_minus_infinity = vec![f32::NEG_INFINITY; rows * cols];
    for (values, want) in [(&weights, 9), (&negative, 77), (&all_minus_infinity, 0)] {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        // Three buffers of at most 60 rows.
        let m =
            GpuMatrix::upload_with_limit(gpu, "head", GgmlDType::F32, rows, cols, bytes, 60 * cols * 4 + 4).unwrap();
        assert_eq!(m.parts.len(), 3);
        for taken_norm in [None, Some((&norm[..], eps))] {
            let what = format!("want {want}, norm inside {}", taken_norm.is_some());
            let plain = match taken_norm {
                None => gpu_matmul(gpu, &kernels, &m, &x, 1, false, 0).await,
                Some(n) => gpu_product_of(gpu, &kernels, &m, &x, 1, false, 0, Epilogue::Store, None, Some(n)).await,
            };
            let (logits, token) = gpu_greedy_head(gpu, &kernels, &m, &x, taken_norm).await;
            assert_eq!(
                logits.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{what}: the logits"
            );
            assert_eq!(token, saif_engine::sampler::argmax(&logits), "{what}: argmax");
            assert_eq!(token, want, "{what}");
        }
    }
}

async fn gpu_embed(gpu: &Gpu, kernels: &Kernels, m: &GpuMatrix, tokens: &[u32], scale: f32) -> Vec<f32> {
    let h = gpu.storage("h", (tokens.len() * m.cols * 4) as u64);
    let t = gpu.storage_with("tokens", bytemuck::cast_slice(tokens));
    let s = step(gpu, tokens.len() as u32, 0);
    for part in &m.parts {
        let p = uniform(
            gpu,
            &EmbedParams {
                rows: part.rows as u32,
                first_row: part.first_row as u32,
                cols: m.cols as u32,
                row_bytes: m.row_bytes as u32,
                scale,
                pad: [0; 3],
            },
        );
        let (gx, gy) = split_groups(((tokens.len() * m.cols) as u32).div_ceil(64));
        dispatch(gpu, kernels.embed(m.dtype), &[&part.buffer, &t, &h, &p, &s], [gx, gy, 1]);
    }
    read(gpu, &h, tokens.len() * m.cols).await
}

pub async fn embedding_matches_cpu_for_every_type(gpu: &Gpu) {
    for dtype in saif_engine::gguf::SUPPORTED_TYPES {
        let cols = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { 256 } else { 96 };
        let rows = 41;
        let q = quantized(rows, cols, dtype, 11);
        let data = q.data().unwrap().to_vec();
        let m = GpuMatrix::upload(gpu, "table", dtype, rows, cols, &data).unwrap();
        let cpu = QuantMatrix::new("table", std::sync::Arc::new(q)).unwrap();
        let kernels = Kernels::new(gpu, &[dtype]).unwrap();
        let tokens = [0u32, 40, 7, 7, 23];
        let got = gpu_embed(gpu, &kernels, &m, &tokens, 2.5).await;
        let mut want = Vec::new();
        for &t in &tokens {
            let mut row = vec![0f32; cols];
            cpu.dequantize_rows(t as usize, &mut row).unwrap();
            want.extend(row.iter().map(|v| v * 2.5));
        }
        assert_close(&got, &want, 1e-6, &format!("embedding {dtype:?}"));
    }
}

fn rms_norm_cpu(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (mean + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

pub async fn rms_norms_match_cpu(gpu: &Gpu) {
    let kernels = Kernels::new(gpu, &[]).unwrap();
    let (width, tokens) = (100, 5); // width not a multiple of the 64 threads
    let eps = 1e-6;
    let x = noise(tokens * width, 1);
    let y0 = noise(tokens * width, 2);
    let w = noise(width, 3);
    let s = step(gpu, tokens as u32, 0);
    let want_norm: Vec<f32> = x.chunks(width).flat_map(|r| rms_norm_cpu(r, &w, eps)).collect();

    // norm: Y = norm(X)
    let y = floats(gpu, &y0);
    let p = uniform(gpu, &NormParams { width: width as u32, last_only: 0, eps, pad: 0 });
    dispatch(gpu, &kernels.norm, &[&floats(gpu, &x), &y, &floats(gpu, &w), &p, &s], [tokens as u32, 1, 1]);
    assert_close(&read(gpu, &y, tokens * width).await, &want_norm, 1e-5, "norm");

    // norm_add: Y += norm(X)
    let y = floats(gpu, &y0);
    dispatch(gpu, &kernels.norm_add, &[&floats(gpu, &x), &y, &floats(gpu, &w), &p, &s], [tokens as u32, 1, 1]);
    let want: Vec<f32> = y0.iter().zip(&want_norm).map(|(a, b)| a + b).collect();
    assert_close(&read(gpu, &y, tokens * width).await, &want, 1e-5, "norm_add");

    // last_only: only the last token's row changes.
    let y = floats(gpu, &y0);
    let p_last = uniform(gpu, &NormParams { width: width as u32, last_only: 1, eps, pad: 0 });
    dispatch(gpu, &kernels.norm, &[&floats(gpu, &x), &y, &floats(gpu, &w), &p_last, &s], [1, 1, 1]);
    let mut want = y0.clone();
    want[(tokens - 1) * width..].copy_from_slice(&want_norm[(tokens - 1) * width..]);
    assert_close(&read(gpu, &y, tokens * width).await, &want, 1e-5, "norm of the last row");

    // norm_add_norm: Y += norm(X); A = norm2(Y).
    let y = floats(gpu, &y0);
    let a = gpu.storage("a", (tokens * width * 4) as u64);
    let w2 = noise(width, 6);
    dispatch(
        gpu,
        &kernels.norm_add_norm,
        &[&floats(gpu, &x), &y, &floats(gpu, &w), &a, &floats(gpu, &w2), &p, &s],
        [tokens as u32, 1, 1],
    );
    let sum: Vec<f32> = y0.iter().zip(&want_norm).map(|(a, b)| a + b).collect();
    assert_close(&read(gpu, &y, tokens * width).await, &sum, 1e-5, "norm_add_norm's sum");
    let want: Vec<f32> = sum.chunks(width).flat_map(|r| rms_norm_cpu(r, &w2, eps)).collect();
    assert_close(&read(gpu, &a, tokens * width).await, &want, 1e-5, "norm_add_norm's second norm");
}

/// RoPE through candle (`rope` pairs i with i + d/2, `rope_i` 2i with 2i + 1) of `tokens` rows of `heads` heads.
fn rope_cpu(
    x: &[f32],
    tokens: usize,
    heads: usize,
    hd: usize,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) -> Vec<f32> {
    let dev = Device::Cpu;
    let half = hd / 2;
    let xt = Tensor::from_vec(x.to_vec(), (tokens, heads, hd), &dev)
        .unwrap()
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ct = Tensor::from_vec(cos.to_vec(), (tokens, half), &dev).unwrap();
    let st = Tensor::from_vec(sin.to_vec(), (tokens, half), &dev).unwrap();
    let rope = if interleaved { candle_nn::rotary_emb::rope_i } else { candle_nn::rotary_emb::rope };
    rope(&xt, &ct, &st)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .transpose(0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// prepare_heads against the CPU steps it replaces: per-head norms (Gemma 3), RoPE in both layouts, q into its
/// buffer, k and v into the caches at the call's positions.
/// prepare_heads against the CPU's norms and RoPE, with the cache in each form the device can hold.
pub async fn head_preparation_matches_cpu(gpu: &Gpu) {
    for form in cache_forms(gpu) {
        head_preparation_matches_cpu_with(gpu, form).await;
    }
}

async fn head_preparation_matches_cpu_with(gpu: &Gpu, form: CacheForm) {
    let kernels = Kernels::with_cache(gpu, &[], form).unwrap();
    // 160 dimensions: 80 pairs, so some of the 64 threads take two; two q heads per kv head.
    let (heads, kv_heads, hd, tokens, start) = (4usize, 2usize, 160usize, 3usize, 5usize);
    let (positions, half, eps) = (start + tokens, hd / 2, 1e-6f32);
    let (cos, sin) = rope_tables(positions, hd);
    let per_token = (heads + 2 * kv_heads) * hd;
    let qkv: Vec<f32> = noise(tokens * per_token, 61).iter().map(|v| v * 3.0).collect();
    let norms = noise(2 * hd, 62);
    let part = |t: usize, from: usize, width: usize| qkv[t * per_token + from..t * per_token + from + width].to_vec();
    for qk_norm in [false, true] {
        let normed = |rows: Vec<f32>, weights: &[f32]| -> Vec<f32> {
            if qk_norm {
                rows.chunks(hd).flat_map(|r| rms_norm_cpu(r, weights, eps)).collect()
            } else {
                rows
            }
        };
        let q: Vec<f32> = normed((0..tokens).flat_map(|t| part(t, 0, heads * hd)).collect(), &norms[..hd]);
        let k: Vec<f32> = normed((0..tokens).flat_map(|t| part(t, heads * hd, kv_heads * hd)).collect(), &norms[hd..]);
        let v: Vec<f32> = (0..tokens).flat_map(|t| part(t, (heads + kv_heads) * hd, kv_heads * hd)).collect();
        for interleaved in [false, true] {
            let (c, s_) = (&cos[start * half..], &sin[start * half..]);
            let want_q = rope_cpu(&q, tokens, heads, hd, c, s_, interleaved);
            let want_k = rope_cpu(&k, tokens, kv_heads, hd, c, s_, interleaved);
            let params = heads_params(heads, kv_heads, hd, interleaved, qk_norm, eps);
            let q_out = gpu.storage("q", (tokens * heads * hd * 4) as u64);
            let cache_bytes = (positions * kv_heads * hd * form.bytes_per_value()) as u64;
            let (k_cache, v_cache) = (gpu.storage("k cache", cache_bytes), gpu.storage("v cache", cache_bytes));
            dispatch(
                gpu,
                &kernels.prepare_heads,
                &[
                    &floats(gpu, &qkv),
                    &q_out,
                    &k_cache,
                    &v_cache,
                    &floats(gpu, &norms),
                    &floats(gpu, &cos),
                    &floats(gpu, &sin),
                    &token_rows(gpu, 0, start as u32, tokens as u32),
                    &uniform(gpu, &params),
                    &step(gpu, tokens as u32, start as u32),
                ],
                [(tokens * (heads + 2 * kv_heads)) as u32, 1, 1],
            );
            let what = format!("qk norm {qk_norm}, interleaved {interleaved}, {form:?} cache");
            assert_close(&read(gpu, &q_out, want_q.len()).await, &want_q, 1e-5, &format!("q, {what}"));
            let before = start * kv_heads * hd;
            let got_k = read_cache(gpu, &k_cache, positions * kv_heads * hd, form).await;
            assert_close_as_cached(&got_k[before..], &want_k, 1e-5, form, &format!("k in the cache, {what}"));
            let got_v = read_cache(gpu, &v_cache, positions * kv_heads * hd, form).await;
            let want_v: Vec<f32> = v.iter().map(|&x| as_cached(x, form)).collect();
            assert_eq!(&got_v[before..], &want_v[..], "v in the cache, {what}");
            assert!(got_k[..before].iter().chain(&got_v[..before]).all(|&x| x == 0.0), "wrote before the call, {what}");
        }
    }
}

/// RoPE's cos and sin for `positions` positions of heads of `hd` values (base 10,000), computed in f64 as the
/// model's tables are: [position][hd / 2] each.
fn rope_tables(positions: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
    let angles: Vec<f64> = (0..positions)
        .flat_map(|p| (0..hd / 2).map(move |i| p as f64 / 10_000f64.powf(2.0 * i as f64 / hd as f64)))
        .collect();
    (angles.iter().map(|a| a.cos() as f32).collect(), angles.iter().map(|a| a.sin() as f32).collect())
}

fn heads_params(heads: usize, kv_heads: usize, hd: usize, interleaved: bool, qk_norm: bool, eps: f32) -> HeadsParams {
    HeadsParams {
        heads: heads as u32,
        kv_heads: kv_heads as u32,
        head_dim: hd as u32,
        interleaved: interleaved as u32,
        qk_norm: qk_norm as u32,
        eps,
        pad: [0; 2],
    }
}

fn attention_params(
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: usize,
    scale: f32,
    softcap: f32,
) -> AttentionParams {
    AttentionParams {
        heads: heads as u32,
        kv_heads: kv_heads as u32,
        head_dim: hd as u32,
        window: window as u32,
        scale,
        softcap,
        pad: [0; 2],
    }
}

/// Attention computed plainly in f64: softmax over visible keys of (q.k scale, softcapped), times v.
#[allow(clippy::too_many_arguments)]
fn attention_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    start: usize,
    tokens: usize,
    window: usize,
    scale: f32,
    softcap: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; tokens * heads * hd];
    for t in 0..tokens {
        let pos = start + t;
        for h in 0..heads {
            let kh = h / (heads / kv_heads);
            let visible: Vec<usize> = (0..=pos).filter(|&j| window == 0 || pos - j < window).collect();
            let scores: Vec<f64> = visible
                .iter()
                .map(|&j| {
                    let mut s: f64 = (0..hd)
                        .map(|d| {
                            q[(t * heads + h) * hd + d] as f64 * scale as f64 * k[(j * kv_heads + kh) * hd + d] as f64
                        })
                        .sum();
                    if softcap > 0.0 {
                        s = softcap as f64 * (s / softcap as f64).tanh();
                    }
                    s
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let o: f64 = visible.iter().zip(&e).map(|(&j, w)| w / z * v[(j * kv_heads + kh) * hd + d] as f64).sum();
                out[(t * heads + h) * hd + d] = o as f32;
            }
        }
    }
    out
}

/// attend against attention computed plainly, over a cache in each form the device can hold (the CPU reads the
/// values the cache holds).
pub async fn attention_matches_cpu(gpu: &Gpu) {
    for form in cache_forms(gpu) {
        attention_matches_cpu_with(gpu, form).await;
    }
}

async fn attention_matches_cpu_with(gpu: &Gpu, form: CacheForm) {
    let kernels = Kernels::with_cache(gpu, &[], form).unwrap();
    // 72 dimensions (not a multiple of 64), 2 query heads per key head, positions past 64 keys (two chunks of the
    // online softmax), with and without a window, with and without a softcap.
    let (heads, kv_heads, hd, start, tokens) = (4usize, 2usize, 72usize, 70usize, 3usize);
    let positions = start + tokens;
    let q = noise(tokens * heads * hd, 21);
    let k: Vec<f32> = noise(positions * kv_heads * hd, 22).iter().map(|x| as_cached(x * 3.0, form)).collect();
    let v: Vec<f32> = noise(positions * kv_heads * hd, 23).iter().map(|&x| as_cached(x, form)).collect();
    let scale = 1.0 / (hd as f32).sqrt();
    for (window, softcap) in [(0usize, 0f32), (50, 0.0), (0, 2.0), (5, 1.5)] {
        let want = attention_cpu(&q, &k, &v, heads, kv_heads, hd, start, tokens, window, scale, softcap);
        let p = uniform(gpu, &attention_params(heads, kv_heads, hd, window, scale, softcap));
        let o = gpu.storage("o", (tokens * heads * hd * 4) as u64);
        let s = step(gpu, tokens as u32, start as u32);
        dispatch(
            gpu,
            &kernels.attention,
            &[
                &floats(gpu, &q),
                &cache_buffer(gpu, &k, form),
                &cache_buffer(gpu, &v, form),
                &o,
                &token_rows(gpu, 0, start as u32, tokens as u32),
                &p,
                &s,
            ],
            [heads as u32, tokens as u32, 1],
        );
        assert_close(
            &read(gpu, &o, want.len()).await,
            &want,
            1e-4,
            &format!("attention, window {window}, softcap {softcap}, {form:?} cache"),
        );
    }
}

/// attend_step (one-token steps) against prepare_heads then attention, bit for bit in the output and both caches,
/// and against the CPU steps: per-head norms, RoPE in both layouts, key positions at and past a chunk of 64,
/// windows and softcaps; with the cache in each form the device can hold.
pub async fn step_attention_matches_prepare_then_attend(gpu: &Gpu) {
    for form in cache_forms(gpu) {
        step_attention_matches_prepare_then_attend_with(gpu, form).await;
    }
}

async fn step_attention_matches_prepare_then_attend_with(gpu: &Gpu, form: CacheForm) {
    let kernels = Kernels::with_cache(gpu, &[], form).unwrap();
    // 160 dimensions: 80 pairs, so some of the 64 threads take two; two q heads per kv head.
    let (heads, kv_heads, hd, eps) = (4usize, 2usize, 160usize, 1e-6f32);
    let (half, positions, kv_width) = (hd / 2, 72usize, kv_heads * hd);
    let (cos, sin) = rope_tables(positions, hd);
    let qkv: Vec<f32> = noise((heads + 2 * kv_heads) * hd, 71).iter().map(|v| v * 3.0).collect();
    let norms = noise(2 * hd, 72);
    let old_k: Vec<f32> = noise(positions * kv_width, 73);
    let old_v: Vec<f32> = noise(positions * kv_width, 74);
    let scale = 1.0 / (hd as f32).sqrt();
    // (position, qk norm, interleaved, window, softcap)
    let cases = [
        (0usize, false, false, 0usize, 0f32),
        (63, true, false, 0, 0.0),
        (64, false, true, 0, 2.0),
        (70, true, true, 50, 0.0),
        (70, false, false, 5, 1.5),
    ];
    for (start, qk_norm, interleaved, window, softcap) in cases {
        let what = format!(
            "position {start}, qk norm {qk_norm}, interleaved {interleaved}, window {window}, softcap {softcap}, \
             {form:?} cache"
        );
        let heads_params = uniform(gpu, &heads_params(heads, kv_heads, hd, interleaved, qk_norm, eps));
        let attention_params = uniform(gpu, &attention_params(heads, kv_heads, hd, window, scale, softcap));
        // The caches hold earlier positions, and stale values in the step's own row, which the step must overwrite
        // and never read.
        let (k0, v0) = (old_k.clone(), old_v.clone());
        let (qkv_buf, norms_buf, cos_buf, sin_buf) =
            (floats(gpu, &qkv), floats(gpu, &norms), floats(gpu, &cos), floats(gpu, &sin));
        let s = step(gpu, 1, start as u32);
        let out_len = heads * hd;

        let (k_apart, v_apart) = (cache_buffer(gpu, &k0, form), cache_buffer(gpu, &v0, form));
        let q_buf = gpu.storage("q", (out_len * 4) as u64);
        let o_apart = gpu.storage("o", (out_len * 4) as u64);
        let rows = token_rows(gpu, 0, start as u32, 1);
        let prepare = [&qkv_buf, &q_buf, &k_apart, &v_apart, &norms_buf, &cos_buf, &sin_buf, &rows, &heads_params, &s];
        dispatch(gpu, &kernels.prepare_heads, &prepare, [(heads + 2 * kv_heads) as u32, 1, 1]);
        let attend = [&q_buf, &k_apart, &v_apart, &o_apart, &rows, &attention_params, &s];
        dispatch(gpu, &kernels.attention, &attend, [heads as u32, 1, 1]);

        let (k_fused, v_fused) = (cache_buffer(gpu, &k0, form), cache_buffer(gpu, &v0, form));
        let o_fused = gpu.storage("o", (out_len * 4) as u64);
        let fused = [
            &qkv_buf,
            &k_fused,
            &v_fused,
            &o_fused,
            &norms_buf,
            &cos_buf,
            &sin_buf,
            &rows,
            &heads_params,
            &attention_params,
            &s,
        ];
        dispatch(gpu, &kernels.attend_step, &fused, [heads as u32, 1, 1]);

        let got = read(gpu, &o_fused, out_len).await;
        assert_eq!(got, read(gpu, &o_apart, out_len).await, "output, {what}");
        let got_k = read_cache(gpu, &k_fused, positions * kv_width, form).await;
        assert_eq!(got_k, read_cache(gpu, &k_apart, positions * kv_width, form).await, "k cache, {what}");
        let got_v = read_cache(gpu, &v_fused, positions * kv_width, form).await;
        assert_eq!(got_v, read_cache(gpu, &v_apart, positions * kv_width, form).await, "v cache, {what}");

        // The CPU steps: norms, RoPE, the new row into the caches, attention.
        let normed = |rows: &[f32], weights: &[f32]| -> Vec<f32> {
            if qk_norm {
                rows.chunks(hd).flat_map(|r| rms_norm_cpu(r, weights, eps)).collect()
            } else {
                rows.to_vec()
            }
        };
        let (c, s_) = (&cos[start * half..(start + 1) * half], &sin[start * half..(start + 1) * half]);
        let q = rope_cpu(&normed(&qkv[..heads * hd], &norms[..hd]), 1, heads, hd, c, s_, interleaved);
        let new_k =
            rope_cpu(&normed(&qkv[heads * hd..out_len + kv_width], &norms[hd..]), 1, kv_heads, hd, c, s_, interleaved);
        let mut k = k0.clone();
        let mut v = v0.clone();
        k[start * kv_width..(start + 1) * kv_width].copy_from_slice(&new_k);
        v[start * kv_width..(start + 1) * kv_width].copy_from_slice(&qkv[out_len + kv_width..]);
        assert_close_as_cached(&got_k, &k, 1e-5, form, &format!("k cache against the CPU, {what}"));
        let v: Vec<f32> = v.iter().map(|&x| as_cached(x, form)).collect();
        assert_eq!(got_v, v, "v cache against the CPU, {what}");
        // Attention over what the caches hold (the step's own key included, as the cache rounded it).
        let want = attention_cpu(&q, &got_k, &v, heads, kv_heads, hd, start, 1, window, scale, softcap);
        assert_close(&got, &want, 1e-4, &format!("output against the CPU, {what}"));
    }
}

/// Two sequences in one call, each token with its own position and its own rows of the caches (`TokenRow`), as
/// batched decoding will run them: prepare_heads then attend give each token, bit for bit, the output and the
/// cache rows it gets alone, and attend_step, on the second sequence's rows, what prepare_heads then attend give
/// it. The rows past each sequence's end hold stale values, which must be neither read nor kept.
pub async fn attention_gives_each_sequence_what_it_gets_alone(gpu: &Gpu) {
    for form in cache_forms(gpu) {
        let kernels = Kernels::with_cache(gpu, &[], form).unwrap();
        // 160 dimensions (some threads take two pairs), two q heads per kv head; sequence 0 attends past a chunk of
        // 64 keys, sequence 1 within one.
        let (heads, kv_heads, hd, context) = (4usize, 2usize, 160usize, 80usize);
        let (kv_width, per_token) = (kv_heads * hd, (heads + 2 * kv_heads) * hd);
        let (cos, sin) = rope_tables(context, hd);
        let (cos, sin) = (floats(gpu, &cos), floats(gpu, &sin));
        let norms = floats(gpu, &noise(2 * hd, 81));
        let heads_params = uniform(gpu, &heads_params(heads, kv_heads, hd, false, true, 1e-6));
        let attention_params = uniform(gpu, &attention_params(heads, kv_heads, hd, 0, 1.0 / (hd as f32).sqrt(), 0.0));
        let positions = [70usize, 40];
        let qkv: Vec<f32> = noise(2 * per_token, 82).iter().map(|v| v * 3.0).collect();
        let (old_k, old_v) = (noise(2 * context * kv_width, 83), noise(2 * context * kv_width, 84));
        // prepare_heads then attend over `tokens` tokens of q|k|v standing at `rows`; the output and both caches.
        let run = |qkv: &[f32], k: &[f32], v: &[f32], rows: &[TokenRow], fused: bool| {
            let tokens = rows.len();
            let (qkv, k, v) = (floats(gpu, qkv), cache_buffer(gpu, k, form), cache_buffer(gpu, v, form));
            let (q, o) = (
                gpu.storage("q", (tokens * heads * hd * 4) as u64),
                gpu.storage("o", (tokens * heads * hd * 4) as u64),
            );
            let (rows, s) = (rows_of(gpu, rows), step(gpu, tokens as u32, 0));
            if fused {
                let buffers = [&qkv, &k, &v, &o, &norms, &cos, &sin, &rows, &heads_params, &attention_params, &s];
                dispatch(gpu, &kernels.attend_step, &buffers, [heads as u32, 1, 1]);
            } else {
                let prepare = [&qkv, &q, &k, &v, &norms, &cos, &sin, &rows, &heads_params, &s];
                dispatch(gpu, &kernels.prepare_heads, &prepare, [(tokens * (heads + 2 * kv_heads)) as u32, 1, 1]);
                let attend = [&q, &k, &v, &o, &rows, &attention_params, &s];
                dispatch(gpu, &kernels.attention, &attend, [heads as u32, tokens as u32, 1]);
            }
            (o, k, v)
        };
        let both = [
            TokenRow { first: 0, position: positions[0] as u32 },
            TokenRow { first: context as u32, position: positions[1] as u32 },
        ];
        let (o, k, v) = run(&qkv, &old_k, &old_v, &both, false);
        let (got_o, got_k, got_v) = (
            read(gpu, &o, 2 * heads * hd).await,
            read_cache(gpu, &k, 2 * context * kv_width, form).await,
            read_cache(gpu, &v, 2 * context * kv_width, form).await,
        );
        for (seq, &position) in positions.iter().enumerate() {
            let what = format!("sequence {seq} at position {position}, {form:?} cache");
            let cache = seq * context * kv_width..(seq + 1) * context * kv_width;
            let (own_k, own_v) = (&old_k[cache.clone()], &old_v[cache.clone()]);
            let alone = [TokenRow { first: 0, position: position as u32 }];
            let (o, k, v) = run(&qkv[seq * per_token..(seq + 1) * per_token], own_k, own_v, &alone, false);
            let out = seq * heads * hd..(seq + 1) * heads * hd;
            assert_eq!(got_o[out.clone()], read(gpu, &o, heads * hd).await, "output, {what}");
            let (k, v) = (
                read_cache(gpu, &k, context * kv_width, form).await,
                read_cache(gpu, &v, context * kv_width, form).await,
            );
            assert_eq!(got_k[cache.clone()], k, "k cache, {what}");
            assert_eq!(got_v[cache.clone()], v, "v cache, {what}");
            if seq == 1 {
                // The one-token kernel on the second sequence's rows of the shared caches.
                let (o, k, v) = run(&qkv[per_token..], &old_k, &old_v, &both[1..], true);
                assert_eq!(got_o[out], read(gpu, &o, heads * hd).await, "attend_step's output, {what}");
                let k = read_cache(gpu, &k, 2 * context * kv_width, form).await;
                assert_eq!(got_k[cache.clone()], k[cache.clone()], "attend_step's k cache, {what}");
                let v = read_cache(gpu, &v, 2 * context * kv_width, form).await;
                assert_eq!(got_v[cache.clone()], v[cache], "attend_step's v cache, {what}");
            }
        }
    }
}

pub async fn elementwise_steps_match_cpu(gpu: &Gpu) {
    let kernels = Kernels::new(gpu, &[]).unwrap();
    let (width, tokens) = (77usize, 3usize);
    let n = width * tokens;
    let g0: Vec<f32> = noise(n, 31).iter().map(|x| x * 6.0).collect();
    let u = noise(n, 32);
    let s = step(gpu, tokens as u32, 0);
    let p = uniform(gpu, &ElementwiseParams { width: width as u32, rows: 0, cap: 0.0, pad: 0 });
    let groups = [(n as u32).div_ceil(64), 1, 1];
    let dev = Device::Cpu;
    let gt = Tensor::from_vec(g0.clone(), n, &dev).unwrap();
    for (kernel, act) in [(&kernels.glu_gelu, gt.gelu().unwrap()), (&kernels.glu_silu, gt.silu().unwrap())] {
        let want: Vec<f32> = act.to_vec1::<f32>().unwrap().iter().zip(&u).map(|(a, b)| a * b).collect();
        let g = floats(gpu, &g0);
        dispatch(gpu, kernel, &[&floats(gpu, &u), &g, &p, &s], groups);
        assert_close(&read(gpu, &g, n).await, &want, 1e-5, &kernel.name);
    }
    let y = floats(gpu, &g0);
    dispatch(gpu, &kernels.add, &[&floats(gpu, &u), &y, &p, &s], groups);
    let want: Vec<f32> = g0.iter().zip(&u).map(|(a, b)| a + b).collect();
    assert_close(&read(gpu, &y, n).await, &want, 1e-6, "add");
    let vector = noise(width, 33);
    let y = floats(gpu, &g0);
    dispatch(gpu, &kernels.add_vector, &[&floats(gpu, &vector), &y, &p, &s], groups);
    let want: Vec<f32> = g0.iter().enumerate().map(|(i, a)| a + vector[i % width]).collect();
    assert_close(&read(gpu, &y, n).await, &want, 1e-6, "add_vector");
    let y = floats(gpu, &g0);
    let p = uniform(gpu, &ElementwiseParams { width: width as u32, rows: 2, cap: 4.0, pad: 0 });
    dispatch(gpu, &kernels.softcap, &[&y, &p, &s], groups);
    let got = read(gpu, &y, n).await;
    let want: Vec<f32> = g0[..2 * width].iter().map(|x| 4.0 * (x / 4.0).tanh()).collect();
    assert_close(&got[..2 * width], &want, 1e-5, "softcap");
    assert_eq!(&got[2 * width..], &g0[2 * width..], "softcap touched rows beyond its count");
}

async fn gpu_pick(gpu: &Gpu, kernels: &Kernels, logits: &[f32], sampling: &Sampling, step: u32) -> u32 {
    let params = match *sampling {
        Sampling::Greedy => SelectParams { vocab: logits.len() as u32, ..Default::default() },
        Sampling::Random { temperature, top_k, top_p, seed } => SelectParams {
            vocab: logits.len() as u32,
            random: 1,
            top_k: top_k.unwrap_or(0) as u32,
            top_p: top_p.unwrap_or(1.0),
            temperature,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            step,
        },
    };
    let out = gpu.storage("picked", 4);
    dispatch(gpu, &kernels.select, &[&floats(gpu, logits), &out, &uniform(gpu, &params)], [1, 1, 1]);
    read(gpu, &out, 1).await[0].to_bits()
}

pub async fn token_selection_matches_the_cpu_sampler(gpu: &Gpu) {
    let kernels = Kernels::new(gpu, &[]).unwrap();
    let vocab = 1003;
    let mut logits: Vec<f32> = noise(vocab, 41).iter().map(|x| x * 4.0).collect();
    // Ties at the maximum: greedy takes the first.
    logits[500] = 10.0;
    logits[17] = 10.0;
    assert_eq!(gpu_pick(gpu, &kernels, &logits, &Sampling::Greedy, 0).await, 17);
    let cases = [
        (1.0, None, None),
        (0.7, Some(40), None),
        (1.3, None, Some(0.9)),
        (0.8, Some(100), Some(0.5)),
        (2.0, Some(1), None),
    ];
    logits[500] = 3.0;
    logits[17] = 3.5;
    for (temperature, top_k, top_p) in cases {
        for seed in [0u64, 42, 1 << 40] {
            for step in [0u32, 1, 7] {
                let sampling = Sampling::Random { temperature, top_k, top_p, seed };
                let got = gpu_pick(gpu, &kernels, &logits, &sampling, step).await;
                assert_eq!(got, pick(&logits, &sampling, step), "{sampling:?} step {step}");
            }
        }
    }
}

/// set_projection against `hooks::set_projection`: afterwards every row's projection onto the direction is the
/// value asked for, and the orthogonal part is unchanged.
pub async fn projection_matches_cpu(gpu: &Gpu) {
    let kernels = Kernels::new(gpu, &[]).unwrap();
    let (width, tokens) = (150usize, 5usize);
    let rows = noise(width * tokens, 41).iter().map(|x| x * 3.0).collect::<Vec<f32>>();
    let raw = noise(width, 42);
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    let unit: Vec<f32> = raw.iter().map(|x| x / norm).collect();
    let mut want = rows.clone();
    saif_engine::hooks::set_projection(&mut want, &unit, 2.5);
    for row in want.chunks(width) {
        let along: f32 = row.iter().zip(&unit).map(|(a, b)| a * b).sum();
        assert!((along - 2.5).abs() < 1e-4, "the CPU twin sets the projection ({along})");
    }
    let y = floats(gpu, &rows);
    let p = uniform(gpu, &ProjectParams { width: width as u32, value: 2.5, pad: [0; 2] });
    dispatch(
        gpu,
        &kernels.set_projection,
        &[&floats(gpu, &unit), &y, &p, &step(gpu, tokens as u32, 0)],
        [tokens as u32, 1, 1],
    );
    assert_close(&read(gpu, &y, rows.len()).await, &want, 1e-5, "set_projection");
}

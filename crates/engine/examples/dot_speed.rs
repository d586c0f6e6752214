//! How fast the CPU path's fused dot products read each block type, on one thread, against a plain streaming read
//! of the same memory: `cargo run --release -p saif-engine --example dot_speed`. The weights (128 MB of blocks per
//! type, far beyond the caches) come from memory as in a decoding step; the activations stay in the L1 cache.
//! `int8` is the opt-in mode with activations rounded to 8 bits. Then the same kernels on a 576 x 576 matrix in the L2
//! cache, multiplied again and again, beside the kernels on rows repacked in lanes of sixteen (`q4_1_lanes`,
//! `q8_0_lanes`, where the CPU has AVX-512): a kernel that runs no faster there than from memory is bound by its
//! instructions. docs/benchmarks.md records its figures.

use candle_core::quantized::GgmlDType;
use saif_engine::quant::blocks::{dot_row, portable_dot_row};
use saif_engine::quant::int8;
use saif_engine::quant::q4_1_lanes::{self, block_totals, Q4_1Lanes};
use saif_engine::quant::q8_0_lanes::Q8_0Lanes;

fn best_of_three(mut run: impl FnMut() -> f32) -> (f64, f32) {
    let mut best = f64::MAX;
    let mut checksum = 0.0;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        checksum = std::hint::black_box(run());
        best = best.min(started.elapsed().as_secs_f64());
    }
    (best, checksum)
}

fn main() {
    let cols = 1024;
    let bytes_per_type = 128 << 20;
    // The plain read: XOR of every 8-byte word of a buffer filled at run time.
    let plain: Vec<u64> = (0..bytes_per_type / 8).map(|i| std::hint::black_box(i as u64)).collect();
    let (seconds, _) = best_of_three(|| plain.iter().fold(0u64, |a, &b| a ^ b) as f32);
    println!("streaming read: {:.2} GB/s", bytes_per_type as f64 / seconds / 1e9);
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        // Bytes whose f16 scales are finite and moderate (0x3b3b is about 0.9).
        let bytes: Vec<u8> = (0..bytes_per_type / row_bytes * row_bytes).map(|i| (i * 7 % 251) as u8 & 0x3b).collect();
        let x: Vec<f32> = (0..cols).map(|i| i as f32 * 0.001).collect();
        for (form, dot) in [("dot_row", dot_row as fn(GgmlDType, &[u8], &[f32]) -> f32), ("portable", portable_dot_row)]
        {
            let (seconds, checksum) = best_of_three(|| bytes.chunks_exact(row_bytes).map(|r| dot(dtype, r, &x)).sum());
            println!("{dtype:?} {form}: {:.2} GB/s (checksum {checksum:.4e})", bytes.len() as f64 / seconds / 1e9);
        }
        if int8::supports(dtype) {
            // The opt-in fast mode: activations rounded to 8 bits, integer products.
            let q = int8::quantize(&x);
            let (seconds, checksum) =
                best_of_three(|| bytes.chunks_exact(row_bytes).map(|r| int8::dot_row(dtype, r, &q)).sum());
            println!("{dtype:?} int8: {:.2} GB/s (checksum {checksum:.4e})", bytes.len() as f64 / seconds / 1e9);
        }
    }
    in_l2_cache();
}

/// G weights per second of each kernel on a 576 x 576 matrix (SmolLM2's attention products), repeated until 200 M
/// weights were multiplied.
fn in_l2_cache() {
    let (rows, cols) = (576, 576);
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let (q, totals) = (int8::quantize(&x), block_totals(&x));
    let repeats = 200_000_000 / (rows * cols);
    let speed = |run: &dyn Fn() -> f32| {
        let (seconds, checksum) = best_of_three(|| (0..repeats).map(|_| run()).sum());
        format!("{:.2} G weights/s (checksum {checksum:.4e})", (repeats * rows * cols) as f64 / seconds / 1e9)
    };
    println!("in the L2 cache, {rows} x {cols}, one thread:");
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let bytes: Vec<u8> = (0..rows * row_bytes).map(|i| (i * 7 % 251) as u8 & 0x3b).collect();
        let rows_of = || bytes.chunks_exact(row_bytes);
        println!("{dtype:?} dot_row: {}", speed(&|| rows_of().map(|r| dot_row(dtype, r, &x)).sum()));
        if int8::supports(dtype) {
            println!("{dtype:?} int8: {}", speed(&|| rows_of().map(|r| int8::dot_row(dtype, r, &q)).sum()));
        }
        if !q4_1_lanes::available() {
            continue;
        }
        match dtype {
            GgmlDType::Q4_1 => {
                let lanes = Q4_1Lanes::new(&bytes, rows, cols);
                let exact = || groups_sum(rows, |g, out| lanes.exact_group(g, &x, &totals, out));
                println!("{dtype:?} in lanes, exact: {}", speed(&exact));
                if q4_1_lanes::int8_available() {
                    let rounded = || groups_sum(rows, |g, out| lanes.int8_group(g, &q, out));
                    println!("{dtype:?} in lanes, int8: {}", speed(&rounded));
                }
            }
            _ => {
                let lanes = Q8_0Lanes::new(&bytes, rows, cols);
                let exact = || groups_sum(rows, |g, out| lanes.exact_group(g, &x, out));
                println!("{dtype:?} in lanes, exact: {}", speed(&exact));
            }
        }
    }
}

/// The sum of every group's sixteen values (`group(g, out)` for each group of sixteen of `rows`).
fn groups_sum(rows: usize, group: impl Fn(usize, &mut [f32; 16])) -> f32 {
    let mut out = [0f32; 16];
    (0..rows / 16)
        .map(|g| {
            group(g, &mut out);
            out.iter().sum::<f32>()
        })
        .sum()
}

//! How fast the CPU path's fused dot products read each block type, on one thread, against a plain streaming read
//! of the same memory: `cargo run --release -p saif-engine --example dot_speed`. The weights (128 MB of blocks per
//! type, far beyond the caches) come from memory as in a decoding step; the activations stay in the L1 cache.
//! `int8` is the opt-in mode with activations rounded to 8 bits. docs/benchmarks.md records its figures.

use candle_core::quantized::GgmlDType;
use saif_engine::quant::blocks::{dot_row, portable_dot_row};
use saif_engine::quant::int8;

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
}

//! How fast the CPU path decodes each block type to f32 (`quant::dequantize`, which the exact batched products run
//! on every weight row of every step), on one thread, from rows held in the L1 cache so that the decoders' own
//! instructions are timed and not memory: `cargo run --release -p saif-engine --example decode_speed`. Best of
//! seven, in ns per 256 values. docs/benchmarks.md records its figures.

use candle_core::quantized::GgmlDType;

fn main() {
    // (type, bytes per block, values per block, where the block's f16 scales lie)
    let types = [
        (GgmlDType::Q8_0, 34, 32, &[0][..]),
        (GgmlDType::Q4_1, 20, 32, &[0, 2][..]),
        (GgmlDType::Q5_0, 22, 32, &[0][..]),
        (GgmlDType::Q4K, 144, 256, &[0, 2][..]),
        (GgmlDType::Q6K, 210, 256, &[208][..]),
    ];
    for (dtype, block_bytes, block_values, scales) in types {
        // 2,048 values: a row of Gemma 3's down projection, a few KB of blocks.
        let blocks = 2048 / block_values;
        let mut bytes: Vec<u8> = (0..blocks * block_bytes).map(|i| (i * 7919 % 251) as u8).collect();
        for block in bytes.chunks_exact_mut(block_bytes) {
            for &at in scales {
                block[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            }
        }
        let mut out = vec![0f32; blocks * block_values];
        let reps = 100_000;
        let mut best = f64::MAX;
        for _ in 0..7 {
            let started = std::time::Instant::now();
            for _ in 0..reps {
                saif_engine::quant::dequantize(dtype, std::hint::black_box(&bytes), &mut out);
                std::hint::black_box(&mut out);
            }
            best = best.min(started.elapsed().as_secs_f64() / reps as f64);
        }
        let per_256 = best * 1e9 / out.len() as f64 * 256.0;
        println!("{dtype:?}: {per_256:.2} ns per 256 values");
    }
}

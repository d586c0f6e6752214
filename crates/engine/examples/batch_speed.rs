//! How fast the exact-rows product (a batched decoding step's) multiplies, for 1, 4, 8 and 16 activation rows:
//! `cargo run --release -p saif-engine --example batch_speed [THREADS] [int8]` (default 1 thread, exact products;
//! `int8`: with 8-bit activations, on AMX tiles from 8 rows where the CPU has them, unless `SAIF_AMX=0`). Matrices
//! of the offline models' shapes and types (SmolLM2's up projection, Gemma's down projection, SmolLM2's output
//! matrix), random weights, repacked for decoding as the engine loads them; best of five, in GMAC/s (billions of
//! multiply-adds per second). docs/benchmarks.md records its figures.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use saif_engine::quant::QuantMatrix;

fn main() {
    let threads: usize = std::env::args().nth(1).map_or(1, |t| t.parse().expect("THREADS: a number"));
    let int8 = std::env::args().nth(2).is_some_and(|a| a == "int8");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
    for (dtype, rows, cols) in
        [(GgmlDType::Q4_1, 1536, 576), (GgmlDType::Q4K, 640, 2048), (GgmlDType::Q8_0, 49152, 576)]
    {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("weights");
        let q = QuantMatrix::new("w", Arc::new(QTensor::quantize(&w, dtype).expect("quantized")))
            .expect("matrix")
            .with_int8_activations(int8)
            .for_decoding()
            .expect("repacked");
        for m in [1, 4, 8, 16] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i * 104729 % 997) as f32 / 498.5 - 1.0).collect();
            let reps = (20_000_000 / (m * rows * cols)).max(3);
            let mut best = f64::MAX;
            for _ in 0..5 {
                let started = std::time::Instant::now();
                pool.install(|| {
                    for _ in 0..reps {
                        std::hint::black_box(q.matmul_exact_rows(&x).expect("product"));
                    }
                });
                best = best.min(started.elapsed().as_secs_f64() / reps as f64);
            }
            let gmacs = (m * rows * cols) as f64 / best / 1e9;
            println!("{dtype:?} {rows}x{cols}, {m} activation rows: {:.3} ms, {gmacs:.2} GMAC/s", best * 1e3);
        }
    }
}

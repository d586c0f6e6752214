//! How fast activations are rounded to 8 bits (`--int8`) for a batched step's products: 16 rows of SmolLM2's
//! widths (576, the layers' input; 1,536, the down projection's), on one thread, best of five, in microseconds:
//! `cargo run --release -p saif-engine --example q_speed`. Two ways: `int8::quantize` row by row (each row's room
//! allocated), and `int8::quantize_into` into rooms made beforehand (as `int8_rows::TileRows::round` does, on the
//! pass's threads). docs/benchmarks.md records its figures.

use saif_engine::quant::int8::{quantize, quantize_into};

/// Runs `work` `reps` times, five times over; the best time per run, in microseconds.
fn best_of_five(reps: usize, mut work: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let started = std::time::Instant::now();
            (0..reps).for_each(|_| work());
            started.elapsed().as_secs_f64() / reps as f64 * 1e6
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    const ROWS: usize = 16;
    for k in [576usize, 1536] {
        let x: Vec<f32> =
            (0..ROWS * k).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect();
        let reps = 2000;
        let by_row = best_of_five(reps, || {
            x.chunks_exact(k).for_each(|row| drop(std::hint::black_box(quantize(std::hint::black_box(row)))))
        });
        let (mut values, mut scale, mut scaled_sum) = (vec![0i8; k], vec![0f32; k / 32], vec![0f32; k / 32]);
        let into = best_of_five(reps, || {
            for row in x.chunks_exact(k) {
                quantize_into(std::hint::black_box(row), &mut values, &mut scale, &mut scaled_sum);
                std::hint::black_box(&values);
            }
        });
        println!("{ROWS} rows of {k}: quantize {by_row:.2} us, quantize_into {into:.2} us");
    }
}

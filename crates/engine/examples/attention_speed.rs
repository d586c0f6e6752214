//! How fast a batched decoding step's attention kernels read a KV cache, apart from the rest of the step:
//! `cargo run --release -p saif-engine --example attention_speed [ROWS] [THREADS]` (default 64 rows, 2 threads).
//!
//! SmolLM2's shape at batch 16: 16 sequences x 30 layers x 3 key-value heads, each shared by 3 query heads, rows of
//! 64 values, in f32 and in f16 (`--f16-cache`). Per key-value head, as `CpuModel::attend_heads_in` does: the scores
//! (`quant::dots_rows`), weights made from them (a stand-in for the softmax, which reads no memory), the sums of the
//! value rows (`model::value_sums`). Each pass reads its caches either right after the pass before read the same
//! ones ("hot": what the L3 cache keeps) or after five others ("cold": from memory, as in a real step, where the
//! weights and the other layers' caches come in between).
//!
//! Passes alternate between the kernels with the engine's prefetches of each run's first rows
//! (`CacheRows::prefetch_start`: the values during the scores, the next head's keys during the sums) and without
//! them, so that the machine's drift falls on both alike; the table gives the median and the first quartile of
//! each, in ms per pass, and their ratio. docs/benchmarks.md records its figures.

use std::time::Instant;

use half::f16;
use saif_engine::model::value_sums::weighted_sums;
use saif_engine::quant::{dots_rows, CacheValue};

const HEAD_DIM: usize = 64;
/// Rows of room per head, as the cache grows (`kv_cache::CHUNK`).
const CAPACITY: usize = 256;
const QUERY_HEADS: usize = 3;
/// Key-value heads of a sequence at one layer, and in all.
const SEQUENCE_HEADS: usize = 3;
const KV_HEADS: usize = 16 * 30 * SEQUENCE_HEADS;
/// Caches a cold pass cycles through.
const COLD_COPIES: usize = 6;
const PASSES: usize = 200;

/// One head's keys and values of `rows` rows, at `keys` and `values` (`CAPACITY` rows of room each).
struct Head<'a, V> {
    keys: &'a [V],
    values: &'a [V],
}

impl<V: CacheValue> Head<'_, V> {
    fn key(&self, j: usize) -> &[V] {
        &self.keys[j * HEAD_DIM..(j + 1) * HEAD_DIM]
    }

    fn value(&self, j: usize) -> &[V] {
        &self.values[j * HEAD_DIM..(j + 1) * HEAD_DIM]
    }
}

/// `prefetch_start`'s asks: the first `rows_ahead` rows of a run.
fn ask_for_start<V: CacheValue>(run: &[V], rows: usize) {
    (0..rows.min(V::rows_ahead(HEAD_DIM))).for_each(|j| V::prefetch(&run[j * HEAD_DIM..(j + 1) * HEAD_DIM]));
}

/// The attention of each head of `heads` (one after another, as the sequences' tasks take them), with or without
/// the prefetches of the runs' first rows. The next head's keys are asked for within a sequence only: the engine
/// does not know which sequence a thread takes next (it asks for a sequence's first keys while it makes the new
/// row, which this benchmark leaves out).
fn attend<V: CacheValue>(heads: &[Head<V>], rows: usize, queries: &[f32], prefetch_starts: bool, out: &mut [f32]) {
    let mut weights = vec![0f32; QUERY_HEADS * rows];
    for (h, head) in heads.iter().enumerate() {
        if prefetch_starts {
            ask_for_start(head.values, rows);
        }
        dots_rows(queries, HEAD_DIM, 0..rows, |j| head.key(j), &mut weights);
        weights.iter_mut().for_each(|w| *w = w.abs() * 0.01);
        let same_sequence = (h + 1) % SEQUENCE_HEADS != 0;
        if let Some(next) = heads.get(h + 1).filter(|_| prefetch_starts && same_sequence) {
            ask_for_start(next.keys, rows);
        }
        out.fill(0.0);
        weighted_sums(out, HEAD_DIM, &weights, |j| head.value(j));
    }
}

fn bench<V: CacheValue>(name: &str, make: impl Fn(f32) -> V, rows: usize, threads: usize) {
    let len = (COLD_COPIES * KV_HEADS) * CAPACITY * HEAD_DIM;
    let keys: Vec<V> = (0..len).map(|i| make(((i * 7919 % 613) as f32 - 300.0) * 0.003)).collect();
    let values: Vec<V> = (0..len).map(|i| make(((i * 104729 % 997) as f32 - 500.0) * 0.002)).collect();
    let heads: Vec<Head<V>> = (0..COLD_COPIES * KV_HEADS)
        .map(|h| {
            let at = h * CAPACITY * HEAD_DIM..(h + 1) * CAPACITY * HEAD_DIM;
            Head { keys: &keys[at.clone()], values: &values[at] }
        })
        .collect();
    let queries: Vec<f32> = (0..QUERY_HEADS * HEAD_DIM).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.05).collect();
    for cold in [false, true] {
        // Index 0: without the prefetches of the runs' starts; 1: with them.
        let mut times = [Vec::new(), Vec::new()];
        for pass in 0..2 * PASSES {
            let copy = if cold { (pass / 2) % COLD_COPIES } else { 0 };
            let with = pass % 2;
            let heads = &heads[copy * KV_HEADS..(copy + 1) * KV_HEADS];
            let started = Instant::now();
            std::thread::scope(|scope| {
                for part in heads.chunks(KV_HEADS.div_ceil(threads)) {
                    let queries = &queries;
                    scope.spawn(move || {
                        let mut out = vec![0f32; QUERY_HEADS * HEAD_DIM];
                        attend(part, rows, queries, with == 1, &mut out);
                        std::hint::black_box(&out);
                    });
                }
            });
            times[with].push(started.elapsed().as_secs_f64() * 1e3);
        }
        let [without, with] = times.map(|mut t| {
            t.sort_by(f64::total_cmp);
            (t[t.len() / 2], t[t.len() / 4])
        });
        println!(
            "| {name} | {} | {rows} | {threads} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} |",
            if cold { "cold" } else { "hot" },
            without.0,
            without.1,
            with.0,
            with.1,
            with.0 / without.0,
            with.1 / without.1
        );
    }
}

fn main() {
    let rows: usize = std::env::args().nth(1).map_or(64, |r| r.parse().expect("ROWS: a number"));
    let threads: usize = std::env::args().nth(2).map_or(2, |t| t.parse().expect("THREADS: a number"));
    println!("| cache | reads | rows | threads | without (median / p25, ms) | with | with / without |");
    println!("|---|---|---|---|---|---|---|");
    bench::<f32>("f32", |x| x, rows, threads);
    bench::<f16>("f16", f16::from_f32, rows, threads);
}

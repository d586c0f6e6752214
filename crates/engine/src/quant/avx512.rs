//! The exact-rows product's inner loop (batched decoding) with AVX-512, where the CPU has it (detected at run
//! time: natively the project builds for x86-64-v3, which stops at AVX2). `dot`'s sixteen lanes are one 512-bit
//! register here, so a block of six activation rows against four weight rows keeps its 24 sums in registers and
//! reads each chunk of the ten rows once: the AVX2 `dot4` reads an activation row's chunk once per four weight
//! rows, and its loads, not its multiply-adds, bounded it. Every lane is the same fused multiply-add in the same
//! order as `avx2::lanes16`'s, and the lanes are summed by the same `finish`, so each value is `dot`'s bit for bit.

use std::arch::x86_64::*;

use super::avx2::finish;
use super::CacheValue;

/// Activation rows per block: 6 x 4 sums, 4 weight chunks and 1 activation chunk fill 29 of the 32 registers.
pub const ROWS: usize = 6;

/// Whether this CPU runs the kernels below.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// `out[i][r] = dot(x[i], w[r])` for up to `ROWS` activation rows, bit for bit. Call only where `available()`.
pub fn dot_block(x: &[&[f32]], w: [&[f32]; 4], out: &mut [[f32; 4]]) {
    assert!(available() && x.len() <= ROWS && out.len() == x.len());
    // SAFETY: the CPU has AVX-512 F (asserted), and `lanes16` checks the lengths it reads.
    unsafe {
        match x.len() {
            6 => finish_block(block::<6>(x.try_into().unwrap(), w), x, w, out),
            5 => finish_block(block::<5>(x.try_into().unwrap(), w), x, w, out),
            4 => finish_block(block::<4>(x.try_into().unwrap(), w), x, w, out),
            3 => finish_block(block::<3>(x.try_into().unwrap(), w), x, w, out),
            2 => finish_block(block::<2>(x.try_into().unwrap(), w), x, w, out),
            1 => finish_block(block::<1>(x.try_into().unwrap(), w), x, w, out),
            _ => {}
        }
    }
}

/// The lanes of each (activation row, weight row) pair over the whole chunks of sixteen.
#[target_feature(enable = "avx512f")]
unsafe fn block<const X: usize>(x: [&[f32]; X], w: [&[f32]; 4]) -> [[__m512; 4]; X] {
    let mut acc = [[_mm512_setzero_ps(); 4]; X];
    let chunks = x[0].len() / 16;
    // Once per call, not per chunk: every row holds the whole chunks.
    assert!(x.iter().chain(&w).all(|row| row.len() >= 16 * chunks), "dot products of unequal lengths");
    for c in 0..chunks {
        let wc = w.map(|row| _mm512_loadu_ps(row.as_ptr().add(16 * c)));
        for i in 0..X {
            let xc = _mm512_loadu_ps(x[i].as_ptr().add(16 * c));
            for r in 0..4 {
                acc[i][r] = _mm512_fmadd_ps(xc, wc[r], acc[i][r]);
            }
        }
    }
    acc
}

/// Each sum's lanes summed as AVX2's `finish` sums them. Rows of whole chunks: sixteen sums at a time by `tree16`
/// (the same additions), where `finish` took some eight instructions per sum: this function had 7.3% of an exact
/// batched SmolLM2 step's samples in `perf record` so, and 3.8% with the trees (its caller `dot_block` 3.7% and
/// 4.6%). Else lanes 0-7 and 8-15 handed to `finish` (the tree and the tail past the chunks).
#[target_feature(enable = "avx512f")]
unsafe fn finish_block<const X: usize>(acc: [[__m512; 4]; X], x: &[&[f32]], w: [&[f32]; 4], out: &mut [[f32; 4]]) {
    if x[0].len().is_multiple_of(16) {
        // Pair p (activation row p / 4, weight row p % 4) in lane p % 16 of tree p / 16.
        let mut sums = [0f32; 4 * ROWS + 8];
        for tree in 0..(4 * X).div_ceil(16) {
            let mut lanes = [_mm512_setzero_ps(); 16];
            for p in 16 * tree..(16 * tree + 16).min(4 * X) {
                lanes[PLACED[p % 16]] = acc[p / 4][p % 4];
            }
            _mm512_storeu_ps(sums.as_mut_ptr().add(16 * tree), tree16(lanes));
        }
        for (i, out) in out.iter_mut().enumerate().take(X) {
            *out = std::array::from_fn(|r| sums[4 * i + r]);
        }
        return;
    }
    for i in 0..X {
        for r in 0..4 {
            let lo = _mm512_castps512_ps256(acc[i][r]);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[i][r])));
            out[i][r] = finish(x[i], w[r], lo, hi);
        }
    }
}

/// `dot(queries[i], key(j))` for the `Q` queries and every key of `keys`, bit for bit (f16 keys: of the keys
/// widened to f32), into `out` at `rows.start + i` and column `j - keys.start` (rows of `keys.len()` values): the
/// keys in whole sets of `K` (`Q x K` at most 16 pairs), then the few left over one at a time with all the
/// queries. Those were each a `dot` of their own (an f16 key widened into a scratch row first): with 3 queries and
/// 64 keys (60 in sets, 4 left over), the scores took 5-6% less time so on an f16 cache and 0-2% on f32 (a scratch
/// build of `examples/attention_speed.rs` alternating the two). The rows' lengths are a multiple of 16. Call only
/// where `available()`.
pub fn dots<'a, const Q: usize, const K: usize, V: CacheValue>(
    queries: [&[f32]; Q],
    keys: std::ops::Range<usize>,
    key: &impl Fn(usize) -> &'a [V],
    out: &mut [f32],
    rows: std::ops::Range<usize>,
) {
    assert!(available() && Q * K <= 16 && Q > 0 && rows.len() == Q);
    let len = queries[0].len();
    assert!(len.is_multiple_of(16) && queries.iter().all(|row| row.len() == len), "rows of one length");
    assert!(out.len() >= rows.end * keys.len(), "room for the scores");
    // SAFETY: the CPU has AVX-512 F (asserted); the kernel reads `len` values of each query (asserted above) and of
    // each key (asserted in it), and writes inside rows `rows` of `out` (asserted above).
    unsafe {
        let whole = dots_in_sets::<Q, K, V>(queries, keys.clone(), keys.start, key, out, rows.start);
        dots_in_sets::<Q, 1, V>(queries, keys, whole, key, out, rows.start);
    }
}

/// `dots`'s sets from key `first` on, one after another in one function with the kernel (`pairs16`) inlined, each
/// set's scores stored by query with one masked store; returns where the whole sets end. Called set by set, with
/// three queries (SmolLM2's heads per key-value head) taking a set of four whose fourth was dropped, the scores
/// took 8.1% of a batched SmolLM2 `--int8` step's samples in `perf record`, and 6.5% so. Their values were then
/// taken out of the register one by one: 3 queries against 96 keys held in the L1 cache took 1.32-1.45 us so, and
/// 1.00-1.01 us with the stores (a scratch benchmark, alternated, docs/benchmarks.md).
#[target_feature(enable = "avx512f")]
unsafe fn dots_in_sets<'a, const Q: usize, const K: usize, V: CacheValue>(
    queries: [&[f32]; Q],
    keys: std::ops::Range<usize>,
    first: usize,
    key: &impl Fn(usize) -> &'a [V],
    out: &mut [f32],
    first_row: usize,
) -> usize {
    let (len, width) = (queries[0].len(), keys.len());
    let whole = first + (keys.end - first) / K * K;
    let ahead = V::rows_ahead(len);
    for j in (first..whole).step_by(K) {
        (j + ahead..(j + ahead + K).min(keys.end)).for_each(|j| V::prefetch(key(j)));
        let set: [&[V]; K] = std::array::from_fn(|t| key(j + t));
        assert!(set.iter().all(|row| row.len() == len), "keys as long as the queries");
        let sums = pairs16(queries, set);
        for i in 0..Q {
            // Query i's scores are lanes iK..iK + K (`pairs16`), stored from where lane iK lands on column j (the
            // masked lanes are neither read nor written).
            let at = (first_row + i) * width + (j - keys.start);
            let lanes = (((1u32 << K) - 1) << (i * K)) as u16;
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(at).wrapping_sub(i * K), lanes, sums);
        }
    }
    whole
}

/// `tree16`'s input for each lane of its output: it sums input p into lane 4 (p % 4) + p / 4, and that map is its
/// own inverse.
const PLACED: [usize; 16] = {
    let mut placed = [0; 16];
    let mut p = 0;
    while p < 16 {
        placed[p] = 4 * (p % 4) + p / 4;
        p += 1;
    }
    placed
};

/// Each pair's sixteen lanes over the rows (as `block`), then every pair's lanes summed by `tree16`: query i and
/// key t's sum in lane iK + t (the lanes past `Q x K` are zeros).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pairs16<const Q: usize, const K: usize, V: CacheValue>(queries: [&[f32]; Q], keys: [&[V]; K]) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 16];
    for c in 0..queries[0].len() / 16 {
        // The queries' chunks held, each key's loaded in turn: at most 16 sums and 4 + 1 chunks in registers.
        let qc = queries.map(|row| _mm512_loadu_ps(row.as_ptr().add(16 * c)));
        for (j, key) in keys.iter().enumerate() {
            let kc = V::load16(key, 16 * c);
            for (i, qc) in qc.iter().enumerate() {
                let p = PLACED[i * K + j];
                acc[p] = _mm512_fmadd_ps(*qc, kc, acc[p]);
            }
        }
    }
    tree16(acc)
}

/// The lanes of sixteen sums, each summed as `avx2::finish` sums them (lane i plus lane i + 8, then i + 4, i + 2,
/// i + 1; then plus the empty tail's 0), all sixteen at once: at each level, two registers' halves are brought
/// side by side and added, the same additions of the same values, so every sum is bit for bit the one-by-one
/// tree's, in 46 instructions, where sixteen of `finish`'s trees take about eight each. Sum p comes out at lane
/// 4 (p % 4) + p / 4.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tree16(a: [__m512; 16]) -> __m512 {
    // Lane i + lane i + 8: register k holds sums 2k (lanes 0-7) and 2k + 1 (lanes 8-15).
    let b: [__m512; 8] = std::array::from_fn(|k| {
        let (x, y) = (a[2 * k], a[2 * k + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y))
    });
    // + lane i + 4: register m's quarter t holds sum 4m + t.
    let c: [__m512; 4] = std::array::from_fn(|m| {
        let (x, y) = (b[2 * m], b[2 * m + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y))
    });
    // + lane i + 2: register n's quarter t holds sums 8n + t (lanes 0-1) and 8n + 4 + t (lanes 2-3).
    let d: [__m512; 2] = std::array::from_fn(|n| {
        let (x, y) = (c[2 * n], c[2 * n + 1]);
        _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y))
    });
    // + lane i + 1: quarter t holds sums t, 4 + t, 8 + t and 12 + t.
    let e = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(d[0], d[1]), _mm512_shuffle_ps::<0xDD>(d[0], d[1]));
    _mm512_add_ps(e, _mm512_setzero_ps())
}

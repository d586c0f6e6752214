//! `blocks::dot_row` written out in AVX2 and FMA for the block types of the offline models (Q8_0, Q4_1, Q5_0,
//! Q4_K, Q6_K). The portable code vectorizes only to 128-bit lanes with scattered loads, and these dot products are
//! most of a decoding step; here each block's integers are widened to eight f32 lanes at a time and multiplied
//! in 256-bit registers. The arithmetic is `blocks::dot_row`'s (eight lanes, each block's integer sums scaled
//! once), with fused multiply-adds, so the two agree up to rounding; `blocks`' tests compare them.
//!
//! Compiled where the target has AVX2 and FMA: natively the project builds for x86-64-v3 (`.cargo/config.toml`).

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::blocks::half;

/// `blocks::dot_row` for the types written here; `None` for the others.
pub fn dot_row(dtype: GgmlDType, bytes: &[u8], x: &[f32]) -> Option<f32> {
    // SAFETY: this module is compiled only where the target enables AVX2 and FMA (see `quant/mod.rs`), and each
    // kernel reads blocks and activations through `chunks_exact`, inside the slices.
    unsafe {
        Some(match dtype {
            GgmlDType::Q8_0 => q8_0(bytes, x),
            GgmlDType::Q4_1 => q4_1(bytes, x),
            GgmlDType::Q5_0 => q5_0(bytes, x),
            GgmlDType::Q4K => q4k(bytes, x),
            GgmlDType::Q6K => q6k(bytes, x),
            _ => return None,
        })
    }
}

/// The eight lanes summed in order, as `blocks::dot_row` sums its lanes.
#[inline(always)]
pub(super) unsafe fn lanes_sum(acc: __m256) -> f32 {
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum()
}

/// The f16 at `b[at..at + 2]` in all eight lanes. Converted through `vmovd`, which zeroes the register's upper
/// bits: `half()`'s `vpinsrw` merges into a register the compiler may share with the accumulator, which chained
/// every block to the previous one (a third of the Q5_0 kernel's speed).
#[inline(always)]
unsafe fn scale(b: &[u8], at: usize) -> __m256 {
    _mm256_broadcastss_ps(f16_lane0(b, at))
}

/// The f16 at `b[at..at + 2]`, converted by F16C into lane 0 (through `vmovd`, as `scale` explains).
#[inline(always)]
pub(super) unsafe fn f16_lane0(b: &[u8], at: usize) -> __m128 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]) as i32;
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits))
}

/// The two f16s at `b[at..at + 4]` (a block's scale and its minimum, or its scale and what follows) converted by F16C
/// into lanes 0 and 1 from one 32-bit load: one conversion for both, and a load that zeroes the register.
#[inline(always)]
pub(super) unsafe fn f16_pair(b: &[u8], at: usize) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))))
}

/// Eight activations from `x[at..at + 8]`.
#[inline(always)]
unsafe fn load8(x: &[f32], at: usize) -> __m256 {
    debug_assert!(at + 8 <= x.len());
    _mm256_loadu_ps(x.as_ptr().add(at))
}

/// Bytes 0..8 of `v` as eight f32, unsigned or signed.
#[inline(always)]
unsafe fn low8_u8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

#[inline(always)]
unsafe fn low8_i8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// Bytes 8..16 of `v` as eight f32 (unsigned).
#[inline(always)]
unsafe fn high8_u8(v: __m128i) -> __m256 {
    low8_u8(_mm_srli_si128::<8>(v))
}

/// Sum over 8-value chunks: lane l of `q[c] * x[at + 8c + l]` for c in 0..4, in the order `dot8` adds.
#[inline(always)]
unsafe fn dot32(q: [__m256; 4], x: &[f32], at: usize) -> __m256 {
    let mut s = _mm256_mul_ps(q[0], load8(x, at));
    s = _mm256_fmadd_ps(q[1], load8(x, at + 8), s);
    s = _mm256_fmadd_ps(q[2], load8(x, at + 16), s);
    _mm256_fmadd_ps(q[3], load8(x, at + 24), s)
}

/// Lane l of `x[at + 8c + l]` summed over c in 0..4 (`sum8`).
#[inline(always)]
unsafe fn sum32(x: &[f32], at: usize) -> __m256 {
    let s = _mm256_add_ps(load8(x, at), load8(x, at + 8));
    _mm256_add_ps(_mm256_add_ps(s, load8(x, at + 16)), load8(x, at + 24))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0(bytes: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, x) in bytes.chunks_exact(34).zip(x.chunks_exact(32)) {
        // Eight bytes at a time straight from memory: `vpmovsxbd` loads them itself, with no shuffles.
        let q = b.as_ptr().add(2);
        let v = [0, 8, 16, 24].map(|at| low8_i8(_mm_loadl_epi64(q.add(at) as *const __m128i)));
        acc = _mm256_fmadd_ps(scale(b, 0), dot32(v, x, 0), acc);
    }
    lanes_sum(acc)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1(bytes: &[u8], x: &[f32]) -> f32 {
    q4_1_with(bytes, x, |_, x, at| sum32(x, at))
}

/// Q4_1's kernel, with lane l of block `block`'s activation sum (`sum32`) from `sums(block, x, at)`: computed
/// from the activations, or read from `block_sums`.
#[inline(always)]
unsafe fn q4_1_with(bytes: &[u8], x: &[f32], sums: impl Fn(usize, &[f32], usize) -> __m256) -> f32 {
    let mask = _mm_set1_epi8(0x0f);
    // The offsets' terms apart from the scaled products: one multiply-add per block on each chain, not two on one.
    let (mut acc, mut offsets) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (i, (b, x)) in bytes.chunks_exact(20).zip(x.chunks_exact(32)).enumerate() {
        let qs = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), mask);
        let v = [low8_u8(lo), high8_u8(lo), low8_u8(hi), high8_u8(hi)];
        // The scale and the offset converted together: lanes 0 and 1 (each as `scale` converts it).
        let pair = f16_pair(b, 0);
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(pair), dot32(v, x, 0), acc);
        offsets = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(pair)), sums(i, x, 0), offsets);
    }
    lanes_sum(_mm256_add_ps(acc, offsets))
}

/// Lane l of each 32-value block's `sum32`, eight values a block: what the offsets of Q4_1 and Q4_K multiply. They
/// are the same for every weight row, so a product takes them once per activation row and hands them to
/// `dot_row_with_sums`.
pub fn block_sums(x: &[f32]) -> Vec<f32> {
    let mut sums = vec![0f32; x.len() / 32 * 8];
    // SAFETY: compiled only where the target enables AVX2 (see `dot_row`); the stores stay inside `sums`, which
    // holds eight values for each whole block `chunks_exact` yields.
    unsafe {
        for (b, xb) in x.chunks_exact(32).enumerate() {
            _mm256_storeu_ps(sums.as_mut_ptr().add(8 * b), sum32(xb, 0));
        }
    }
    sums
}

/// `dot_row` for Q4_1 and Q4_K, bit for bit, with the activations' `block_sums` given: four loads and three
/// additions fewer per 32 values, in the kernels that are most of SmolLM2's decoding. `None` for other types.
pub fn dot_row_with_sums(dtype: GgmlDType, bytes: &[u8], x: &[f32], sums: &[f32]) -> Option<f32> {
    assert!(sums.len() >= x.len() / 32 * 8, "block sums for every block");
    // SAFETY: as `dot_row`; the sums are read eight at a block, inside `sums` (asserted).
    unsafe {
        match dtype {
            GgmlDType::Q4_1 => Some(q4_1_summed(bytes, x, sums)),
            GgmlDType::Q4K => Some(q4k_summed(bytes, x, sums)),
            _ => None,
        }
    }
}

/// The eight block sums of block `block`.
#[inline(always)]
unsafe fn sums8(sums: &[f32], block: usize) -> __m256 {
    debug_assert!(8 * block + 8 <= sums.len());
    _mm256_loadu_ps(sums.as_ptr().add(8 * block))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1_summed(bytes: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    q4_1_with(bytes, x, |block, _, _| sums8(sums, block))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4k_summed(bytes: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    q4k_with(bytes, x, |block, _, _| sums8(sums, block))
}

/// Byte j of the result is 0xff where bit j of `bits` is set, 0 elsewhere: each byte of `bits` is copied to
/// eight lanes, every lane's other seven bits are set, and only lanes whose own bit was set become all ones.
#[inline(always)]
unsafe fn bytes_from_bits(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// Four runs of eight signed bytes of `v` (bytes 0..8, 8..16, 16..24, 24..32) as f32.
#[inline(always)]
unsafe fn widen_i8(v: __m256i) -> [__m256; 4] {
    let (a, b) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    [low8_i8(a), low8_i8(_mm_srli_si128::<8>(a)), low8_i8(b), low8_i8(_mm_srli_si128::<8>(b))]
}

/// `widen_i8` for unsigned bytes.
#[inline(always)]
unsafe fn widen_u8(v: __m256i) -> [__m256; 4] {
    let (a, b) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    [low8_u8(a), high8_u8(a), low8_u8(b), high8_u8(b)]
}

/// A Q5_0 block's 32 values as signed bytes: the nibbles in value order (low nibbles, then high), then value j's
/// fifth bit from bit j of qh: a nibble with its bit clear is nibble - 16, which as a signed byte is nibble | 0xf0.
#[inline(always)]
pub(super) unsafe fn q5_0_values(b: &[u8]) -> __m256i {
    let qs = _mm_loadu_si128(b[6..22].as_ptr() as *const __m128i);
    let nibbles = _mm256_and_si256(
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(qs), _mm_srli_epi16::<4>(qs)),
        _mm256_set1_epi8(0x0f),
    );
    let clear =
        _mm256_andnot_si256(bytes_from_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]])), _mm256_set1_epi8(-16));
    _mm256_or_si256(nibbles, clear)
}

/// The four runs of 32 values of half `h` of a Q6_K block (`blocks::dot_row`'s q[0..4]) as signed bytes: four
/// low bits from `ql`, two high bits from `qh`, minus 32.
#[inline(always)]
pub(super) unsafe fn q6k_runs(b: &[u8], h: usize) -> [__m256i; 4] {
    let (low4, bits45) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
    let ql0 = _mm256_loadu_si256(b[64 * h..64 * h + 32].as_ptr() as *const __m256i);
    let ql1 = _mm256_loadu_si256(b[64 * h + 32..64 * h + 64].as_ptr() as *const __m256i);
    let qh = _mm256_loadu_si256(b[128 + 32 * h..160 + 32 * h].as_ptr() as *const __m256i);
    [
        _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bits45)),
        _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_and_si256(_mm256_slli_epi16::<2>(qh), bits45)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4), _mm256_and_si256(qh, bits45)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), bits45),
        ),
    ]
    .map(|q| _mm256_sub_epi8(q, _mm256_set1_epi8(32)))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q5_0(bytes: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, x) in bytes.chunks_exact(22).zip(x.chunks_exact(32)) {
        acc = _mm256_fmadd_ps(scale(b, 0), dot32(widen_i8(q5_0_values(b)), x, 0), acc);
    }
    lanes_sum(acc)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4k(bytes: &[u8], x: &[f32]) -> f32 {
    q4k_with(bytes, x, |_, x, at| sum32(x, at))
}

/// Q4_K's kernel, with the activation sums of its 32-value blocks from `sums` as in `q4_1_with`.
#[inline(always)]
unsafe fn q4k_with(bytes: &[u8], x: &[f32], sums: impl Fn(usize, &[f32], usize) -> __m256) -> f32 {
    let mask = _mm256_set1_epi8(0x0f);
    // As in `q4_1_with`, the minimums' terms on a chain of their own.
    let (mut acc, mut offsets) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (i, (b, x)) in bytes.chunks_exact(144).zip(x.chunks_exact(256)).enumerate() {
        let (d, dmin) = (half(b, 0), half(b, 2));
        let scales = &b[4..16];
        for g in 0..4 {
            let (sc1, m1) = super::blocks::scale_min_k4(2 * g, scales);
            let (sc2, m2) = super::blocks::scale_min_k4(2 * g + 1, scales);
            let qs = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * g) as *const __m256i);
            let lo = _mm256_and_si256(qs, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(qs), mask);
            let at = 64 * g;
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc1 as f32), dot32(widen_u8(lo), x, at), acc);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc2 as f32), dot32(widen_u8(hi), x, at + 32), acc);
            offsets = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * m1 as f32), sums(8 * i + 2 * g, x, at), offsets);
            offsets = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * m2 as f32), sums(8 * i + 2 * g + 1, x, at + 32), offsets);
        }
    }
    lanes_sum(_mm256_add_ps(acc, offsets))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q6k(bytes: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, x) in bytes.chunks_exact(210).zip(x.chunks_exact(256)) {
        let d = half(b, 208);
        for h in 0..2 {
            let sc = &b[192 + 8 * h..200 + 8 * h];
            let runs = q6k_runs(b, h);
            for (k, run) in runs.into_iter().enumerate() {
                let at = 128 * h + 32 * k;
                let q = widen_i8(run);
                // Two scales per run, one per 16 values (`dot8_halves`).
                let first = _mm256_fmadd_ps(q[1], load8(x, at + 8), _mm256_mul_ps(q[0], load8(x, at)));
                let second = _mm256_fmadd_ps(q[3], load8(x, at + 24), _mm256_mul_ps(q[2], load8(x, at + 16)));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (sc[2 * k] as i8) as f32), first, acc);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (sc[2 * k + 1] as i8) as f32), second, acc);
            }
        }
    }
    lanes_sum(acc)
}

/// `blocks::dequantize` for the types written here, value for value the same bits: the same products and sums in
/// the same order (no fused multiply-adds), eight values at a time. `false` for the other types. Batched decoding
/// decodes every weight row to f32 once per step (`Form::Rows`), which the compiler's own vectorization of the
/// portable loops made a fifth of a step.
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    // SAFETY: compiled only where the target enables AVX2 (see `quant/mod.rs`); every block is read and written
    // through `chunks_exact`, inside the slices.
    unsafe {
        match dtype {
            GgmlDType::Q8_0 => dequantize_q8_0(bytes, out),
            GgmlDType::Q4_1 => dequantize_q4_1(bytes, out),
            GgmlDType::Q5_0 => dequantize_q5_0(bytes, out),
            GgmlDType::Q4K => dequantize_q4k(bytes, out),
            GgmlDType::Q6K => dequantize_q6k(bytes, out),
            _ => return false,
        }
    }
    true
}

/// Stores eight values at `y[at..at + 8]`.
#[inline(always)]
unsafe fn store8(y: &mut [f32], at: usize, v: __m256) {
    assert!(at + 8 <= y.len());
    _mm256_storeu_ps(y.as_mut_ptr().add(at), v);
}

#[target_feature(enable = "avx2")]
unsafe fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = scale(b, 0);
        let q = b.as_ptr().add(2);
        for (i, at) in [0, 8, 16, 24].into_iter().enumerate() {
            let v = low8_i8(_mm_loadl_epi64(q.add(at) as *const __m128i));
            store8(y, 8 * i, _mm256_mul_ps(v, d));
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) {
    let mask = _mm_set1_epi8(0x0f);
    for (b, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (scale(b, 0), scale(b, 2));
        let qs = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), mask);
        for (i, v) in [low8_u8(lo), high8_u8(lo), low8_u8(hi), high8_u8(hi)].into_iter().enumerate() {
            store8(y, 8 * i, _mm256_add_ps(_mm256_mul_ps(v, d), m));
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn dequantize_q5_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let d = scale(b, 0);
        for (i, v) in widen_i8(q5_0_values(b)).into_iter().enumerate() {
            store8(y, 8 * i, _mm256_mul_ps(v, d));
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn dequantize_q4k(bytes: &[u8], out: &mut [f32]) {
    let mask = _mm256_set1_epi8(0x0f);
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let (d, dmin) = (half(b, 0), half(b, 2));
        let scales = &b[4..16];
        for g in 0..4 {
            let (sc1, m1) = super::blocks::scale_min_k4(2 * g, scales);
            let (sc2, m2) = super::blocks::scale_min_k4(2 * g + 1, scales);
            let qs = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * g) as *const __m256i);
            let halves = [
                (_mm256_and_si256(qs, mask), d * sc1 as f32, dmin * m1 as f32),
                (_mm256_and_si256(_mm256_srli_epi16::<4>(qs), mask), d * sc2 as f32, dmin * m2 as f32),
            ];
            for (h, (q, scale, min)) in halves.into_iter().enumerate() {
                let (scale, min) = (_mm256_set1_ps(scale), _mm256_set1_ps(min));
                for (i, v) in widen_u8(q).into_iter().enumerate() {
                    store8(y, 64 * g + 32 * h + 8 * i, _mm256_sub_ps(_mm256_mul_ps(scale, v), min));
                }
            }
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn dequantize_q6k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = half(b, 208);
        for h in 0..2 {
            let sc = &b[192 + 8 * h..200 + 8 * h];
            let runs = q6k_runs(b, h);
            for (k, run) in runs.into_iter().enumerate() {
                // `d * scale` first, then times the value: the portable loop's order.
                for (i, v) in widen_i8(run).into_iter().enumerate() {
                    let scale = _mm256_set1_ps(d * (sc[2 * k + i / 2] as i8) as f32);
                    store8(y, 128 * h + 32 * k + 8 * i, _mm256_mul_ps(scale, v));
                }
            }
        }
    }
}

/// `quant::dot` in AVX2: sixteen lanes as two registers, each lane's products summed with fused multiply-adds in
/// chunk order, then the lanes summed in order and the tail added. `dot4` below does exactly this for each of its
/// rows, so that a row's result does not depend on whether it came in a group of four.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let [(lo, hi)] = unsafe { lanes16(a, [b]) };
    finish(a, b, lo, hi)
}

/// `dot(a, b)` for four `b`s, reading `a` once.
pub fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let sums = unsafe { lanes16(a, b) };
    [0, 1, 2, 3].map(|r| finish(a, b[r], sums[r].0, sums[r].1))
}

/// The sixteen lanes of each row's products over the whole chunks of `a` (lanes 0-7, then 8-15).
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes16<const R: usize>(a: &[f32], b: [&[f32]; R]) -> [(__m256, __m256); R] {
    let mut acc = [(_mm256_setzero_ps(), _mm256_setzero_ps()); R];
    let chunks = a.len() / 16;
    // Once per call, not per chunk: every row holds at least `a`'s whole chunks.
    assert!(b.iter().all(|row| row.len() >= 16 * chunks), "dot products of unequal lengths");
    for c in 0..chunks {
        let (a_lo, a_hi) = (load8(a, 16 * c), load8(a, 16 * c + 8));
        for r in 0..R {
            acc[r].0 = _mm256_fmadd_ps(a_lo, load8(b[r], 16 * c), acc[r].0);
            acc[r].1 = _mm256_fmadd_ps(a_hi, load8(b[r], 16 * c + 8), acc[r].1);
        }
    }
    acc
}

/// The sixteen lanes summed as a tree (`f32_dots::sum16`'s order: lane i plus lane i + 8, then i + 4, i + 2, i + 1),
/// plus the products past the whole chunks. A tree is four dependent additions where an in-order sum is fifteen:
/// with sixteen activation rows per weight row, the in-order sum was a tenth of a batched decoding step.
pub(super) fn finish(a: &[f32], b: &[f32], lo: __m256, hi: __m256) -> f32 {
    // SAFETY: register arithmetic only, on a target with AVX2 (see `quant/mod.rs`).
    let sum = unsafe {
        let eight = _mm256_add_ps(lo, hi);
        let four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps::<1>(eight));
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)))
    };
    let mut tail = 0f32;
    for i in a.len() / 16 * 16..a.len() {
        tail += a[i] * b[i];
    }
    sum + tail
}

/// Writes the 8 x 8 block at `x` (rows `x_stride` values apart) transposed at `t` (rows `t_stride` apart): eight
/// loads, the standard 24 shuffles, eight stores, where the scalar loop moved one value at a time.
///
/// # Safety
/// `x` must be valid for reads of 8 values at each of its 8 rows, `t` for writes of 8 values at each of its 8 rows.
#[inline(always)]
pub(super) unsafe fn transpose8x8(x: *const f32, x_stride: usize, t: *mut f32, t_stride: usize) {
    let r = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| _mm256_loadu_ps(x.add(i * x_stride)));
    // Rows a..h: pairs of rows interleaved (a0 b0 a1 b1 | a4 b4 a5 b5, ...).
    let a = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    // Quarter columns: a0 b0 c0 d0 | a4 b4 c4 d4, ...
    let b = [
        _mm256_shuffle_ps::<0x44>(a[0], a[2]),
        _mm256_shuffle_ps::<0xEE>(a[0], a[2]),
        _mm256_shuffle_ps::<0x44>(a[1], a[3]),
        _mm256_shuffle_ps::<0xEE>(a[1], a[3]),
        _mm256_shuffle_ps::<0x44>(a[4], a[6]),
        _mm256_shuffle_ps::<0xEE>(a[4], a[6]),
        _mm256_shuffle_ps::<0x44>(a[5], a[7]),
        _mm256_shuffle_ps::<0xEE>(a[5], a[7]),
    ];
    for j in 0..4 {
        _mm256_storeu_ps(t.add(j * t_stride), _mm256_permute2f128_ps::<0x20>(b[j], b[j + 4]));
        _mm256_storeu_ps(t.add((j + 4) * t_stride), _mm256_permute2f128_ps::<0x31>(b[j], b[j + 4]));
    }
}

//! `int8::dot_row` in AVX2 for Q4_1, Q5_0, Q4_K and Q6_K: 32 products of 8-bit integers per instruction pair
//! (`maddubs`, then `madd` into eight i32 sums), scaled per block into eight f32 lanes. The same integers as the
//! portable twin, summed in another order, so the two agree up to f32 rounding (`int8`'s tests).
//!
//! Also `int8_rows`' unpacking of weight rows to bytes (`unpack_bytes`) and scales (`unpack_scales`), which a
//! batched step does once per weight row: byte by byte, it took three times as long as the integer products.
//!
//! Compiled where the target has AVX2 and FMA (natively the project builds for x86-64-v3).

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::avx2::{f16_lane0, f16_pair, lanes_sum, q5_0_values, q6k_runs};
use super::blocks::scale_min_k4;
use super::int8::{Q8Row, BLOCK};

/// `int8::dot_row` for the types written here; `None` for the others (the portable code runs).
pub fn dot_row(dtype: GgmlDType, bytes: &[u8], x: &Q8Row) -> Option<f32> {
    // SAFETY: compiled only where the target enables AVX2 and FMA (see `quant/mod.rs`); every load reads 16 or 32
    // bytes inside a block of `bytes` or a 32-value block of `x.values`, whose lengths match (checked below).
    unsafe {
        match dtype {
            GgmlDType::Q4_1 if bytes.len() / 20 * 32 <= x.values.len() => Some(q4_1(bytes, x)),
            GgmlDType::Q5_0 if bytes.len() / 22 * 32 <= x.values.len() => Some(q5_0(bytes, x)),
            GgmlDType::Q4K if bytes.len() / 144 * 256 <= x.values.len() => Some(q4k(bytes, x)),
            GgmlDType::Q6K if bytes.len() / 210 * 256 <= x.values.len() => Some(q6k(bytes, x)),
            _ => None,
        }
    }
}

/// Eight i32 sums of four products each of unsigned `u` and signed `s` bytes, as f32.
#[inline(always)]
unsafe fn products_u8_i8(u: __m256i, s: __m256i) -> __m256 {
    let pairs = _mm256_maddubs_epi16(u, s);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// The f16 at `b[at..at + 2]` as f32, converted by F16C (`half`'s conversion may check the CPU at run time).
#[inline(always)]
unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
    _mm_cvtss_f32(f16_lane0(b, at))
}

#[inline(always)]
unsafe fn load32(values: &[i8], at: usize) -> __m256i {
    _mm256_loadu_si256(values.as_ptr().add(at) as *const __m256i)
}

unsafe fn q4_1(bytes: &[u8], x: &Q8Row) -> f32 {
    // Blocks in pairs, each on its own accumulators, so that consecutive blocks' multiply-adds do not wait on each
    // other. (An accumulator array indexed by `b % 2` lived on the stack: every block stored and reloaded it, and
    // that store took a quarter of the kernel's time in `perf`.)
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut offsets0, mut offsets1) = (_mm_setzero_ps(), _mm_setzero_ps());
    let mut pairs = bytes.chunks_exact(40);
    let mut b = 0;
    for w in &mut pairs {
        q4_1_block(&w[..20], x, b, &mut acc0, &mut offsets0);
        q4_1_block(&w[20..], x, b + 1, &mut acc1, &mut offsets1);
        b += 2;
    }
    if !pairs.remainder().is_empty() {
        q4_1_block(pairs.remainder(), x, b, &mut acc0, &mut offsets0);
    }
    lanes_sum(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(_mm_add_ss(offsets0, offsets1))
}

/// One Q4_1 block `b` (its 20 bytes `w`): its scaled products into `acc`, its offset term into lane 0 of `offsets`.
#[inline(always)]
unsafe fn q4_1_block(w: &[u8], x: &Q8Row, b: usize, acc: &mut __m256, offsets: &mut __m128) {
    let nibble = _mm_set1_epi8(0x0f);
    let qs = _mm_loadu_si128(w.as_ptr().add(4) as *const __m128i);
    let low = _mm_and_si128(qs, nibble);
    let high = _mm_and_si128(_mm_srli_epi16::<4>(qs), nibble);
    // Values 0..16 are the low nibbles, 16..32 the high ones.
    let p = products_u8_i8(_mm256_set_m128i(high, low), load32(&x.values, b * 32));
    // The scale and the offset converted together (lanes 0 and 1), where a 16-bit load each became a `vpinsrw`
    // merging into whatever register the compiler chose.
    let dm = f16_pair(w, 0);
    let scale = _mm_mul_ss(dm, _mm_set_ss(x.scale[b]));
    *acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(scale), p, *acc);
    *offsets = _mm_fmadd_ss(_mm_movehdup_ps(dm), _mm_set_ss(x.scaled_sum[b]), *offsets);
}

/// Q5_0: 5-bit values minus 16 as signed bytes (`avx2::q5_0_values`), multiplied as `maddubs` needs: their
/// magnitudes, with their signs moved onto the activations (as Q6_K's). Blocks in pairs, as Q4_1's.
unsafe fn q5_0(bytes: &[u8], x: &Q8Row) -> f32 {
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut pairs = bytes.chunks_exact(44);
    let mut b = 0;
    for w in &mut pairs {
        q5_0_block(&w[..22], x, b, &mut acc0);
        q5_0_block(&w[22..], x, b + 1, &mut acc1);
        b += 2;
    }
    if !pairs.remainder().is_empty() {
        q5_0_block(pairs.remainder(), x, b, &mut acc0);
    }
    lanes_sum(_mm256_add_ps(acc0, acc1))
}

/// One Q5_0 block `b` (its 22 bytes `w`): its scaled products into `acc`.
#[inline(always)]
unsafe fn q5_0_block(w: &[u8], x: &Q8Row, b: usize, acc: &mut __m256) {
    let v = q5_0_values(w);
    let qx = load32(&x.values, b * 32);
    let p = products_u8_i8(_mm256_sign_epi8(v, v), _mm256_sign_epi8(qx, v));
    // The scale in lane 0 (lane 1 holds qh's first bits, unused).
    let d = f16_pair(w, 0);
    let scale = _mm_mul_ss(d, _mm_set_ss(x.scale[b]));
    *acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(scale), p, *acc);
}

/// Q4_K: eight sub-blocks of 32 per 256 values, each with a 6-bit scale and minimum; sub-blocks 2j and 2j + 1 are
/// the low and high nibbles of the same 32 bytes.
unsafe fn q4k(bytes: &[u8], x: &Q8Row) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut offsets = 0f32;
    let nibble = _mm256_set1_epi8(0x0f);
    for (sb, w) in bytes.chunks_exact(144).enumerate() {
        let (d, dmin) = (f16_at(w, 0), f16_at(w, 2));
        for j in 0..4 {
            let q = _mm256_loadu_si256(w.as_ptr().add(16 + 32 * j) as *const __m256i);
            for (half, values) in
                [(0, _mm256_and_si256(q, nibble)), (1, _mm256_and_si256(_mm256_srli_epi16::<4>(q), nibble))]
            {
                let i = 2 * j + half;
                let b = sb * 8 + i;
                let (sc, m) = scale_min_k4(i, &w[4..16]);
                let p = products_u8_i8(values, load32(&x.values, b * 32));
                acc[half] = _mm256_fmadd_ps(_mm256_set1_ps(d * sc as f32 * x.scale[b]), p, acc[half]);
                offsets += dmin * m as f32 * x.scaled_sum[b];
            }
        }
    }
    lanes_sum(_mm256_add_ps(acc[0], acc[1])) - offsets
}

/// Q6_K: 6-bit values (four low bits in `ql`, two high in `qh`) minus 32 (`avx2::q6k_runs`), with an 8-bit scale
/// per 16 values. The signed values multiply as `maddubs` needs: their magnitudes, with their signs moved onto
/// the activations.
unsafe fn q6k(bytes: &[u8], x: &Q8Row) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 2];
    for (sb, w) in bytes.chunks_exact(210).enumerate() {
        let d = f16_at(w, 208);
        for h in 0..2 {
            for (t, v) in q6k_runs(w, h).into_iter().enumerate() {
                let i = 4 * h + t;
                let b = sb * 8 + i;
                let qx = load32(&x.values, b * 32);
                // Products summed in pairs, in 16-bit lanes: lanes 0..8 hold the first 16 values, 8..16 the rest.
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(qx, v));
                let scales = _mm256_set_m128i(
                    _mm_set1_epi16(w[192 + 2 * i + 1] as i8 as i16),
                    _mm_set1_epi16(w[192 + 2 * i] as i8 as i16),
                );
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, scales));
                acc[t % 2] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.scale[b]), p, acc[t % 2]);
            }
        }
    }
    lanes_sum(_mm256_add_ps(acc[0], acc[1]))
}

/// `int8_rows::portable_unpack_scales`, bit for bit, for Q4_1, Q5_0 and Q8_0 (false otherwise): the first four bytes
/// of four blocks at a time, each their f16 scale and (Q4_1) minimum, converted by one `vcvtph2ps` and split into
/// the scales and the offsets, where element by element the 16-bit loads became `vpinsrw` chains. A 16-row product
/// on one thread (`batch_speed`'s timing): Q5_0 1536 x 640 at 93.1-93.8 GMAC/s against 86.9-87.0, Q4_1 1536 x 576
/// at 90.1-90.3 against 88.9-89.3.
pub fn unpack_scales(dtype: GgmlDType, row: &[u8], scale: &mut [f32], offset: &mut [f32]) -> bool {
    match dtype {
        GgmlDType::Q4K => {
            k_quant_scales::<144>(row, scale, Some(offset));
            return true;
        }
        GgmlDType::Q6K => {
            k_quant_scales::<210>(row, scale, None);
            return true;
        }
        _ => {}
    }
    let (size, with_offset) = match dtype {
        GgmlDType::Q4_1 => (20, true),
        GgmlDType::Q5_0 => (22, false),
        GgmlDType::Q8_0 => (34, false),
        _ => return false,
    };
    let blocks = row.len() / size;
    assert!(row.len().is_multiple_of(size) && scale.len() >= blocks && (!with_offset || offset.len() >= blocks));
    // One 32-bit load per block (element by element, with a check each, the compiler assembled it byte by byte).
    let word = |b: usize| i32::from_le_bytes(row[b * size..b * size + 4].try_into().expect("four bytes"));
    let whole = blocks / 4 * 4;
    // SAFETY: compiled only where the target enables AVX2 (and F16C, as x86-64-v3 does); each store writes four
    // values at `b..b + 4`, inside `scale` and `offset` (`b + 4 <= whole <= blocks`, asserted above).
    unsafe {
        let split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        for b in (0..whole).step_by(4) {
            // Lanes 2i and 2i + 1: block b + i's first and second f16 (Q5_0's and Q8_0's second is not a scale).
            let pairs = _mm256_cvtph_ps(_mm_setr_epi32(word(b), word(b + 1), word(b + 2), word(b + 3)));
            let apart = _mm256_permutevar8x32_ps(pairs, split);
            _mm_storeu_ps(scale.as_mut_ptr().add(b), _mm256_castps256_ps128(apart));
            if with_offset {
                _mm_storeu_ps(offset.as_mut_ptr().add(b), _mm256_extractf128_ps::<1>(apart));
            }
        }
        for b in whole..blocks {
            let pair = f16_pair(row, b * size);
            scale[b] = _mm_cvtss_f32(pair);
            if with_offset {
                offset[b] = _mm_cvtss_f32(_mm_movehdup_ps(pair));
            }
        }
    }
    true
}

/// `unpack_scales` for the k-quants: per super-block of 256 values, Q4_K's eight 6-bit scales and minimums
/// (`SIZE` 144; `scale = d * sc`, `offset = -(dmin * m)`) or Q6_K's sixteen i8 scales (`SIZE` 210; `scale = d *
/// sc`), eight to a register: the same products as the portable twin's, one by one (a Gemma batched step spent
/// 3.3% of its samples there).
fn k_quant_scales<const SIZE: usize>(row: &[u8], scale: &mut [f32], offset: Option<&mut [f32]>) {
    let supers = row.len() / SIZE;
    let per = if SIZE == 144 { 8 } else { 16 };
    assert!(row.len().is_multiple_of(SIZE) && scale.len() >= per * supers);
    let mut offset = offset.inspect(|o| assert!(o.len() >= per * supers));
    for (sb, w) in row.chunks_exact(SIZE).enumerate() {
        // SAFETY: compiled only where the target enables AVX2 (and F16C, as x86-64-v3 does); the loads read 8 bytes
        // inside `w` or the local arrays, the stores write `per` values at `per * sb`, inside `scale` and `offset`
        // (asserted above).
        unsafe {
            let at = |v: &mut [f32], i: usize| v.as_mut_ptr().add(per * sb + i);
            let eight = |bytes: &[u8]| _mm_loadl_epi64(bytes.as_ptr().cast());
            if SIZE == 144 {
                let (d, dmin) = (_mm256_broadcastss_ps(f16_lane0(w, 0)), _mm256_broadcastss_ps(f16_lane0(w, 2)));
                let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
                for i in 0..8 {
                    (sc[i], m[i]) = scale_min_k4(i, &w[4..16]);
                }
                let to_f32 = |bytes: &[u8; 8]| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight(bytes)));
                _mm256_storeu_ps(at(scale, 0), _mm256_mul_ps(d, to_f32(&sc)));
                let minus = _mm256_xor_ps(_mm256_mul_ps(dmin, to_f32(&m)), _mm256_set1_ps(-0.0));
                _mm256_storeu_ps(at(offset.as_deref_mut().expect("Q4_K's offsets"), 0), minus);
            } else {
                let d = _mm256_broadcastss_ps(f16_lane0(w, 208));
                for half in 0..2 {
                    let sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight(&w[192 + 8 * half..])));
                    _mm256_storeu_ps(at(scale, 8 * half), _mm256_mul_ps(d, sc));
                }
            }
        }
    }
}

/// `int8_rows::portable_unpack_bytes`, byte for byte, for the types `int8_rows::layout` covers (false otherwise).
pub fn unpack_bytes(dtype: GgmlDType, row: &[u8], out: &mut [u8]) -> bool {
    let size = dtype.type_size();
    if !matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q4K | GgmlDType::Q5_0 | GgmlDType::Q8_0 | GgmlDType::Q6K) {
        return false;
    }
    assert!(row.len().is_multiple_of(size) && out.len() == row.len() / size * dtype.block_size());
    let blocks = row.chunks_exact(size).zip(out.chunks_exact_mut(dtype.block_size()));
    // SAFETY: compiled only where the target enables AVX2; each load reads inside a block (`size` bytes) and each
    // store writes inside its block's values (`block_size` bytes), both checked above.
    unsafe {
        let store = |out: &mut [u8], at: usize, v: __m256i| {
            assert!(at + 32 <= out.len());
            _mm256_storeu_si256(out.as_mut_ptr().add(at) as *mut __m256i, v)
        };
        let nibble = _mm256_set1_epi8(0x0f);
        match dtype {
            GgmlDType::Q4_1 => {
                for (w, out) in blocks {
                    let qs = _mm_loadu_si128(w[4..20].as_ptr() as *const __m128i);
                    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs);
                    store(out, 0, _mm256_and_si256(both, nibble));
                }
            }
            GgmlDType::Q4K => {
                for (w, out) in blocks {
                    for p in 0..4 {
                        let qs = _mm256_loadu_si256(w[16 + 32 * p..48 + 32 * p].as_ptr() as *const __m256i);
                        store(out, 64 * p, _mm256_and_si256(qs, nibble));
                        store(out, 64 * p + 32, _mm256_and_si256(_mm256_srli_epi16::<4>(qs), nibble));
                    }
                }
            }
            GgmlDType::Q5_0 => {
                for (w, out) in blocks {
                    store(out, 0, _mm256_add_epi8(q5_0_values(w), _mm256_set1_epi8(16)));
                }
            }
            GgmlDType::Q8_0 => {
                for (w, out) in blocks {
                    let q = _mm256_loadu_si256(w[2..34].as_ptr() as *const __m256i);
                    store(out, 0, _mm256_xor_si256(q, _mm256_set1_epi8(-128)));
                }
            }
            _ => {
                for (w, out) in blocks {
                    for h in 0..2 {
                        for (t, run) in q6k_runs(w, h).into_iter().enumerate() {
                            store(out, 128 * h + 32 * t, _mm256_add_epi8(run, _mm256_set1_epi8(32)));
                        }
                    }
                }
            }
        }
    }
    true
}

/// `int8::portable_quantize_into`, bit for bit: the same largest magnitude (a maximum, in any order), the same scale
/// and inverse, the same products, and halves rounded away from zero: `t = trunc(y)`, then one more step away from
/// zero where `|y - t| >= 0.5` (`y - t` is exact for |y| < 2^23, and |y| <= 127 here).
///
/// In three passes over runs of up to `RUN` blocks: every block's largest magnitude, then their scales and inverses
/// eight blocks per division (IEEE's division, the same in a vector as alone), then the rounding. Block by block, the
/// two scalar divisions waited on the largest magnitude and the rounding on them (`examples/q_speed.rs`, 16 rows of
/// 576 values, each row's room allocated: 4.9-6.0 us block by block, 3.6-6.1 us in passes; 2.2-3.6 us into rooms
/// made beforehand).
pub fn quantize_into(x: &[f32], values: &mut [i8], scale: &mut [f32], scaled_sum: &mut [f32]) {
    const RUN: usize = 64;
    let blocks = x.len() / BLOCK;
    assert!(
        x.len() == blocks * BLOCK && values.len() == x.len() && scale.len() == blocks && scaled_sum.len() == blocks
    );
    // SAFETY: compiled only where the target enables AVX2; each block reads 32 values of `x` and writes 32 bytes of
    // `values` at the same offset, inside both (their lengths are equal multiples of 32), and the runs' vectors of
    // eight scales read and write inside `amax`, `inverse` and `scale` (whole eights only).
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let load =
            |b: usize| -> [__m256; 4] { std::array::from_fn(|j| _mm256_loadu_ps(x.as_ptr().add(BLOCK * b + 8 * j))) };
        let (mut amax, mut inverse) = ([0f32; RUN], [0f32; RUN]);
        for first in (0..blocks).step_by(RUN) {
            let n = RUN.min(blocks - first);
            for (j, amax) in amax[..n].iter_mut().enumerate() {
                let magnitudes = load(first + j).map(|v| _mm256_andnot_ps(sign, v));
                let m = _mm256_max_ps(
                    _mm256_max_ps(magnitudes[0], magnitudes[1]),
                    _mm256_max_ps(magnitudes[2], magnitudes[3]),
                );
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                *amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
            }
            let eights = n / 8 * 8;
            for j in (0..eights).step_by(8) {
                let d = _mm256_div_ps(_mm256_loadu_ps(amax.as_ptr().add(j)), _mm256_set1_ps(127.0));
                let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(d, _mm256_setzero_ps());
                let inv = _mm256_and_ps(positive, _mm256_div_ps(_mm256_set1_ps(1.0), d));
                _mm256_storeu_ps(scale.as_mut_ptr().add(first + j), d);
                _mm256_storeu_ps(inverse.as_mut_ptr().add(j), inv);
            }
            for j in eights..n {
                let d = amax[j] / 127.0;
                scale[first + j] = d;
                inverse[j] = if d > 0.0 { 1.0 / d } else { 0.0 };
            }
            for (j, &inverse) in inverse[..n].iter().enumerate() {
                let b = first + j;
                let inv = _mm256_set1_ps(inverse);
                let q = load(b).map(|v| {
                    let y = _mm256_mul_ps(v, inv);
                    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                    let half_or_more =
                        _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_andnot_ps(sign, _mm256_sub_ps(y, t)), _mm256_set1_ps(0.5));
                    let away = _mm256_or_ps(_mm256_and_ps(y, sign), _mm256_set1_ps(1.0));
                    _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(half_or_more, away)))
                });
                // Four rows of eight i32 to 32 bytes in order: packs work within 128-bit halves, hence the permute.
                let words = _mm256_packs_epi32(q[0], q[1]);
                let words2 = _mm256_packs_epi32(q[2], q[3]);
                let bytes = _mm256_permutevar8x32_epi32(
                    _mm256_packs_epi16(words, words2),
                    _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
                );
                _mm256_storeu_si256(values.as_mut_ptr().add(BLOCK * b) as *mut __m256i, bytes);
                let sums = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                scaled_sum[b] = scale[b] * lanes_sum_i32(sums) as f32;
            }
        }
    }
}

/// The sum of eight i32 lanes.
#[inline(always)]
unsafe fn lanes_sum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
}

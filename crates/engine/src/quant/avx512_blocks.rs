//! `blocks::dot_row` for Q5_0 (most of Gemma 3's layer weights) in AVX-512, where the CPU has AVX-512 F (detected
//! at run time: natively the project builds for x86-64-v3, which stops at AVX2). A block's 32 values are two
//! registers of sixteen lanes where AVX2 takes four of eight: two widenings and two multiply-adds a block, not four.
//!
//! `dot_speed` on one thread, the two kernels in the same binary alternated, GB/s of blocks: 7.79-8.28 against
//! 5.55-7.45 for AVX2 in six pairs. The same kernels for Q8_0, Q4_1 and Q4_K were tried and not kept: they were
//! not clearly faster than AVX2 (docs/benchmarks.md, the section "2026-12-04 (night): decoding kernels").
//!
//! The arithmetic is `blocks::dot_row`'s (each block's integer sums scaled once) in sixteen lanes, so it agrees
//! with the portable twin and the AVX2 kernel up to the order of the f32 sums (`blocks`' tests compare all three).
//!
//! Also `blocks::dequantize` for Q8_0, Q4_1, Q5_0, Q4_K and Q6_K, which the exact batched products (`Form::Rows`) run on
//! every weight row of every step: with AVX2 it took 21.5% of a SmolLM2 batched step's samples, 19.7% here, for
//! it waited on the weights' bytes (the prefetch in `QuantMatrix::band` brought Q4_1's to 12.8%). Each value is
//! the portable twin's bit for bit (the same multiply, then add or subtract, per value).

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::avx2::{f16_lane0, q5_0_values};

/// `blocks::dot_row` for Q5_0 where the CPU has AVX-512 F; `None` otherwise (AVX2 runs).
pub fn dot_row(dtype: GgmlDType, bytes: &[u8], x: &[f32]) -> Option<f32> {
    if dtype != GgmlDType::Q5_0 || !super::avx512::available() {
        return None;
    }
    // SAFETY: the CPU has AVX-512 F (checked above) and the target AVX2 and FMA (see `quant/mod.rs`); every load
    // reads inside a block that `chunks_exact` yields, or inside its 32 activations.
    Some(unsafe { q5_0(bytes, x) })
}

/// `blocks::dequantize` for the types below where the CPU has AVX-512 F (false otherwise: AVX2 runs).
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    if !super::avx512::available() {
        return false;
    }
    // SAFETY: the CPU has AVX-512 F (checked above) and the target AVX2 and F16C (see `quant/mod.rs`); every block
    // is read and written through `chunks_exact`, inside the slices.
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

/// Stores sixteen values at `y[at..at + 16]`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store16(y: &mut [f32], at: usize, v: __m512) {
    assert!(at + 16 <= y.len());
    _mm512_storeu_ps(y.as_mut_ptr().add(at), v);
}

/// The sixteen values of a nibble, 0 to 15, in lane order: the table decoders' indices as f32.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn nibbles() -> __m512 {
    _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.)
}

#[target_feature(enable = "avx512f")]
unsafe fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = _mm512_broadcastss_ps(f16_lane0(b, 0));
        for i in 0..2 {
            let q = _mm_loadu_si128(b[2 + 16 * i..18 + 16 * i].as_ptr().cast());
            store16(y, 16 * i, _mm512_mul_ps(widen_i8(q), d));
        }
    }
}

/// Q4_1 from a table per block: the sixteen values a nibble stands for (`q * d + m`, the same multiply, then add,
/// as the portable twin's), looked up by `vpermps` as in `dequantize_q5_0`. On rows in the L1 cache, 1.7-2.2 ns a
/// block against 2.4-2.6 converting each value (docs/benchmarks.md, stop 51).
#[target_feature(enable = "avx512f")]
unsafe fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (_mm512_broadcastss_ps(f16_lane0(b, 0)), _mm512_broadcastss_ps(f16_lane0(b, 2)));
        let table = _mm512_add_ps(_mm512_mul_ps(nibbles(), d), m);
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(b[4..20].as_ptr().cast()));
        // Values 0-15 in the low nibbles, 16-31 in the high ones.
        store16(y, 0, _mm512_permutexvar_ps(bytes, table));
        store16(y, 16, _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table));
    }
}

/// Q5_0 from two tables per block: the sixteen values a nibble stands for with its fifth bit clear (`(q - 16) *
/// d`) and set (`q * d`), each the same multiply as the portable twin's, looked up by `vpermps` (which reads only
/// the low four bits of each lane: the bytes widened to lanes give the low nibbles, shifted down by four the high
/// ones) and merged under a mask of the block's fifth bits. On rows in the L1 cache, 2.00-2.03 ns a block against
/// 2.52-2.53 converting each value (docs/benchmarks.md, stop 51).
#[target_feature(enable = "avx512f")]
unsafe fn dequantize_q5_0(bytes: &[u8], out: &mut [f32]) {
    let clear = _mm512_setr_ps(-16., -15., -14., -13., -12., -11., -10., -9., -8., -7., -6., -5., -4., -3., -2., -1.);
    let set = nibbles();
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let d = _mm512_broadcastss_ps(f16_lane0(b, 0));
        let (clear, set) = (_mm512_mul_ps(clear, d), _mm512_mul_ps(set, d));
        let fifth = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(b[6..22].as_ptr().cast()));
        // Values 0-15 in the low nibbles, 16-31 in the high ones.
        for (i, nibbles) in [bytes, _mm512_srli_epi32::<4>(bytes)].into_iter().enumerate() {
            let value = _mm512_mask_permutexvar_ps(
                _mm512_permutexvar_ps(nibbles, clear),
                (fifth >> (16 * i)) as u16,
                nibbles,
                set,
            );
            store16(y, 16 * i, value);
        }
    }
}

/// Q4_K from a table per run of 32 values (each run has its own scale and minimum): the sixteen values a nibble
/// stands for (`d * scale * q - dmin * min`, the same multiply, then subtract, as the portable twin's), looked up
/// by `vpermps` as in `dequantize_q4_1`. A group's 32 bytes hold two runs: the low nibbles, then the high ones.
#[target_feature(enable = "avx512f")]
unsafe fn dequantize_q4k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let (d, dmin) = (super::blocks::half(b, 0), super::blocks::half(b, 2));
        let scales = &b[4..16];
        for g in 0..4 {
            // (Not `[0, 1].map(..)`: built so, the decoder ran at half the old one's speed, its closure likely
            // compiled without AVX-512; docs/benchmarks.md, stop 52.)
            let mut tables = [_mm512_setzero_ps(); 2];
            for (h, table) in tables.iter_mut().enumerate() {
                let (sc, m) = super::blocks::scale_min_k4(2 * g + h, scales);
                let scaled = _mm512_mul_ps(_mm512_set1_ps(d * sc as f32), nibbles());
                *table = _mm512_sub_ps(scaled, _mm512_set1_ps(dmin * m as f32));
            }
            for i in 0..2 {
                let at = 16 + 32 * g + 16 * i;
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(b[at..at + 16].as_ptr().cast()));
                store16(y, 64 * g + 16 * i, _mm512_permutexvar_ps(bytes, tables[0]));
                store16(y, 64 * g + 32 + 16 * i, _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), tables[1]));
            }
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn dequantize_q6k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = super::blocks::half(b, 208);
        for h in 0..2 {
            let sc = &b[192 + 8 * h..200 + 8 * h];
            for (k, run) in super::avx2::q6k_runs(b, h).into_iter().enumerate() {
                let runs = [_mm256_castsi256_si128(run), _mm256_extracti128_si256::<1>(run)];
                for (i, run) in runs.into_iter().enumerate() {
                    // `d * scale` first, then times the value: the portable loop's order.
                    let scale = _mm512_set1_ps(d * (sc[2 * k + i] as i8) as f32);
                    store16(y, 128 * h + 32 * k + 16 * i, _mm512_mul_ps(scale, widen_i8(run)));
                }
            }
        }
    }
}

/// Sixteen signed bytes as f32.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen_i8(v: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
}

#[target_feature(enable = "avx512f")]
unsafe fn q5_0(bytes: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    for (b, x) in bytes.chunks_exact(22).zip(x.chunks_exact(32)) {
        let values = q5_0_values(b);
        let low = widen_i8(_mm256_castsi256_si128(values));
        let high = widen_i8(_mm256_extracti128_si256::<1>(values));
        let products = _mm512_fmadd_ps(
            high,
            _mm512_loadu_ps(x[16..32].as_ptr()),
            _mm512_mul_ps(low, _mm512_loadu_ps(x[..16].as_ptr())),
        );
        acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(f16_lane0(b, 0)), products, acc);
    }
    _mm512_reduce_add_ps(acc)
}

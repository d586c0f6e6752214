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

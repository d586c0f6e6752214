//! The value types a KV cache holds, f32 or f16 (`LoadOptions::f16_cache`), as decoding attention's kernels read
//! them (`dots_rows`, `model::value_sums`). An f16 value is widened to f32 as it is loaded, so every sum is the one
//! the f32 kernels make of the widened values, bit for bit: the f16 cache departs from the f32 one only by the
//! rounding of each key and value on its way into the cache. Widening in the kernels, not into a buffer first,
//! keeps the loads from memory overlapped with the arithmetic: converting 64 rows at a time into an f32 scratch
//! (tried first) read half the bytes and took as long as the f32 cache.

/// A value of a KV cache's rows.
pub trait CacheValue: Copy + Send + Sync + 'static {
    /// `row` as f32 values: the row itself, or widened into `scratch` (the portable paths and the tails).
    fn as_f32<'a>(row: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];

    /// `prefetch` for a row ahead of the one being read.
    fn prefetch(row: &[Self]);

    /// How many rows of `len` values attention's kernels ask for ahead of the one they read, and how many of a
    /// head's keys or values they ask for before they start on them (`CacheRows::prefetch_start`): as many as make
    /// the products' distance ahead (`PREFETCH_AHEAD_BYTES`, 2 KB), 8 rows of 64 f32 values (the distance first
    /// measured) and 16 of f16. At 8 rows of f16 too, the scores waited on memory: in a scratch build of
    /// `examples/attention_speed.rs` (passes alternated between the two distances), they took 7% less time at 16
    /// rows on an f16 cache read from memory, 0-4% less on one the L3 cache held; f32 rows at 16 took up to 8%
    /// longer than at 8.
    fn rows_ahead(len: usize) -> usize {
        (super::PREFETCH_AHEAD_BYTES / (len * std::mem::size_of::<Self>()).max(1)).max(1)
    }

    /// Sixteen values from `row` in one register, as f32.
    ///
    /// # Safety
    /// Call only where the CPU has AVX-512 F, with `row` at least sixteen values long from `at`.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    unsafe fn load16(row: &[Self], at: usize) -> std::arch::x86_64::__m512;
}

impl CacheValue for f32 {
    fn as_f32<'a>(row: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        row
    }

    #[inline(always)]
    fn prefetch(row: &[f32]) {
        super::prefetch_values(row)
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(row: &[f32], at: usize) -> std::arch::x86_64::__m512 {
        debug_assert!(at + 16 <= row.len());
        std::arch::x86_64::_mm512_loadu_ps(row.as_ptr().add(at))
    }
}

impl CacheValue for half::f16 {
    fn as_f32<'a>(row: &'a [half::f16], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        scratch.resize(row.len(), 0.0);
        row.convert_to_f32_slice(scratch);
        scratch
    }

    #[inline(always)]
    fn prefetch(row: &[half::f16]) {
        super::prefetch(Some(bytemuck::cast_slice(row)))
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(row: &[half::f16], at: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        debug_assert!(at + 16 <= row.len());
        _mm512_cvtph_ps(_mm256_loadu_si256(row.as_ptr().add(at).cast()))
    }
}

#[cfg(test)]
mod tests {
    use super::CacheValue;

    /// Both types give their values as f32 (f16 widened exactly), and with AVX-512 sixteen at a time the same.
    #[test]
    fn values_read_as_f32() {
        let wide: Vec<f32> = (0..32).map(|i| (i as f32 - 13.0) * 0.3).collect();
        let halves: Vec<half::f16> = wide.iter().map(|&x| half::f16::from_f32(x)).collect();
        let widened: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
        let mut scratch = Vec::new();
        assert_eq!(f32::as_f32(&wide, &mut scratch), &wide[..]);
        assert_eq!(half::f16::as_f32(&halves, &mut scratch), &widened[..]);
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if std::is_x86_feature_detected!("avx512f") {
            let lanes = |v: std::arch::x86_64::__m512| -> [f32; 16] {
                // SAFETY: the CPU has AVX-512 F (checked above).
                let mut out = [0f32; 16];
                unsafe { std::arch::x86_64::_mm512_storeu_ps(out.as_mut_ptr(), v) };
                out
            };
            // SAFETY: as above; both rows hold 32 values.
            unsafe {
                assert_eq!(lanes(f32::load16(&wide, 16)), wide[16..32]);
                assert_eq!(lanes(half::f16::load16(&halves, 16)), widened[16..32]);
            }
        }
    }
}

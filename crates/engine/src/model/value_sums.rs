//! The weighted sums of a cache's value rows that end each query head's attention in a decoding step: `out[d] +=
//! w[j] * v_j[d]` for every row j in order, a multiply and then an add (never fused), so that every path below gives
//! the same numbers bit for bit.
//!
//! The query heads that share a key-value head (grouped-query attention: SmolLM2's 9 heads share 3, Gemma 3's 4
//! share 1) are summed together (`weighted_sums`): each value row is read once for all of them, where head by head
//! it was read once per head, and with AVX-512 (detected at run time) sixteen values per instruction where the
//! build's AVX2 does eight.

use crate::quant::CacheValue;

/// Values per run of `out` held in registers across all the rows.
const CHUNK: usize = 64;

/// `out[d] += weights[j] * value(j)[d]` for every j in order, value by value as the plain loop adds them, with
/// `out` held in registers 64 values at a time across all the rows, where the plain loop loaded and stored `out`
/// once per row (a batched SmolLM2 step's attention, apart from its products: 3.80-3.83 ms before, 3.55-3.70 after).
pub fn weighted_sum<'a, V: CacheValue>(out: &mut [f32], weights: &[f32], value: impl Fn(usize) -> &'a [V]) {
    let whole = out.len() / CHUNK * CHUNK;
    // f16 rows widened here (f32 rows are read as they are).
    let mut scratch = Vec::new();
    for (c, chunk) in out[..whole].chunks_exact_mut(CHUNK).enumerate() {
        let mut acc: [f32; CHUNK] = chunk.try_into().expect("a chunk of CHUNK values");
        for (j, &w) in weights.iter().enumerate() {
            let row = V::as_f32(&value(j)[c * CHUNK..(c + 1) * CHUNK], &mut scratch);
            let v: &[f32; CHUNK] = row.try_into().expect("CHUNK values");
            for d in 0..CHUNK {
                acc[d] += w * v[d];
            }
        }
        chunk.copy_from_slice(&acc);
    }
    for (j, &w) in weights.iter().enumerate() {
        for (o, &x) in out[whole..].iter_mut().zip(V::as_f32(&value(j)[whole..], &mut scratch)) {
            *o += w * x;
        }
    }
}

/// `weighted_sum` for several heads over the same value rows: head h's weights are `weights[h * rows..(h + 1) *
/// rows]` and its output `outs[h * width..(h + 1) * width]`, each bit for bit `weighted_sum`'s. With AVX-512, up to
/// four heads at a time share each row's loads. The rows may be f16 (an f16 cache): the sums are then
/// `weighted_sum`'s of the rows widened to f32.
pub fn weighted_sums<'a, V: CacheValue>(
    outs: &mut [f32],
    width: usize,
    weights: &[f32],
    value: impl Fn(usize) -> &'a [V],
) {
    let heads = outs.len() / width.max(1);
    let rows = weights.len() / heads.max(1);
    assert!(heads * width == outs.len() && heads * rows == weights.len());
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if width.is_multiple_of(CHUNK) && std::is_x86_feature_detected!("avx512f") {
        for first in (0..heads).step_by(avx512::HEADS) {
            let n = avx512::HEADS.min(heads - first);
            let outs = &mut outs[first * width..(first + n) * width];
            let weights = &weights[first * rows..(first + n) * rows];
            // SAFETY: the CPU has AVX-512 F (checked above); the kernel checks the lengths it reads and writes.
            unsafe {
                match n {
                    4 => avx512::sums::<4, V>(outs, width, weights, &value),
                    3 => avx512::sums::<3, V>(outs, width, weights, &value),
                    2 => avx512::sums::<2, V>(outs, width, weights, &value),
                    _ => avx512::sums::<1, V>(outs, width, weights, &value),
                }
            }
        }
        return;
    }
    for (out, weights) in outs.chunks_exact_mut(width).zip(weights.chunks_exact(rows.max(1))) {
        weighted_sum(out, weights, &value);
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx512 {
    use std::arch::x86_64::*;

    use super::CHUNK;
    use crate::quant::CacheValue;

    /// Heads per pass: their 64-value runs fill 16 of the 32 registers.
    pub const HEADS: usize = 4;

    /// `weighted_sums` for `H` heads, `width` a multiple of `CHUNK`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sums<'a, const H: usize, V: CacheValue>(
        outs: &mut [f32],
        width: usize,
        weights: &[f32],
        value: &impl Fn(usize) -> &'a [V],
    ) {
        let rows = weights.len() / H;
        assert!(outs.len() == H * width && weights.len() == H * rows && width.is_multiple_of(CHUNK));
        let ahead = V::rows_ahead(CHUNK);
        for c in 0..width / CHUNK {
            let at = |h: usize, q: usize| h * width + c * CHUNK + 16 * q;
            let mut acc: [[__m512; 4]; H] =
                std::array::from_fn(|h| std::array::from_fn(|q| _mm512_loadu_ps(outs.as_ptr().add(at(h, q)))));
            for j in 0..rows {
                if j + ahead < rows {
                    V::prefetch(&value(j + ahead)[c * CHUNK..(c + 1) * CHUNK]);
                }
                let row = &value(j)[c * CHUNK..(c + 1) * CHUNK];
                let v: [__m512; 4] = std::array::from_fn(|q| V::load16(row, 16 * q));
                for (h, acc) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*weights.get_unchecked(h * rows + j));
                    for q in 0..4 {
                        acc[q] = _mm512_add_ps(acc[q], _mm512_mul_ps(w, v[q]));
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (q, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(outs.as_mut_ptr().add(at(h, q)), *acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{weighted_sum, weighted_sums};

    fn rows(width: usize) -> Vec<Vec<f32>> {
        (0..37).map(|j| (0..width).map(|d| ((j * 7919 + d * 104729) % 1999) as f32 / 999.5 - 1.0).collect()).collect()
    }

    /// `weighted_sum` adds as the plain loop does, bit for bit: rows of 64 and 256 values (whole chunks) and of 80
    /// (a chunk and a tail), onto an output that does not start at zero.
    #[test]
    fn weighted_sum_is_the_plain_loop_bit_for_bit() {
        for width in [64, 80, 256] {
            let rows = rows(width);
            let weights: Vec<f32> = (0..rows.len()).map(|j| ((j * 31 % 17) as f32 + 0.1) / 9.3).collect();
            let start: Vec<f32> = (0..width).map(|d| d as f32 * 0.37 - 3.0).collect();
            let mut want = start.clone();
            for (&w, row) in weights.iter().zip(&rows) {
                for (o, &x) in want.iter_mut().zip(row) {
                    *o += w * x;
                }
            }
            let mut got = start.clone();
            weighted_sum(&mut got, &weights, |j| &rows[j]);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "width {width}");
        }
    }

    /// Several heads at once (`weighted_sums`: 1 to 6 heads, so a pass of four and one of the rest where the CPU
    /// has AVX-512) give each head `weighted_sum`'s values bit for bit.
    #[test]
    fn heads_together_are_each_heads_weighted_sum() {
        for width in [64, 80, 256] {
            let rows = rows(width);
            for heads in 1..=6 {
                let weights: Vec<f32> =
                    (0..heads * rows.len()).map(|i| ((i * 31 % 17) as f32 + 0.1) / (9.3 + (i / 37) as f32)).collect();
                let start: Vec<f32> = (0..heads * width).map(|d| d as f32 * 0.37 - 3.0).collect();
                let mut got = start.clone();
                weighted_sums(&mut got, width, &weights, |j| &rows[j]);
                for h in 0..heads {
                    let mut want = start[h * width..(h + 1) * width].to_vec();
                    weighted_sum(&mut want, &weights[h * rows.len()..(h + 1) * rows.len()], |j| &rows[j]);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got[h * width..(h + 1) * width]),
                        bits(&want),
                        "width {width}, head {h} of {heads}"
                    );
                }
            }
        }
    }

    /// f16 rows (an f16 cache) give each head `weighted_sum`'s values of the rows widened to f32, bit for bit: with
    /// AVX-512 the kernel widens sixteen at a time as it loads, elsewhere `weighted_sum` widens row by row.
    #[test]
    fn f16_rows_sum_as_the_widened_rows() {
        for width in [64, 80, 256] {
            let halves: Vec<Vec<half::f16>> =
                rows(width).iter().map(|row| row.iter().map(|&x| half::f16::from_f32(x * 7.0)).collect()).collect();
            let widened: Vec<Vec<f32>> = halves.iter().map(|row| row.iter().map(|h| h.to_f32()).collect()).collect();
            for heads in [1, 3, 5] {
                let weights: Vec<f32> =
                    (0..heads * halves.len()).map(|i| ((i * 31 % 17) as f32 + 0.1) / (9.3 + (i / 37) as f32)).collect();
                let start: Vec<f32> = (0..heads * width).map(|d| d as f32 * 0.37 - 3.0).collect();
                let mut got = start.clone();
                weighted_sums(&mut got, width, &weights, |j| &halves[j]);
                let mut want = start.clone();
                weighted_sums(&mut want, width, &weights, |j| &widened[j]);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "width {width}, {heads} heads");
                let mut alone = start[..width].to_vec();
                weighted_sum(&mut alone, &weights[..halves.len()], |j| &halves[j]);
                assert_eq!(bits(&alone), bits(&want[..width]), "width {width}, weighted_sum of f16 rows");
            }
        }
    }
}

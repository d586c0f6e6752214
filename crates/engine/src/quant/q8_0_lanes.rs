//! Q8_0 weight rows repacked in groups of sixteen for a single sequence's decoding steps, exactly, on CPUs with
//! AVX-512 (detected at run time): as `q4_1_lanes` does for Q4_1, sixteen weight rows in the sixteen lanes of a
//! register and each activation broadcast. Per value of sixteen rows: one `vpmovsxbd` from memory (the sixteen
//! rows' bytes lie side by side), one conversion to f32 and one multiply-add. `blocks::dot_row`'s AVX2 kernel
//! converted and multiplied eight values of one row per instruction, and SmolLM2's output matrix (30 MB, read at
//! every token) took a quarter of a decoding step there with the layers in `q4_1_lanes`.
//!
//! Both offline models' output matrix is Q8_0 (their embedding, tied); with `--int8`, Q8_0 stays exact in a single
//! sequence's steps (`int8`'s module comment), so this kernel serves both modes.

use super::lanes::{RowGroups, LANES};

/// Bytes of one block of sixteen rows: the 32 values of each row, value by value (sixteen bytes each), then
/// sixteen f16 scales. As many bytes as the sixteen rows' blocks in the file.
pub(super) const BLOCK_BYTES: usize = 32 * LANES + 2 * LANES;

/// A Q8_0 matrix's rows in groups of sixteen, block by block as the kernel reads them.
pub struct Q8_0Lanes(pub(super) RowGroups);

impl Q8_0Lanes {
    /// The first `rows / 16 * 16` rows of `raw` (Q8_0 blocks: an f16 scale and 32 signed bytes; `k` values a row)
    /// repacked; rows past the last whole group are left to the one-row kernels.
    pub fn new(raw: &[u8], rows: usize, k: usize) -> Self {
        Self(RowGroups::new(raw, rows, k, 34, BLOCK_BYTES, |lane, block, out| {
            for (c, &value) in block[2..].iter().enumerate() {
                out[LANES * c + lane] = value;
            }
            out[32 * LANES + 2 * lane..32 * LANES + 2 * lane + 2].copy_from_slice(&block[..2]);
        }))
    }

    /// Whole groups of sixteen rows.
    pub fn groups(&self) -> usize {
        self.0.groups()
    }

    /// Rows `16 g..16 g + 16` of the exact product with `x` into `out`, in the AVX-512 kernel where the CPU has it,
    /// else the portable twin, the same f32 operations in the same order. Per lane and block, values `d q`:
    ///
    /// ```text
    /// p[c % 4] = fma(q[c], x[c], p[c % 4])        c = 0..32, each p from 0
    /// acc = fma(d, (p0 + p1) + (p2 + p3), acc)
    /// ```
    pub fn exact_group(&self, g: usize, x: &[f32], out: &mut [f32; LANES]) {
        assert!(g < self.0.groups() && x.len() >= 32 * self.0.blocks());
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if super::lanes::available() {
            // SAFETY: the CPU has AVX-512 F and F16C; the kernel reads the group's `blocks` blocks and as many
            // blocks of `x` (asserted above), and writes the 16 values of `out`.
            return unsafe { avx512::exact_group(self.0.group(g).as_ptr(), self.0.blocks(), x, out) };
        }
        self.portable_exact_group(g, x, out)
    }

    /// `exact_group` in portable Rust.
    pub fn portable_exact_group(&self, g: usize, x: &[f32], out: &mut [f32; LANES]) {
        *out = [0.0; LANES];
        for (b, block) in self.0.group(g).chunks_exact(BLOCK_BYTES).enumerate() {
            let xb = &x[32 * b..32 * b + 32];
            for (lane, acc) in out.iter_mut().enumerate() {
                let mut p = [0f32; 4];
                for (c, &xc) in xb.iter().enumerate() {
                    p[c % 4] = (block[LANES * c + lane] as i8 as f32).mul_add(xc, p[c % 4]);
                }
                let d = super::blocks::half(block, 32 * LANES + 2 * lane);
                *acc = d.mul_add((p[0] + p[1]) + (p[2] + p[3]), *acc);
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK_BYTES, LANES};
    use crate::quant::lanes::prefetch_ahead;

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn exact_group(data: *const u8, blocks: usize, x: &[f32], out: &mut [f32; LANES]) {
        let mut acc = _mm512_setzero_ps();
        for b in 0..blocks {
            let block = data.add(b * BLOCK_BYTES);
            prefetch_ahead(block, BLOCK_BYTES);
            let xb = x.as_ptr().add(32 * b);
            let mut p = [_mm512_setzero_ps(); 4];
            for c in 0..32 {
                let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(LANES * c).cast()));
                p[c % 4] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(*xb.add(c)), p[c % 4]);
            }
            let partial = _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3]));
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(block.add(32 * LANES).cast()));
            acc = _mm512_fmadd_ps(d, partial, acc);
        }
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::quant::blocks::dequantize;

    /// The kernel the CPU runs is the portable twin bit for bit, and both are the f64 product of the decoded
    /// weights with the activations up to f32 rounding, on weights and activations of both signs.
    #[test]
    fn exact_lanes_are_the_twin_and_the_decoded_product() {
        let (n, k) = (32, 544);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap();
        let raw = q.data().unwrap();
        let lanes = Q8_0Lanes::new(&raw, n, k);
        let x: Vec<f32> = (0..k).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect();
        let row_bytes = k / 32 * 34;
        for g in 0..lanes.groups() {
            let (mut fast, mut portable) = ([0f32; LANES], [0f32; LANES]);
            lanes.exact_group(g, &x, &mut fast);
            lanes.portable_exact_group(g, &x, &mut portable);
            for lane in 0..LANES {
                assert_eq!(fast[lane].to_bits(), portable[lane].to_bits(), "group {g} lane {lane}");
                let r = g * LANES + lane;
                let mut deq = vec![0f32; k];
                dequantize(GgmlDType::Q8_0, &raw[r * row_bytes..(r + 1) * row_bytes], &mut deq);
                let want: f64 = deq.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let magnitude: f64 = deq.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let got = portable[lane] as f64;
                assert!((got - want).abs() <= 1e-5 * magnitude, "row {r}: {got} vs {want} (magnitude {magnitude})");
            }
        }
    }
}

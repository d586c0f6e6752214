//! A single sequence's decoding products with 8-bit activations (`--int8`) for Q4_1, with sixteen weight rows in
//! the sixteen lanes of an AVX-512 register, where the CPU has VNNI (detected at run time).
//!
//! One activation row leaves nothing to put in the lanes of `int8_rows`' kernel (a lane per activation row), and
//! `int8::dot_row` takes one weight row at a time: per block of 32 values, some fifteen instructions of unpacking,
//! products, scaling and summing. That kernel ran at 16 G weights per second on one thread, the same with its
//! rows in the L2 cache as in a decoding step, where memory gave 10 GB/s to each of two threads (its 0.625 bytes a
//! weight): bound by its instructions, not by memory. Here each block's four-byte groups of sixteen rows lie side
//! by side (`Q4_1Lanes`, repacked once when the matrix is told to round), so one `vpdpbusd` multiplies four values
//! of sixteen rows with four activations broadcast to every lane: eight of them and some ten other instructions
//! per block of sixteen rows.
//!
//! Each lane does `int8_rows`' operations in its order (that module's comment), so a row's value is the batched
//! step's bit for bit: a sequence decoding alone gets the numbers it gets in a batch.

use super::int8::Q8Row;

/// Weight rows per group (one 512-bit register of f32 or i32).
pub const LANES: usize = 16;

/// Bytes of one block of sixteen rows: four registers of nibbles, then sixteen f16 scales and sixteen f16
/// minimums.
const BLOCK_BYTES: usize = 4 * 64 + 2 * 32;

/// A Q4_1 matrix's rows in groups of sixteen, block by block as the kernel reads them.
///
/// A Q4_1 block is an f16 scale `d`, an f16 minimum `m` and 16 bytes whose low nibbles are values 0..16 and high
/// nibbles values 16..32: bytes `4j..4j + 4` hold values `4j..4j + 4` and `16 + 4j..`. Per group and block, register
/// j holds those four bytes of each of the sixteen rows, lane after lane; then the rows' scales, then their
/// minimums. The same bytes as the file, in another order: the repacked matrix is as large as the original.
pub struct Q4_1Lanes {
    groups: usize,
    blocks: usize,
    data: Vec<u8>,
}

impl Q4_1Lanes {
    /// The first `rows / 16 * 16` rows of `raw` (Q4_1 blocks, `k` values a row) repacked; rows past the last whole
    /// group are left to `int8::dot_row`.
    pub fn new(raw: &[u8], rows: usize, k: usize) -> Self {
        let (groups, blocks) = (rows / LANES, k / 32);
        let row_bytes = blocks * 20;
        assert!(raw.len() >= rows * row_bytes && k % 32 == 0);
        let mut data = vec![0u8; groups * blocks * BLOCK_BYTES];
        for (g, group) in data.chunks_exact_mut(blocks * BLOCK_BYTES).enumerate() {
            for (b, out) in group.chunks_exact_mut(BLOCK_BYTES).enumerate() {
                for lane in 0..LANES {
                    let at = (g * LANES + lane) * row_bytes + b * 20;
                    let block = &raw[at..at + 20];
                    for j in 0..4 {
                        out[64 * j + 4 * lane..64 * j + 4 * lane + 4].copy_from_slice(&block[4 + 4 * j..8 + 4 * j]);
                    }
                    out[256 + 2 * lane..258 + 2 * lane].copy_from_slice(&block[0..2]);
                    out[288 + 2 * lane..290 + 2 * lane].copy_from_slice(&block[2..4]);
                }
            }
        }
        Self { groups, blocks, data }
    }

    /// Whole groups of sixteen rows.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Rows `16 g..16 g + 16` of the product with `x` into `out`. The VNNI kernel where the CPU has it, else the
    /// portable twin.
    pub fn group(&self, g: usize, x: &Q8Row, out: &mut [f32; LANES]) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if available() {
            return self.group_vnni(g, x, out);
        }
        self.portable_group(g, x, out)
    }

    /// `group` in portable Rust: each lane's integer sum per block, then `int8_rows`' two fused multiply-adds.
    pub fn portable_group(&self, g: usize, x: &Q8Row, out: &mut [f32; LANES]) {
        let half = super::blocks::half;
        let group = &self.data[g * self.blocks * BLOCK_BYTES..(g + 1) * self.blocks * BLOCK_BYTES];
        *out = [0.0; LANES];
        for (b, block) in group.chunks_exact(BLOCK_BYTES).enumerate() {
            let q = &x.values[32 * b..32 * b + 32];
            for (lane, acc) in out.iter_mut().enumerate() {
                let mut isum = 0i32;
                for j in 0..4 {
                    for i in 0..4 {
                        let byte = block[64 * j + 4 * lane + i];
                        isum +=
                            (byte & 0x0f) as i32 * q[4 * j + i] as i32 + (byte >> 4) as i32 * q[16 + 4 * j + i] as i32;
                    }
                }
                let (d, m) = (half(block, 256 + 2 * lane), half(block, 288 + 2 * lane));
                *acc = (isum as f32).mul_add(d * x.scale[b], *acc);
                *acc = m.mul_add(x.scaled_sum[b], *acc);
            }
        }
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    fn group_vnni(&self, g: usize, x: &Q8Row, out: &mut [f32; LANES]) {
        assert!(
            g < self.groups
                && x.values.len() >= 32 * self.blocks
                && x.scale.len().min(x.scaled_sum.len()) >= self.blocks
        );
        let group = &self.data[g * self.blocks * BLOCK_BYTES..(g + 1) * self.blocks * BLOCK_BYTES];
        // SAFETY: `available()` (checked by the caller) says the CPU has AVX-512 F, VNNI and F16C; the kernel reads
        // `blocks` blocks of `group` and of `x`, whose lengths are asserted above, and writes the 16 values of `out`.
        unsafe { vnni::group(group.as_ptr(), self.blocks, x, out) }
    }
}

/// Whether this CPU runs the VNNI kernel (the repacked form is used only then: elsewhere `int8::dot_row` is faster
/// than the portable twin).
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return super::int8_vnni::available() && std::is_x86_feature_detected!("f16c");
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    false
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Q8Row, BLOCK_BYTES, LANES};

    /// How far ahead of the block being multiplied the kernel asks for the group's bytes.
    const AHEAD: usize = 2048;

    /// One group's `blocks` blocks at `data` against `x`: the low nibbles as they are and the high ones as 16 times
    /// their value (multiplied where they lie, then the sum divided by 16, as `int8_vnni::q4_1_rows` does), each in
    /// sums of their own so that no `vpdpbusd` waits on the one before it.
    #[target_feature(enable = "avx512f,avx512vnni,f16c")]
    pub unsafe fn group(data: *const u8, blocks: usize, x: &Q8Row, out: &mut [f32; LANES]) {
        let nibble = _mm512_set1_epi8(0x0f);
        let values = x.values.as_ptr().cast::<u8>();
        let mut acc = _mm512_setzero_ps();
        for b in 0..blocks {
            let block = data.add(b * BLOCK_BYTES);
            // Past the group's end this asks for bytes that may not be the program's: a prefetch cannot fault.
            for line in (0..BLOCK_BYTES).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(block.wrapping_add(AHEAD + line).cast());
            }
            let four = |at: usize| _mm512_set1_epi32(std::ptr::read_unaligned(values.add(32 * b + at).cast::<i32>()));
            let mut low = _mm512_setzero_si512();
            let mut high = _mm512_setzero_si512();
            for j in 0..4 {
                let w = _mm512_loadu_si512(block.add(64 * j).cast());
                low = _mm512_dpbusd_epi32(low, _mm512_and_si512(w, nibble), four(4 * j));
                high = _mm512_dpbusd_epi32(high, _mm512_andnot_si512(nibble, w), four(16 + 4 * j));
            }
            let isum = _mm512_add_epi32(low, _mm512_srai_epi32::<4>(high));
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(block.add(256).cast()));
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(block.add(288).cast()));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.scale.get_unchecked(b)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc);
            acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*x.scaled_sum.get_unchecked(b)), acc);
        }
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::quant::int8::quantize;
    use crate::quant::QuantMatrix;

    /// The repacked rows' products, in the kernel the CPU runs and in the portable twin, are the batched 8-bit
    /// product's (`matmul_exact_rows`, itself tested against its own twin) bit for bit, row by row: 40 rows, two
    /// whole groups and 8 rows left out of the repacking.
    #[test]
    fn each_lane_is_the_batched_products_row_bit_for_bit() {
        let (n, k) = (40, 544);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QuantMatrix::new("w", Arc::new(QTensor::quantize(&wt, GgmlDType::Q4_1).unwrap()))
            .unwrap()
            .with_int8_activations(true);
        let x: Vec<f32> = (0..k).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect();
        let batched = q.matmul_exact_rows(&x).unwrap();
        let lanes = Q4_1Lanes::new(&q.raw().unwrap(), n, k);
        assert_eq!(lanes.groups(), 2);
        let rounded = quantize(&x);
        for g in 0..lanes.groups() {
            let (mut fast, mut portable) = ([0f32; LANES], [0f32; LANES]);
            lanes.group(g, &rounded, &mut fast);
            lanes.portable_group(g, &rounded, &mut portable);
            for lane in 0..LANES {
                let want = batched[g * LANES + lane].to_bits();
                assert_eq!(portable[lane].to_bits(), want, "group {g} lane {lane}, portable");
                assert_eq!(fast[lane].to_bits(), want, "group {g} lane {lane}");
            }
        }
    }
}

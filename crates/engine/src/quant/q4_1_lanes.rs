//! Q4_1 weight rows repacked in groups of sixteen, for a single sequence's decoding steps on CPUs with AVX-512
//! (detected at run time), and with `--int8` for batched steps and prompts too: sixteen weight rows in the sixteen
//! lanes of a register, the activations broadcast.
//!
//! One activation row leaves nothing to put in the lanes of `int8_rows`' kernel (a lane per activation row), and
//! the one-row kernels (`blocks::dot_row`, `int8::dot_row`) take a weight row at a time: per block of 32 values, some
//! fifteen instructions of unpacking, products, scaling and summing. They ran at 9.5 (exact) and 16 (`--int8`) G
//! weights per second on one thread of a Xeon of this kind, the same with the rows in the L2 cache as in a
//! decoding step, where memory gave each of two threads 10 GB/s (0.625 bytes a weight): bound by their
//! instructions, not by memory. Here each block's four-byte groups of sixteen rows lie side by side
//! (`Q4_1Lanes`), and
//! - with 8-bit activations (`--int8`, AVX-512 VNNI), one `vpdpbusd` multiplies four values of sixteen rows with
//!   four activations broadcast to every lane: eight of them and some ten other instructions per block of sixteen
//!   rows. Each lane does `int8_rows`' operations in its order (that module's comment), so a row's value is the
//!   batched step's bit for bit: a sequence decoding alone gets the numbers it gets in a batch. Batched steps and
//!   prompts take four activation rows at a time (`int8_group_each`), which share each block's loads and masks:
//!   where they read the file's blocks a weight row at a time (`int8_vnni::q4_1_rows`), SmolLM2's batch of 16
//!   decoded at 651-671 tokens/s in all and its 128-token prompts at 719-848, and here at 785-857 and 1065-1098.
//! - exactly (AVX-512 F), a shift and a `vpermps` turn a nibble of sixteen rows into f32 (the permutation reads
//!   only the low four bits of each lane, and its table holds 0..16), and one multiply-add takes them with the
//!   broadcast activation: three instructions per value of sixteen rows. The products are f32's, summed in
//!   another order than `blocks::dot_row`'s (`exact_group` says which).

use super::int8::Q8Row;
use super::lanes::RowGroups;
pub use super::lanes::{available, LANES};

/// Bytes of one block of sixteen rows: four registers of nibbles, then sixteen f16 scales and sixteen f16
/// minimums.
pub(super) const BLOCK_BYTES: usize = 4 * 64 + 2 * 32;

/// A Q4_1 matrix's rows in groups of sixteen, block by block as the kernel reads them.
///
/// A Q4_1 block is an f16 scale `d`, an f16 minimum `m` and 16 bytes whose low nibbles are values 0..16 and high
/// nibbles values 16..32: bytes `4j..4j + 4` hold values `4j..4j + 4` and `16 + 4j..`. Per group and block, register
/// j holds those four bytes of each of the sixteen rows, lane after lane; then the rows' scales, then their
/// minimums. The same bytes as the file, in another order: the repacked matrix is as large as the original.
pub struct Q4_1Lanes(pub(super) RowGroups);

impl Q4_1Lanes {
    /// The first `rows / 16 * 16` rows of `raw` (Q4_1 blocks, `k` values a row) repacked; rows past the last whole
    /// group are left to the one-row kernels.
    pub fn new(raw: &[u8], rows: usize, k: usize) -> Self {
        Self(RowGroups::new(raw, rows, k, 20, BLOCK_BYTES, |lane, block, out| {
            for j in 0..4 {
                out[64 * j + 4 * lane..64 * j + 4 * lane + 4].copy_from_slice(&block[4 + 4 * j..8 + 4 * j]);
            }
            out[256 + 2 * lane..258 + 2 * lane].copy_from_slice(&block[0..2]);
            out[288 + 2 * lane..290 + 2 * lane].copy_from_slice(&block[2..4]);
        }))
    }

    /// Whole groups of sixteen rows.
    pub fn groups(&self) -> usize {
        self.0.groups()
    }

    /// Rows `16 g..16 g + 16` of the product with the rounded activations `x` into `out`: the VNNI kernel where
    /// the CPU has it, else the portable twin.
    pub fn int8_group(&self, g: usize, x: &Q8Row, out: &mut [f32; LANES]) {
        self.int8_group_each(g, std::slice::from_ref(x), |_, values| *out = *values);
    }

    /// `int8_group` for each of the rounded activation rows `xs`, `put(i, values)` for row i: in the VNNI kernel,
    /// four rows at a time, the group's nibbles loaded and masked once for the four (a batched step's, or a
    /// prompt's); each row's sums and operations its own, so every row's values are `int8_group`'s for it alone.
    pub fn int8_group_each(&self, g: usize, xs: &[Q8Row], mut put: impl FnMut(usize, &[f32; LANES])) {
        assert!(g < self.0.groups());
        for x in xs {
            assert!(x.values.len() >= 32 * self.0.blocks() && x.scale.len().min(x.scaled_sum.len()) >= self.0.blocks());
        }
        let mut values = [[0f32; LANES]; 4];
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if int8_available() {
            let data = self.0.group(g).as_ptr();
            let mut fours = xs.chunks_exact(4);
            for (c, four) in (&mut fours).enumerate() {
                // SAFETY: the CPU has AVX-512 F, VNNI and F16C; the kernel reads the group's `blocks` blocks and as
                // many blocks of each row of `four` (asserted above), and writes the values of its rows.
                unsafe {
                    avx512::int8_group::<4>(data, self.0.blocks(), std::array::from_fn(|r| &four[r]), &mut values)
                };
                values.iter().enumerate().for_each(|(r, v)| put(4 * c + r, v));
            }
            let done = xs.len() - fours.remainder().len();
            for (i, x) in (done..).zip(fours.remainder()) {
                let one: &mut [[f32; LANES]; 1] = (&mut values[..1]).try_into().expect("one row");
                // SAFETY: as above, for one row.
                unsafe { avx512::int8_group::<1>(data, self.0.blocks(), [x], one) };
                put(i, &one[0]);
            }
            return;
        }
        for (i, x) in xs.iter().enumerate() {
            self.portable_int8_group(g, x, &mut values[0]);
            put(i, &values[0]);
        }
    }

    /// `int8_group` in portable Rust: each lane's integer sum per block, then `int8_rows`' two fused multiply-adds.
    pub fn portable_int8_group(&self, g: usize, x: &Q8Row, out: &mut [f32; LANES]) {
        *out = [0.0; LANES];
        for (b, block) in self.0.group(g).chunks_exact(BLOCK_BYTES).enumerate() {
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
                let (d, m) = scale_and_minimum(block, lane);
                *acc = (isum as f32).mul_add(d * x.scale[b], *acc);
                *acc = m.mul_add(x.scaled_sum[b], *acc);
            }
        }
    }

    /// Rows `16 g..16 g + 16` of the exact product with `x` into `out` (`totals`: `block_totals(x)`), in the
    /// AVX-512 kernel where the CPU has it, else the portable twin, the same f32 operations in the same order. Per
    /// lane and block, values `v` of the block `q v + m`:
    ///
    /// ```text
    /// p[i]     = fma(q[4j + i], x[4j + i], p[i])             j = 0..4, i = 0..4, each p from 0
    /// p[4 + i] = fma(q[16 + 4j + i], x[16 + 4j + i], p[4 + i])
    /// acc = fma(d, ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)), acc)
    /// acc = fma(m, totals[b], acc)
    /// ```
    pub fn exact_group(&self, g: usize, x: &[f32], totals: &[f32], out: &mut [f32; LANES]) {
        assert!(g < self.0.groups() && x.len() >= 32 * self.0.blocks() && totals.len() >= self.0.blocks());
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if available() {
            // SAFETY: the CPU has AVX-512 F and F16C; the kernel reads the group's `blocks` blocks and as many
            // blocks of `x` and `totals` (asserted above), and writes the 16 values of `out`.
            return unsafe { avx512::exact_group(self.0.group(g).as_ptr(), self.0.blocks(), x, totals, out) };
        }
        self.portable_exact_group(g, x, totals, out)
    }

    /// `exact_group` in portable Rust.
    pub fn portable_exact_group(&self, g: usize, x: &[f32], totals: &[f32], out: &mut [f32; LANES]) {
        *out = [0.0; LANES];
        for (b, block) in self.0.group(g).chunks_exact(BLOCK_BYTES).enumerate() {
            let xb = &x[32 * b..32 * b + 32];
            for (lane, acc) in out.iter_mut().enumerate() {
                let mut p = [0f32; 8];
                for j in 0..4 {
                    for i in 0..4 {
                        let byte = block[64 * j + 4 * lane + i];
                        p[i] = ((byte & 0x0f) as f32).mul_add(xb[4 * j + i], p[i]);
                        p[4 + i] = ((byte >> 4) as f32).mul_add(xb[16 + 4 * j + i], p[4 + i]);
                    }
                }
                let partial = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
                let (d, m) = scale_and_minimum(block, lane);
                *acc = d.mul_add(partial, *acc);
                *acc = m.mul_add(totals[b], *acc);
            }
        }
    }
}

/// Lane `lane`'s scale and minimum in a repacked block.
fn scale_and_minimum(block: &[u8], lane: usize) -> (f32, f32) {
    (super::blocks::half(block, 256 + 2 * lane), super::blocks::half(block, 288 + 2 * lane))
}

/// The sum of each block of 32 values of `x`, in order: what a Q4_1 block's minimum multiplies in `exact_group`.
pub fn block_totals(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(32).map(|b| b.iter().fold(0f32, |sum, v| sum + v)).collect()
}

/// Whether this CPU also runs the 8-bit kernel (AVX-512 VNNI).
pub fn int8_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return available() && std::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    false
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Q8Row, BLOCK_BYTES, LANES};
    use crate::quant::lanes::prefetch_ahead;

    /// `Q4_1Lanes::int8_group` of the group at `data` for the `R` activation rows `xs`: the low nibbles as they are
    /// and the high ones as 16 times their value (multiplied where they lie, then the sum divided by 16, as
    /// `int8_vnni::q4_1_rows` does), each in sums of their own so that no `vpdpbusd` waits on the one before it.
    /// The nibbles are loaded and masked once per block for the `R` rows.
    #[target_feature(enable = "avx512f,avx512vnni,f16c")]
    pub unsafe fn int8_group<const R: usize>(
        data: *const u8,
        blocks: usize,
        xs: [&Q8Row; R],
        out: &mut [[f32; LANES]; R],
    ) {
        let nibble = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let block = data.add(b * BLOCK_BYTES);
            prefetch_ahead(block, BLOCK_BYTES);
            let w: [__m512i; 4] = std::array::from_fn(|j| _mm512_loadu_si512(block.add(64 * j).cast()));
            let low_w: [__m512i; 4] = std::array::from_fn(|j| _mm512_and_si512(w[j], nibble));
            let high_w: [__m512i; 4] = std::array::from_fn(|j| _mm512_andnot_si512(nibble, w[j]));
            let (d, m) = scale_and_minimum(block);
            for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                let values = x.values.as_ptr().cast::<u8>();
                let four =
                    |at: usize| _mm512_set1_epi32(std::ptr::read_unaligned(values.add(32 * b + at).cast::<i32>()));
                let mut low = _mm512_setzero_si512();
                let mut high = _mm512_setzero_si512();
                for j in 0..4 {
                    low = _mm512_dpbusd_epi32(low, low_w[j], four(4 * j));
                    high = _mm512_dpbusd_epi32(high, high_w[j], four(16 + 4 * j));
                }
                let isum = _mm512_add_epi32(low, _mm512_srai_epi32::<4>(high));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.scale.get_unchecked(b)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
                *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*x.scaled_sum.get_unchecked(b)), *acc);
            }
        }
        for (out, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(out.as_mut_ptr(), acc);
        }
    }

    /// `Q4_1Lanes::exact_group` of the group at `data`: nibble `i` of each lane's four bytes (shifted down to the
    /// lane's low bits) made f32 by `vpermps` from the table 0..16, which reads only those four bits.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn exact_group(data: *const u8, blocks: usize, x: &[f32], totals: &[f32], out: &mut [f32; LANES]) {
        let table = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
        let mut acc = _mm512_setzero_ps();
        for b in 0..blocks {
            let block = data.add(b * BLOCK_BYTES);
            prefetch_ahead(block, BLOCK_BYTES);
            let xb = x.as_ptr().add(32 * b);
            let value = |w: __m512i, shift: u32| {
                _mm512_permutexvar_ps(_mm512_srl_epi32(w, _mm_cvtsi32_si128(shift as i32)), table)
            };
            let mut p = [_mm512_setzero_ps(); 8];
            for j in 0..4 {
                let w = _mm512_loadu_si512(block.add(64 * j).cast());
                for i in 0..4 {
                    let low = value(w, 8 * i as u32);
                    let high = value(w, 8 * i as u32 + 4);
                    p[i] = _mm512_fmadd_ps(low, _mm512_set1_ps(*xb.add(4 * j + i)), p[i]);
                    p[4 + i] = _mm512_fmadd_ps(high, _mm512_set1_ps(*xb.add(16 + 4 * j + i)), p[4 + i]);
                }
            }
            let add = _mm512_add_ps;
            let partial = add(add(add(p[0], p[1]), add(p[2], p[3])), add(add(p[4], p[5]), add(p[6], p[7])));
            let (d, m) = scale_and_minimum(block);
            acc = _mm512_fmadd_ps(d, partial, acc);
            acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*totals.get_unchecked(b)), acc);
        }
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }

    /// The sixteen lanes' scales and minimums of the block at `block`, from f16.
    #[inline(always)]
    unsafe fn scale_and_minimum(block: *const u8) -> (__m512, __m512) {
        let half = |at: usize| _mm512_cvtph_ps(_mm256_loadu_si256(block.add(at).cast()));
        (half(256), half(288))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::quant::blocks::dequantize;
    use crate::quant::int8::quantize;
    use crate::quant::QuantMatrix;

    /// An `n x k` Q4_1 matrix of weights spread over -0.1..0.1, rounding its activations.
    fn int8_matrix(n: usize, k: usize) -> QuantMatrix {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        QuantMatrix::new("w", Arc::new(QTensor::quantize(&wt, GgmlDType::Q4_1).unwrap()))
            .unwrap()
            .with_int8_activations(true)
    }

    /// Activations of both signs and magnitudes up to 7.
    fn activations(len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect()
    }

    /// The repacked rows' products, in the kernel the CPU runs and in the portable twin, are the batched 8-bit
    /// product's (`matmul_exact_rows`, itself tested against its own twin) bit for bit, row by row: 40 rows, two
    /// whole groups and 8 rows left out of the repacking.
    #[test]
    fn each_int8_lane_is_the_batched_products_row_bit_for_bit() {
        let (n, k) = (40, 544);
        let q = int8_matrix(n, k);
        let x = activations(k);
        let batched = q.matmul_exact_rows(&x).unwrap();
        let lanes = Q4_1Lanes::new(&q.raw().unwrap(), n, k);
        assert_eq!(lanes.groups(), 2);
        let rounded = quantize(&x);
        for g in 0..lanes.groups() {
            let (mut fast, mut portable) = ([0f32; LANES], [0f32; LANES]);
            lanes.int8_group(g, &rounded, &mut fast);
            lanes.portable_int8_group(g, &rounded, &mut portable);
            for lane in 0..LANES {
                let want = batched[g * LANES + lane].to_bits();
                assert_eq!(portable[lane].to_bits(), want, "group {g} lane {lane}, portable");
                assert_eq!(fast[lane].to_bits(), want, "group {g} lane {lane}");
            }
        }
    }

    /// Several activation rows at once (`int8_group_each`, four at a time and the rest one by one) give each row
    /// the batched product's values of the file's blocks (`int8_vnni::q4_1_rows` where the CPU has VNNI), bit for bit.
    #[test]
    fn int8_rows_at_once_are_the_batched_products() {
        let (n, k) = (32, 544);
        let q = int8_matrix(n, k);
        let m = 7;
        let x = activations(m * k);
        let batched = q.matmul_exact_rows(&x).unwrap();
        let lanes = Q4_1Lanes::new(&q.raw().unwrap(), n, k);
        let rounded: Vec<_> = x.chunks_exact(k).map(quantize).collect();
        for g in 0..lanes.groups() {
            let mut seen = vec![false; m];
            lanes.int8_group_each(g, &rounded, |i, values| {
                for lane in 0..LANES {
                    assert_eq!(
                        values[lane].to_bits(),
                        batched[i * n + g * LANES + lane].to_bits(),
                        "row {i} group {g}"
                    );
                }
                seen[i] = true;
            });
            assert!(seen.iter().all(|&s| s));
        }
    }

    /// On AMX tiles (`int8_amx::lanes_products`), sixteen activation rows at a time through several groups in one
    /// run, each row's values are `int8_group`'s for the row alone, bit for bit: 26 rows (a tile of sixteen and one
    /// of ten, both rounded in tasks of several rows, the second's last task shorter), three groups run together
    /// and the last two on their own. Where the CPU has no tiles, this says so and checks nothing.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    #[test]
    fn int8_tiles_are_each_rows_int8_group() {
        use crate::quant::int8_rows::TileRows;
        if !crate::quant::int8_rows::tiles_available() {
            eprintln!("no AMX tiles on this CPU: lanes_products not compared");
            return;
        }
        let (n, k, m) = (48, 544, 26);
        let q = int8_matrix(n, k);
        let lanes = Q4_1Lanes::new(&q.raw().unwrap(), n, k);
        let x = activations(m * k);
        let rounded: Vec<_> = x.chunks_exact(k).map(quantize).collect();
        for groups in [0..3, 1..3] {
            let mut seen = vec![[false; 3]; m];
            for (c, rows) in x.chunks(LANES * k).enumerate() {
                // Three sentinels after each row's values, which the kernel must leave as they are.
                let (width, sentinel) = (LANES * groups.len(), f32::from_bits(0x7fc0_1234));
                let stride = width + 3;
                let tile = TileRows::round(rows, k);
                let mut out = vec![sentinel; tile.rows * stride];
                // SAFETY: `out` has `tile.rows` rows `stride` values apart, of `width` values each.
                unsafe {
                    crate::quant::int8_amx::lanes_products::<false>(
                        &lanes.0,
                        groups.clone(),
                        &tile,
                        out.as_mut_ptr(),
                        stride,
                    )
                };
                for (i, row) in out.chunks_exact(stride).enumerate() {
                    assert!(row[width..].iter().all(|v| v.to_bits() == sentinel.to_bits()), "row {i} past its values");
                    for (g, values) in groups.clone().zip(row[..width].chunks_exact(LANES)) {
                        let mut alone = [0f32; LANES];
                        lanes.int8_group(g, &rounded[LANES * c + i], &mut alone);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(values), bits(&alone), "row {} group {g}", LANES * c + i);
                        seen[LANES * c + i][g] = true;
                    }
                }
            }
            assert!(seen.iter().all(|row| groups.clone().all(|g| row[g])), "every row and group of {groups:?}");
        }
    }

    /// The exact kernel the CPU runs is the portable twin bit for bit, and both are the f64 product of the decoded
    /// weights with the activations up to f32 rounding; on activations of mixed signs and sizes, with a block whose
    /// values are all equal (only the minimum and scale matter there).
    #[test]
    fn exact_lanes_are_the_twin_and_the_decoded_product() {
        let (n, k) = (32, 544);
        let w: Vec<f32> = (0..n * k)
            .map(|i| if i / 32 == 3 { 0.25 } else { ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1 })
            .collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, GgmlDType::Q4_1).unwrap();
        let raw = q.data().unwrap();
        let lanes = Q4_1Lanes::new(&raw, n, k);
        let x = activations(k);
        let totals = block_totals(&x);
        let row_bytes = k / 32 * 20;
        for g in 0..lanes.groups() {
            let (mut fast, mut portable) = ([0f32; LANES], [0f32; LANES]);
            lanes.exact_group(g, &x, &totals, &mut fast);
            lanes.portable_exact_group(g, &x, &totals, &mut portable);
            for lane in 0..LANES {
                assert_eq!(fast[lane].to_bits(), portable[lane].to_bits(), "group {g} lane {lane}");
                let r = g * LANES + lane;
                let mut deq = vec![0f32; k];
                dequantize(GgmlDType::Q4_1, &raw[r * row_bytes..(r + 1) * row_bytes], &mut deq);
                let want: f64 = deq.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let magnitude: f64 = deq.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let got = portable[lane] as f64;
                assert!((got - want).abs() <= 1e-5 * magnitude, "row {r}: {got} vs {want} (magnitude {magnitude})");
            }
        }
    }
}

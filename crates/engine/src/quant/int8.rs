//! The opt-in fast products: activations rounded to 8 bits per block of 32 (ggml's `block_q8_1`: a scale and the
//! scaled sum of the block), then multiplied with the weights' integers in integer arithmetic, as llama.cpp does.
//! Not exact: the rounding moves each activation by up to half a step (1/254 of its block's largest value), so
//! logits move too; docs/benchmarks.md states by how much against the golden references. The exact products
//! (`QuantMatrix::matmul`) stay the default.
//!
//! Written for the weight types of the offline models' layers: Q4_1 (SmolLM2), Q5_0, Q4_K and Q6_K (Gemma), each
//! in portable Rust (the twin) and, where the target has it, AVX2 (`int8_avx2`); where the CPU has AVX-512 VNNI,
//! Q4_1 runs on rows repacked in lanes instead (`q4_1_lanes`). Q8_0 (both models' embedding, which is also their
//! output matrix) is left exact in a single sequence's steps: on one machine its f32 kernel read as fast as memory
//! allowed (16 GB/s against 15 in integers, `examples/dot_speed.rs`), and with AVX-512 its rows are repacked too
//! (`q8_0_lanes`); an integer kernel for them has not been measured against that one. Batched steps, which are bound
//! by multiply-adds rather than by memory, round for every type of the offline models, Q8_0 included
//! (`int8_rows`). In wasm, Q5_0 rows are stored as Q8_0 rows of the same values (`QuantMatrix::for_decoding`), so
//! `dot_row` reads Q8_0 blocks too, with Q5_0's sums.

use candle_core::quantized::GgmlDType;

use super::blocks::{half, q6k_runs, scale_min_k4};

/// Activations per block.
pub const BLOCK: usize = 32;

/// A row of activations rounded to 8 bits: `x[32b + j] ~ scale[b] * values[32b + j]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Row {
    pub values: Vec<i8>,
    pub scale: Vec<f32>,
    /// `scale[b] * sum_j values[32b + j]`: what a weight block's offset (Q4_1's `m`) multiplies.
    pub scaled_sum: Vec<f32>,
}

/// Whether the fast products cover `dtype` (the others keep the exact products).
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q4K | GgmlDType::Q6K)
}

/// Rounds `x` (a multiple of 32 values) block by block: scale = largest magnitude / 127, values rounded to the
/// nearest integer, halves away from zero (`quantize_into`).
pub fn quantize(x: &[f32]) -> Q8Row {
    let blocks = x.len() / BLOCK;
    let mut row = Q8Row { values: vec![0; x.len()], scale: vec![0.0; blocks], scaled_sum: vec![0.0; blocks] };
    quantize_into(x, &mut row.values, &mut row.scale, &mut row.scaled_sum);
    row
}

/// `quantize` into the given room (`values` as long as `x`, `scale` and `scaled_sum` a value per block): in AVX2
/// where compiled (`int8_avx2::quantize_into`, equal bit for bit), so that a batched step can round its activation
/// rows straight into the layout its products read (`int8_rows::TileRows::round`). Value by value, rounding
/// was a tenth of a SmolLM2 step.
pub fn quantize_into(x: &[f32], values: &mut [i8], scale: &mut [f32], scaled_sum: &mut [f32]) {
    assert!(x.len().is_multiple_of(BLOCK) && values.len() == x.len());
    assert!(scale.len() == x.len() / BLOCK && scaled_sum.len() == scale.len());
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return super::int8_avx2::quantize_into(x, values, scale, scaled_sum);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    portable_quantize_into(x, values, scale, scaled_sum)
}

/// `quantize` in portable Rust.
pub fn portable_quantize(x: &[f32]) -> Q8Row {
    let blocks = x.len() / BLOCK;
    let mut row = Q8Row { values: vec![0; x.len()], scale: vec![0.0; blocks], scaled_sum: vec![0.0; blocks] };
    portable_quantize_into(x, &mut row.values, &mut row.scale, &mut row.scaled_sum);
    row
}

/// `quantize_into` in portable Rust: the twin the AVX2 kernel is tested against, and the wasm path.
pub fn portable_quantize_into(x: &[f32], values: &mut [i8], scale: &mut [f32], scaled_sum: &mut [f32]) {
    debug_assert_eq!(x.len() % BLOCK, 0);
    for (b, (xb, qb)) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * inverse).round() as i8;
            sum += *q as i32;
        }
        scale[b] = d;
        scaled_sum[b] = d * sum as f32;
    }
}

/// `sum_c W[c] * x[c]` for one weight row's blocks and a rounded activation row. In wasm it widens `x` at each call
/// (`dot_row_widened`); a product widens each row once instead.
pub fn dot_row(dtype: GgmlDType, bytes: &[u8], x: &Q8Row) -> f32 {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return dot_row_widened(dtype, bytes, x, &widen(&x.values));
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if let Some(dot) = super::int8_avx2::dot_row(dtype, bytes, x) {
            return dot;
        }
        portable_dot_row(dtype, bytes, x)
    }
}

/// `dot_row` with `x`'s values already widened to i16 (`widen`), as wasm's kernels read them: a product widens each
/// activation row once for all its weight rows, not once a row. Elsewhere `widened` is not read: `dot_row`.
pub fn dot_row_widened(dtype: GgmlDType, bytes: &[u8], x: &Q8Row, widened: &[i16]) -> f32 {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return super::simd128::int8_dot_row(dtype, bytes, x, widened).unwrap_or_else(|| portable_dot_row(dtype, bytes, x));
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    {
        let _ = widened;
        dot_row(dtype, bytes, x)
    }
}

/// Whether `dot_row_widened` reads the widened values: in wasm.
pub const READS_WIDENED: bool = cfg!(all(target_arch = "wasm32", target_feature = "simd128"));

/// Rounded values widened to i16, as simd128's products of pairs read them (`dot_row_widened`, and the greedy
/// screen's `Form::Widened`).
pub fn widen(values: &[i8]) -> Vec<i16> {
    values.iter().map(|&v| i16::from(v)).collect()
}

/// `dot_row` in portable Rust: the wasm path and the twin the AVX2 kernels are tested against. Each 32-value
/// block's integer products are summed exactly in i32, then scaled.
pub fn portable_dot_row(dtype: GgmlDType, bytes: &[u8], x: &Q8Row) -> f32 {
    let q = &x.values;
    let mut acc = 0f32;
    match dtype {
        GgmlDType::Q4_1 => {
            for (b, w) in bytes.chunks_exact(20).enumerate() {
                let qx = &q[b * 32..b * 32 + 32];
                let mut s = 0i32;
                for j in 0..16 {
                    s += (w[4 + j] & 0x0f) as i32 * qx[j] as i32 + (w[4 + j] >> 4) as i32 * qx[j + 16] as i32;
                }
                acc += half(w, 0) * x.scale[b] * s as f32 + half(w, 2) * x.scaled_sum[b];
            }
        }
        GgmlDType::Q5_0 => {
            // value = d * (q - 16), q's four low bits from the nibbles, its fifth from bit j of qh.
            for (b, w) in bytes.chunks_exact(22).enumerate() {
                let qx = &q[b * 32..b * 32 + 32];
                let qh = u32::from_le_bytes([w[2], w[3], w[4], w[5]]);
                let mut s = 0i32;
                for j in 0..16 {
                    let low = ((w[6 + j] & 0x0f) as u32 | ((qh >> j) << 4) & 0x10) as i32 - 16;
                    let high = ((w[6 + j] >> 4) as u32 | (qh >> (j + 12)) & 0x10) as i32 - 16;
                    s += low * qx[j] as i32 + high * qx[j + 16] as i32;
                }
                acc += half(w, 0) * x.scale[b] * s as f32;
            }
        }
        GgmlDType::Q8_0 => {
            // Not a type `supports` names: Q5_0 rows that wasm stores as Q8_0 (`blocks::q5_0_as_q8_0`), whose sums
            // are Q5_0's, term for term.
            for (b, w) in bytes.chunks_exact(34).enumerate() {
                let qx = &q[b * 32..b * 32 + 32];
                let s: i32 = w[2..].iter().zip(qx).map(|(&v, &c)| v as i8 as i32 * c as i32).sum();
                acc += half(w, 0) * x.scale[b] * s as f32;
            }
        }
        GgmlDType::Q4K => {
            // 256 values in 8 sub-blocks of 32: value = d * sc[i] * q - dmin * m[i], with 6-bit sc and m.
            for (sb, w) in bytes.chunks_exact(144).enumerate() {
                let (d, dmin) = (half(w, 0), half(w, 2));
                let qs = &w[16..144];
                for i in 0..8 {
                    let b = sb * 8 + i;
                    let qx = &q[b * 32..b * 32 + 32];
                    let (sc, m) = scale_min_k4(i, &w[4..16]);
                    // Sub-blocks 2p and 2p + 1 share 32 bytes: low nibbles, then high.
                    let bytes32 = &qs[(i / 2) * 32..(i / 2) * 32 + 32];
                    let shift = if i % 2 == 0 { 0 } else { 4 };
                    let s: i32 = bytes32.iter().zip(qx).map(|(&v, &c)| ((v >> shift) & 0x0f) as i32 * c as i32).sum();
                    acc += d * sc as f32 * x.scale[b] * s as f32 - dmin * m as f32 * x.scaled_sum[b];
                }
            }
        }
        GgmlDType::Q6K => {
            // 256 values in two halves of four runs of 32 (`blocks::q6k_runs`), q in -32..31, and an i8 scale per
            // 16 values: value = d * scale * q.
            for (sb, w) in bytes.chunks_exact(210).enumerate() {
                let d = half(w, 208);
                for h in 0..2 {
                    for (t, wv) in q6k_runs(w, h).iter().enumerate() {
                        let i = 4 * h + t;
                        let b = sb * 8 + i;
                        let qx = &q[b * 32..b * 32 + 32];
                        let s0: i32 = wv[..16].iter().zip(&qx[..16]).map(|(&a, &c)| a as i32 * c as i32).sum();
                        let s1: i32 = wv[16..].iter().zip(&qx[16..]).map(|(&a, &c)| a as i32 * c as i32).sum();
                        let s = w[192 + 2 * i] as i8 as i32 * s0 + w[192 + 2 * i + 1] as i8 as i32 * s1;
                        acc += d * x.scale[b] * s as f32;
                    }
                }
            }
        }
        other => unreachable!("int8::dot_row on {other:?}: callers check `supports` first"),
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::blocks::dequantize;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    #[test]
    fn quantize_by_hand() {
        // Largest magnitude 2.54: scale 0.02; 1.0 is 50 steps, -0.01 is half a step (away from zero: -1).
        let mut x = vec![0f32; 32];
        (x[0], x[1], x[2], x[3]) = (2.54, 1.0, -0.01, -2.54);
        let q = quantize(&x);
        assert!((q.scale[0] - 0.02).abs() < 1e-7);
        assert_eq!(&q.values[..5], &[127, 50, -1, -127, 0]);
        assert!((q.scaled_sum[0] - 0.02 * 49.0).abs() < 1e-6);
        // An all-zero block has scale 0 and no NaN.
        assert_eq!(quantize(&[0f32; 32]), Q8Row { values: vec![0; 32], scale: vec![0.0], scaled_sum: vec![0.0] });
        assert_eq!(portable_quantize(&x), q);
    }

    /// `quantize` as compiled (AVX2 natively) is the portable twin bit for bit: on values whose scaled form lands
    /// exactly on halves (where rounding away from zero and to even differ), just beside them, on random rows, and
    /// on a row long enough for the kernel's runs of blocks and its eight scales per division.
    #[test]
    fn quantize_equals_the_portable_twin() {
        let mut rows: Vec<Vec<f32>> = Vec::new();
        // Largest magnitude 127: the scale is 1, so j + 0.5 is a half and rounds away from zero.
        let halves: Vec<f32> = (0..64).map(|j| if j % 32 == 0 { 127.0 } else { (j as f32 - 40.0) + 0.5 }).collect();
        let beside: Vec<f32> =
            halves.iter().map(|&v| if v == 127.0 { v } else { f32::from_bits(v.to_bits() - 1) }).collect();
        rows.extend([halves, beside]);
        rows.push((0..96).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect());
        rows.push((0..64).map(|i| if i < 32 { 0.0 } else { -1e-30 * i as f32 }).collect());
        // 75 blocks: a run of 64 (eight scales per division) and one of 11 (one eight and three alone), with
        // blocks of zeros, of tiny values and of halves among them.
        rows.push(
            (0..75 * 32)
                .map(|i| match (i / 32) % 5 {
                    0 => 0.0,
                    1 => -1e-30 * (i % 32) as f32,
                    2 if i % 32 == 0 => 127.0,
                    2 => (i % 32) as f32 - 16.5,
                    _ => ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 13) as f32),
                })
                .collect(),
        );
        for x in rows {
            let (got, want) = (quantize(&x), portable_quantize(&x));
            assert_eq!(got.values, want.values, "{x:?}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.scale), bits(&want.scale));
            assert_eq!(bits(&got.scaled_sum), bits(&want.scaled_sum));
        }
    }

    /// Each type's integer product equals, up to f32 rounding, the f64 product of the decoded weights with the
    /// rounded activations (`scale * value`): the same numbers, so only the order of the sums differs. And the
    /// AVX2 kernels, where compiled, agree with the portable twin. Q4_1's and Q5_0's rows have an odd number of
    /// blocks, which their kernels take in pairs and then one.
    #[test]
    fn integer_products_equal_the_decoded_products_of_the_rounded_activations() {
        let n = 9;
        for (dtype, k) in [(GgmlDType::Q4_1, 544), (GgmlDType::Q5_0, 544), (GgmlDType::Q4K, 512), (GgmlDType::Q6K, 512)]
        {
            assert!(supports(dtype));
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
            let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            let x: Vec<f32> =
                (0..k).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect();
            let q = quantize(&x);
            let rounded: Vec<f64> = (0..k).map(|c| q.scale[c / 32] as f64 * q.values[c] as f64).collect();
            let qt = QTensor::quantize(&wt, dtype).unwrap();
            let raw = qt.data().unwrap();
            let row_bytes = k / dtype.block_size() * dtype.type_size();
            for r in 0..n {
                let bytes = &raw[r * row_bytes..(r + 1) * row_bytes];
                let mut deq = vec![0f32; k];
                dequantize(dtype, bytes, &mut deq);
                let want: f64 = deq.iter().zip(&rounded).map(|(&a, &b)| a as f64 * b).sum();
                let magnitude: f64 = deq.iter().zip(&rounded).map(|(&a, &b)| (a as f64 * b).abs()).sum();
                let portable = portable_dot_row(dtype, bytes, &q) as f64;
                let fast = dot_row(dtype, bytes, &q) as f64;
                for (form, got) in [("portable", portable), ("dot_row", fast)] {
                    assert!(
                        (got - want).abs() <= 1e-5 * magnitude,
                        "{dtype:?} row {r} {form}: {got} vs {want} (terms' magnitude {magnitude})"
                    );
                }
            }
        }
        assert!(!supports(GgmlDType::Q8_0));
    }

    /// Q5_0 rows rewritten as Q8_0 (as wasm stores them) give the same 8-bit products bit for bit.
    #[test]
    fn q5_0_rows_as_q8_0_give_the_same_integer_products() {
        let (n, k) = (5, 544);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let raw = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), GgmlDType::Q5_0).unwrap();
        let raw = raw.data().unwrap();
        let x: Vec<f32> = (0..k).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect();
        let q = quantize(&x);
        for r in 0..n {
            let q5 = &raw[r * k / 32 * 22..(r + 1) * k / 32 * 22];
            let mut q8 = vec![0u8; q5.len() / 22 * 34];
            crate::quant::blocks::q5_0_as_q8_0(q5, &mut q8);
            let (a, b) = (portable_dot_row(GgmlDType::Q5_0, q5, &q), portable_dot_row(GgmlDType::Q8_0, &q8, &q));
            assert_eq!(a.to_bits(), b.to_bits(), "row {r}: {a} vs {b}");
        }
    }
}

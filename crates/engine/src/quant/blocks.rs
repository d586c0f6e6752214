//! GGUF's block quantizations, decoded from their raw bytes: the layouts of ggml's `block_q4_0` ... `block_q6_k`.
//! Written for speed (fixed-size loops the compiler vectorizes) and as the plain reference the WebGPU kernels
//! decode the same bytes against; tested against candle's and gguf-py's decoders.

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// Values per block and bytes per block.
pub fn block_shape(dtype: GgmlDType) -> (usize, usize) {
    (dtype.block_size(), dtype.type_size())
}

#[inline(always)]
fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Decodes whole blocks of `dtype` from `bytes` into `out` (`out.len()` values).
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    let (values, size) = block_shape(dtype);
    debug_assert_eq!(bytes.len() / size * values, out.len());
    match dtype {
        GgmlDType::F32 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlDType::F16 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlDType::BF16 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *y = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlDType::Q4_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = half(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlDType::Q4_1 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let (d, m) = (half(b, 0), half(b, 2));
                let qs = &b[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0f) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlDType::Q5_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(22)) {
                let d = half(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
                }
            }
        }
        GgmlDType::Q8_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = half(b, 0);
                for j in 0..32 {
                    y[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        GgmlDType::Q4K => {
            for (y, b) in out.chunks_exact_mut(256).zip(bytes.chunks_exact(144)) {
                let (d, dmin) = (half(b, 0), half(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                // Four groups of 64 values: the low nibbles of 32 bytes, then their high nibbles, each half with
                // its own 6-bit scale and minimum.
                for g in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * g..32 * g + 32];
                    let y = &mut y[64 * g..64 * g + 64];
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0x0f) as f32 - min1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
                    }
                }
            }
        }
        GgmlDType::Q6K => {
            for (y, b) in out.chunks_exact_mut(256).zip(bytes.chunks_exact(210)) {
                let d = half(b, 208);
                // Two halves of 128 values, each from 64 bytes of low bits, 32 of high bits and 8 scales.
                for h in 0..2 {
                    let ql = &b[64 * h..64 * h + 64];
                    let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                    let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                    let y = &mut y[128 * h..128 * h + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
        other => unreachable!("{other:?} is refused when the file is opened"),
    }
}

/// The dot product of one row of blocks with `x`, decoding inside the product (no f32 copy of the row): each
/// block's integer values are summed against `x` first and scaled once, as ggml's and the WGSL kernels' dot
/// products do. Equal to `dot(dequantize(row), x)` up to rounding.
pub fn dot_row(dtype: GgmlDType, bytes: &[u8], x: &[f32]) -> f32 {
    match dtype {
        GgmlDType::Q8_0 => {
            let mut acc = 0f32;
            for (b, x) in bytes.chunks_exact(34).zip(x.chunks_exact(32)) {
                let mut s = [0f32; 8];
                for j in 0..32 {
                    s[j % 8] += b[2 + j] as i8 as f32 * x[j];
                }
                acc += half(b, 0) * s.iter().sum::<f32>();
            }
            acc
        }
        GgmlDType::Q4_0 => {
            let mut acc = 0f32;
            for (b, x) in bytes.chunks_exact(18).zip(x.chunks_exact(32)) {
                let mut s = [0f32; 16];
                for j in 0..16 {
                    s[j] += ((b[2 + j] & 0x0f) as i32 - 8) as f32 * x[j]
                        + ((b[2 + j] >> 4) as i32 - 8) as f32 * x[j + 16];
                }
                acc += half(b, 0) * s.iter().sum::<f32>();
            }
            acc
        }
        GgmlDType::Q4_1 => {
            let mut acc = 0f32;
            for (b, x) in bytes.chunks_exact(20).zip(x.chunks_exact(32)) {
                let (mut s, mut sx) = ([0f32; 16], [0f32; 16]);
                for j in 0..16 {
                    s[j] += (b[4 + j] & 0x0f) as f32 * x[j] + (b[4 + j] >> 4) as f32 * x[j + 16];
                    sx[j] += x[j] + x[j + 16];
                }
                acc += half(b, 0) * s.iter().sum::<f32>() + half(b, 2) * sx.iter().sum::<f32>();
            }
            acc
        }
        GgmlDType::Q5_0 => {
            let mut acc = 0f32;
            for (b, x) in bytes.chunks_exact(22).zip(x.chunks_exact(32)) {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let mut s = [0f32; 16];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    let q0 = ((b[6 + j] & 0x0f) as u32 | h0) as i32 - 16;
                    let q1 = ((b[6 + j] >> 4) as u32 | h1) as i32 - 16;
                    s[j] += q0 as f32 * x[j] + q1 as f32 * x[j + 16];
                }
                acc += half(b, 0) * s.iter().sum::<f32>();
            }
            acc
        }
        GgmlDType::Q4K => {
            let mut acc = 0f32;
            for (b, x) in bytes.chunks_exact(144).zip(x.chunks_exact(256)) {
                let (d, dmin) = (half(b, 0), half(b, 2));
                let scales = &b[4..16];
                for g in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let q = &b[16 + 32 * g..16 + 32 * g + 32];
                    let x = &x[64 * g..64 * g + 64];
                    let (mut s1, mut s2, mut x1, mut x2) =
                        ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
                    for l in 0..32 {
                        s1[l % 8] += (q[l] & 0x0f) as f32 * x[l];
                        s2[l % 8] += (q[l] >> 4) as f32 * x[l + 32];
                        x1[l % 8] += x[l];
                        x2[l % 8] += x[l + 32];
                    }
                    let sum = |a: [f32; 8]| a.iter().sum::<f32>();
                    acc += d * (sc1 as f32 * sum(s1) + sc2 as f32 * sum(s2))
                        - dmin * (m1 as f32 * sum(x1) + m2 as f32 * sum(x2));
                }
            }
            acc
        }
        GgmlDType::Q6K => {
            let mut acc = 0f32;
            for (b, x) in bytes.chunks_exact(210).zip(x.chunks_exact(256)) {
                let d = half(b, 208);
                for h in 0..2 {
                    let ql = &b[64 * h..64 * h + 64];
                    let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                    let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                    let x = &x[128 * h..128 * h + 128];
                    // s[k][is]: the sum for scale sc[is + 2k] (values l + 32k, l in 16is..16is+16).
                    let mut s = [[0f32; 2]; 4];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        s[0][is] += q1 as f32 * x[l];
                        s[1][is] += q2 as f32 * x[l + 32];
                        s[2][is] += q3 as f32 * x[l + 64];
                        s[3][is] += q4 as f32 * x[l + 96];
                    }
                    let mut t = 0f32;
                    for k in 0..4 {
                        for is in 0..2 {
                            t += (sc[is + 2 * k] as i8) as f32 * s[k][is];
                        }
                    }
                    acc += d * t;
                }
            }
            acc
        }
        // Float weights: decode and multiply.
        _ => {
            let mut row = vec![0f32; x.len()];
            dequantize(dtype, bytes, &mut row);
            super::dot(&row, x)
        }
    }
}

/// Scale and minimum of sub-block `j` (0..8) of a Q4_K block: 6 bits each, packed into 12 bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use candle_core::Device;

    /// Random blocks whose f16 scales are finite (random bytes elsewhere), decoded here and by candle.
    #[test]
    fn decoding_matches_candle_on_random_blocks() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for dtype in crate::gguf::SUPPORTED_TYPES {
            let (values, size) = block_shape(dtype);
            let blocks = 512 / values.max(1) * 3;
            let mut bytes: Vec<u8> = (0..blocks * size).map(|_| next() as u8).collect();
            // Overwrite every f16 scale (and float weight) with a finite value.
            let finite = |b: &mut [u8], at: usize, v: f32| {
                b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
            };
            for (i, b) in bytes.chunks_exact_mut(size).enumerate() {
                let v = 0.01 + (i % 7) as f32 * 0.003;
                match dtype {
                    GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => finite(b, 0, v),
                    GgmlDType::Q4_1 | GgmlDType::Q4K => {
                        finite(b, 0, v);
                        finite(b, 2, -v / 2.0);
                    }
                    GgmlDType::Q6K => finite(b, 208, v),
                    GgmlDType::F16 => finite(b, 0, v - 0.02),
                    GgmlDType::BF16 => b.copy_from_slice(&bf16::from_f32(v - 0.02).to_le_bytes()),
                    GgmlDType::F32 => b.copy_from_slice(&(v - 0.02).to_le_bytes()),
                    _ => unreachable!(),
                }
            }
            let n = blocks * values;
            let mut ours = vec![0f32; n];
            dequantize(dtype, &bytes, &mut ours);
            let theirs = qtensor_from_ggml(dtype, &bytes, vec![n], &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{dtype:?} value {i}: {a} vs {b}"
                );
            }
            // The fused dot product equals the dot product with the decoded values (computed in f64).
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let want: f64 = theirs
                .iter()
                .zip(&x)
                .map(|(&w, &v)| w as f64 * v as f64)
                .sum();
            let got = dot_row(dtype, &bytes, &x) as f64;
            let scale: f64 = theirs
                .iter()
                .zip(&x)
                .map(|(&w, &v)| (w as f64 * v as f64).abs())
                .sum();
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + scale),
                "{dtype:?} dot: {got} vs {want}"
            );
        }
    }
}

//! GGUF's block quantizations, decoded from their raw bytes: the layouts of ggml's `block_q4_0` ... `block_q6_k`.
//! Written for speed (fixed-size loops the compiler vectorizes) and as the plain reference the WebGPU kernels
//! decode the same bytes against; tested against candle's and gguf-py's decoders.

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// Values per block and bytes per block.
pub fn block_shape(dtype: GgmlDType) -> (usize, usize) {
    (dtype.block_size(), dtype.type_size())
}

/// The f16 at `bytes[at..at + 2]` as f32.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
pub(crate) fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// The f16 at `bytes[at..at + 2]` as f32 (`f16_table`).
#[cfg(target_arch = "wasm32")]
#[inline(always)]
pub(crate) fn half(bytes: &[u8], at: usize) -> f32 {
    half_in(f16_table(), bytes, at)
}

/// Every f16 as f32, indexed by its bits: wasm's f16 conversion. wasm has no conversion instruction, and the
/// `half` crate's conversion in software, with its branches, took about 15% of the browser's Q4_1 products
/// (docs/benchmarks.md, stop 43). The table (256 KB, built once on first use) holds that conversion's own
/// results, so the values are the same bit for bit. The simd128 kernels fetch it once per row.
#[cfg(target_arch = "wasm32")]
#[inline(always)]
pub(crate) fn f16_table() -> &'static [f32; 65536] {
    static TABLE: std::sync::OnceLock<Box<[f32; 65536]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let values: Box<[f32]> = (0..=u16::MAX).map(|h| f16::from_bits(h).to_f32()).collect();
        values.try_into().expect("65,536 values")
    })
}

/// `half` with the table at hand. A u16 index into 65,536 values needs no bounds check.
#[cfg(target_arch = "wasm32")]
#[inline(always)]
pub(crate) fn half_in(table: &[f32; 65536], bytes: &[u8], at: usize) -> f32 {
    table[u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize]
}

/// Decodes whole blocks of `dtype` from `bytes` into `out` (`out.len()` values).
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if super::avx512_blocks::dequantize(dtype, bytes, out) || super::avx2::dequantize(dtype, bytes, out) {
        return;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if super::simd128::dequantize(dtype, bytes, out) {
        return;
    }
    portable_dequantize(dtype, bytes, out)
}

/// `dequantize` in portable Rust: what CPUs without AVX2 run (and wasm, for the types `simd128` does not cover),
/// and the twin the AVX2 and simd128 decoders must equal bit for bit.
pub fn portable_dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
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
                let (y, b): (&mut [f32; 32], &[u8; 18]) = (y.try_into().unwrap(), b.try_into().unwrap());
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
                let (y, b): (&mut [f32; 32], &[u8; 20]) = (y.try_into().unwrap(), b.try_into().unwrap());
                let (d, m) = (half(b, 0), half(b, 2));
                let qs: &[u8; 16] = b[4..20].try_into().unwrap();
                let (lo, hi) = y.split_at_mut(16);
                for j in 0..16 {
                    lo[j] = (qs[j] & 0x0f) as f32 * d + m;
                }
                for j in 0..16 {
                    hi[j] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlDType::Q5_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(22)) {
                let (y, b): (&mut [f32; 32], &[u8; 22]) = (y.try_into().unwrap(), b.try_into().unwrap());
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
                let (y, b): (&mut [f32; 32], &[u8; 34]) = (y.try_into().unwrap(), b.try_into().unwrap());
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
///
/// Blocks and activations are taken as fixed-size arrays so the compiler drops bounds checks and vectorizes.
pub fn dot_row(dtype: GgmlDType, bytes: &[u8], x: &[f32]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if let Some(dot) = super::avx512_blocks::dot_row(dtype, bytes, x).or_else(|| super::avx2::dot_row(dtype, bytes, x))
    {
        return dot;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if let Some(dot) = super::simd128::dot_row(dtype, bytes, x) {
        return dot;
    }
    portable_dot_row(dtype, bytes, x)
}

/// `dot_row` in portable Rust: what CPUs without AVX2 run (and wasm, for the types `simd128` does not cover), and
/// the twin the AVX2 and simd128 kernels are tested against.
pub fn portable_dot_row(dtype: GgmlDType, bytes: &[u8], x: &[f32]) -> f32 {
    let lanes = match dtype {
        GgmlDType::Q8_0 => fold_blocks::<34, 32>(bytes, x, |acc, b, x| {
            let mut q = [0f32; 32];
            for j in 0..32 {
                q[j] = b[2 + j] as i8 as f32;
            }
            add_scaled(acc, half(b, 0), &dot8(&q, x));
        }),
        GgmlDType::Q4_0 => fold_blocks::<18, 32>(bytes, x, |acc, b, x| {
            let mut q = [0f32; 32];
            for j in 0..16 {
                q[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32;
                q[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32;
            }
            add_scaled(acc, half(b, 0), &dot8(&q, x));
        }),
        GgmlDType::Q4_1 => fold_blocks::<20, 32>(bytes, x, |acc, b, x| {
            let mut q = [0f32; 32];
            for j in 0..16 {
                q[j] = (b[4 + j] & 0x0f) as f32;
                q[j + 16] = (b[4 + j] >> 4) as f32;
            }
            add_scaled(acc, half(b, 0), &dot8(&q, x));
            add_scaled(acc, half(b, 2), &sum8(x));
        }),
        GgmlDType::Q5_0 => fold_blocks::<22, 32>(bytes, x, |acc, b, x| {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let mut q = [0f32; 32];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                q[j] = (((b[6 + j] & 0x0f) as u32 | h0) as i32 - 16) as f32;
                q[j + 16] = (((b[6 + j] >> 4) as u32 | h1) as i32 - 16) as f32;
            }
            add_scaled(acc, half(b, 0), &dot8(&q, x));
        }),
        GgmlDType::Q4K => fold_blocks::<144, 256>(bytes, x, |acc, b, x| {
            let (d, dmin) = (half(b, 0), half(b, 2));
            let scales = &b[4..16];
            for g in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * g, scales);
                let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                let qs: &[u8; 32] = b[16 + 32 * g..48 + 32 * g].try_into().unwrap();
                let (mut lo, mut hi) = ([0f32; 32], [0f32; 32]);
                for l in 0..32 {
                    lo[l] = (qs[l] & 0x0f) as f32;
                    hi[l] = (qs[l] >> 4) as f32;
                }
                let x1: &[f32; 32] = x[64 * g..64 * g + 32].try_into().unwrap();
                let x2: &[f32; 32] = x[64 * g + 32..64 * g + 64].try_into().unwrap();
                add_scaled(acc, d * sc1 as f32, &dot8(&lo, x1));
                add_scaled(acc, d * sc2 as f32, &dot8(&hi, x2));
                add_scaled(acc, -dmin * m1 as f32, &sum8(x1));
                add_scaled(acc, -dmin * m2 as f32, &sum8(x2));
            }
        }),
        GgmlDType::Q6K => fold_blocks::<210, 256>(bytes, x, |acc, b, x| {
            let d = half(b, 208);
            for h in 0..2 {
                let ql: &[u8; 64] = b[64 * h..64 * h + 64].try_into().unwrap();
                let qh: &[u8; 32] = b[128 + 32 * h..160 + 32 * h].try_into().unwrap();
                let sc = &b[192 + 8 * h..200 + 8 * h];
                // Four runs of 32 values (l + 32k); each run has two scales, one per 16 values.
                let mut q = [[0f32; 32]; 4];
                for l in 0..32 {
                    q[0][l] = (((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32) as f32;
                    q[1][l] = (((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32) as f32;
                    q[2][l] = (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32) as f32;
                    q[3][l] = (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32) as f32;
                }
                for (k, run) in q.iter().enumerate() {
                    let xs: &[f32; 32] = x[128 * h + 32 * k..128 * h + 32 * k + 32].try_into().unwrap();
                    let (first, second) = dot8_halves(run, xs);
                    add_scaled(acc, d * (sc[2 * k] as i8) as f32, &first);
                    add_scaled(acc, d * (sc[2 * k + 1] as i8) as f32, &second);
                }
            }
        }),
        // Float weights: decode and multiply.
        _ => {
            let mut row = vec![0f32; x.len()];
            dequantize(dtype, bytes, &mut row);
            return super::dot(&row, x);
        }
    };
    lanes.iter().sum()
}

/// Runs `f(lanes, block, activations)` over the blocks of a row (`B` bytes and `V` values per block); `f` adds
/// its block's contribution to eight running lanes, summed once at the end of the row.
#[inline(always)]
fn fold_blocks<const B: usize, const V: usize>(
    bytes: &[u8],
    x: &[f32],
    f: impl Fn(&mut [f32; 8], &[u8; B], &[f32; V]),
) -> [f32; 8] {
    let mut acc = [0f32; 8];
    for (b, x) in bytes.chunks_exact(B).zip(x.chunks_exact(V)) {
        f(&mut acc, b.try_into().unwrap(), x.try_into().unwrap());
    }
    acc
}

/// Eight lanes of the products of 32 values: lane l sums a[l + 8c] * b[l + 8c].
#[inline(always)]
fn dot8(a: &[f32; 32], b: &[f32; 32]) -> [f32; 8] {
    let mut s = [0f32; 8];
    for c in 0..4 {
        for l in 0..8 {
            s[l] += a[8 * c + l] * b[8 * c + l];
        }
    }
    s
}

/// `dot8` over the first 16 and the last 16 values separately (Q6_K scales 16 values at a time).
#[inline(always)]
fn dot8_halves(a: &[f32; 32], b: &[f32; 32]) -> ([f32; 8], [f32; 8]) {
    let (mut s, mut t) = ([0f32; 8], [0f32; 8]);
    for l in 0..8 {
        s[l] = a[l] * b[l] + a[8 + l] * b[8 + l];
        t[l] = a[16 + l] * b[16 + l] + a[24 + l] * b[24 + l];
    }
    (s, t)
}

#[inline(always)]
fn sum8(a: &[f32; 32]) -> [f32; 8] {
    let mut s = [0f32; 8];
    for c in 0..4 {
        for l in 0..8 {
            s[l] += a[8 * c + l];
        }
    }
    s
}

#[inline(always)]
fn add_scaled(acc: &mut [f32; 8], scale: f32, v: &[f32; 8]) {
    for l in 0..8 {
        acc[l] += scale * v[l];
    }
}

/// The four runs of 32 values (value l + 32k of the half in run k) of half `h` of a Q6_K block: four low bits from
/// `ql`, two high bits from `qh`, minus 32, as bytes (the 8-bit products' form). `dequantize` and `dot_row` unpack
/// the same values straight to f32 in their own loops: going through these bytes measured slower in the portable
/// dot product (`examples/dot_speed.rs`, Q6_K portable 1.1-2.7 GB/s against 2.9-3.8).
#[inline(always)]
pub(crate) fn q6k_runs(b: &[u8], h: usize) -> [[i8; 32]; 4] {
    let ql: &[u8; 64] = b[64 * h..64 * h + 64].try_into().unwrap();
    let qh: &[u8; 32] = b[128 + 32 * h..160 + 32 * h].try_into().unwrap();
    let mut q = [[0i8; 32]; 4];
    for l in 0..32 {
        q[0][l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
        q[1][l] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
        q[2][l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
        q[3][l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
    }
    q
}

/// Q5_0 blocks rewritten as Q8_0 blocks of the same values: each block's f16 scale `d` kept, each value `q - 16`
/// (`-16..=15`) stored as a signed byte. Lossless: `d * (q - 16)` decodes the same in either, and a block's dot
/// product is the same sum in the same order (`portable_dot_row`'s two arms differ only in the unpacking). 34
/// bytes a block where Q5_0 takes 22, but in wasm, where no instruction spreads Q5_0's fifth bits, Q8_0's kernels
/// are the faster (`QuantMatrix::for_decoding`). In simd128 where compiled (Gemma 3's 63 M values while the model
/// loads), else `portable_q5_0_as_q8_0`; the same bytes. `out`: 34 bytes for each 22 of `bytes`.
pub fn q5_0_as_q8_0(bytes: &[u8], out: &mut [u8]) {
    assert_eq!(bytes.len() / 22 * 34, out.len(), "a Q8_0 block for each Q5_0 block");
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    super::simd128::q5_0_as_q8_0(bytes, out);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    portable_q5_0_as_q8_0(bytes, out);
}

/// `q5_0_as_q8_0` in portable Rust, into `out` (34 bytes for each 22 of `bytes`).
pub fn portable_q5_0_as_q8_0(bytes: &[u8], out: &mut [u8]) {
    for (b, o) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(34)) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        o[..2].copy_from_slice(&b[..2]);
        for j in 0..16 {
            let (low, high) = (b[6 + j] & 0x0f, b[6 + j] >> 4);
            o[2 + j] = ((low as i32 | ((qh >> j) as i32 & 1) << 4) - 16) as i8 as u8;
            o[18 + j] = ((high as i32 | ((qh >> (j + 16)) as i32 & 1) << 4) - 16) as i8 as u8;
        }
    }
}

/// Scale and minimum of sub-block `j` (0..8) of a Q4_K block: 6 bits each, packed into 12 bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use candle_core::Device;

    /// Q5_0 blocks rewritten as Q8_0 (random bytes, finite scales) decode to the same values bit for bit, and a
    /// row's dot product is the same in either type in the portable code (and in simd128's kernels, which equal it:
    /// tests/wasm.rs; AVX2's two kernels sum in different orders, and natively nothing is rewritten).
    #[test]
    fn q5_0_rewritten_as_q8_0_keeps_every_value() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut bytes: Vec<u8> = (0..22 * 40)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for (i, b) in bytes.chunks_exact_mut(22).enumerate() {
            b[..2].copy_from_slice(&f16::from_f32(0.02 - i as f32 * 0.001).to_le_bytes());
        }
        let mut q8 = vec![0u8; 40 * 34];
        q5_0_as_q8_0(&bytes, &mut q8);
        // By hand: block 0's value 3 is its low nibble of byte 9 with bit 3 of qh as the fifth bit, minus 16.
        let qh = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        assert_eq!(q8[2 + 3] as i8 as i32, (bytes[9] & 0x0f) as i32 + 16 * ((qh >> 3) & 1) as i32 - 16);
        let (mut from_q5, mut from_q8) = (vec![0f32; 40 * 32], vec![0f32; 40 * 32]);
        portable_dequantize(GgmlDType::Q5_0, &bytes, &mut from_q5);
        portable_dequantize(GgmlDType::Q8_0, &q8, &mut from_q8);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&from_q5), bits(&from_q8));
        let x: Vec<f32> = (0..40 * 32).map(|i| ((i * 53 % 97) as f32 - 48.0) / 17.0).collect();
        for (q5, q8) in bytes.chunks_exact(22 * 8).zip(q8.chunks_exact(34 * 8)) {
            let x = &x[..256];
            let (a, b) = (portable_dot_row(GgmlDType::Q5_0, q5, x), portable_dot_row(GgmlDType::Q8_0, q8, x));
            assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
        }
    }

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
            let finite =
                |b: &mut [u8], at: usize, v: f32| b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
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
            // The SIMD decoders and the portable twin agree bit for bit (batched decoding's rows depend on it).
            let mut portable = vec![0f32; n];
            portable_dequantize(dtype, &bytes, &mut portable);
            for (i, (a, b)) in ours.iter().zip(&portable).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} value {i}: {a} vs the portable {b}");
            }
            // Each SIMD decoder this CPU runs, whichever one `dequantize` picks.
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
            for (form, decoder) in [
                ("avx2", super::super::avx2::dequantize as fn(GgmlDType, &[u8], &mut [f32]) -> bool),
                ("avx512", super::super::avx512_blocks::dequantize),
            ] {
                let mut simd = vec![f32::NAN; n];
                if decoder(dtype, &bytes, &mut simd) {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&simd), bits(&portable), "{dtype:?}: the {form} decoder and the portable one");
                }
            }
            let theirs = qtensor_from_ggml(dtype, &bytes, vec![n], &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{dtype:?} value {i}: {a} vs {b}");
            }
            // The fused dot product equals the dot product with the decoded values (computed in f64).
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let want: f64 = theirs.iter().zip(&x).map(|(&w, &v)| w as f64 * v as f64).sum();
            let scale: f64 = theirs.iter().zip(&x).map(|(&w, &v)| (w as f64 * v as f64).abs()).sum();
            let mut forms =
                vec![("dot_row", dot_row(dtype, &bytes, &x)), ("portable", portable_dot_row(dtype, &bytes, &x))];
            // Every SIMD kernel this CPU runs for the type, whichever one `dot_row` picks.
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
            forms.extend(
                [
                    ("avx2", super::super::avx2::dot_row(dtype, &bytes, &x)),
                    ("avx512", super::super::avx512_blocks::dot_row(dtype, &bytes, &x)),
                ]
                .into_iter()
                .filter_map(|(form, got)| Some((form, got?))),
            );
            for (form, got) in forms {
                let got = got as f64;
                assert!((got - want).abs() <= 1e-5 * (1.0 + scale), "{dtype:?} {form}: {got} vs {want}");
            }
        }
    }
}

//! The CPU path's block kernels written out in WebAssembly SIMD (simd128): `blocks::dot_row` (a decoding step's
//! products) and `blocks::dequantize` (a batched step's and a prompt's weight rows) for the block types of the
//! offline models (Q8_0, Q4_1, Q5_0, Q4_K, Q6_K). The compiler leaves the portable `dot_row` nearly scalar (natively,
//! built without AVX2, it decodes SmolLM2 at 15 tokens/s on one thread against the AVX2 kernels' 76); here each
//! block's integers are unpacked sixteen bytes at a time and widened to f32 four at a time. (The f32 dot products
//! `dot` and `dot4` stay portable: in wasm the compiler vectorizes them, and a version written here measured 2-4x
//! slower.)
//!
//! Also the greedy screen's approximation of Q8_0 rows against activations rounded to 8 bits (`q8_0_rounded`), and
//! `int8::dot_row` (the products with activations rounded to 8 bits, `LoadOptions::int8_activations`) for the
//! layers' types (`int8_dot_row`), in integer products of pairs: `i32x4_dot_i16x8` multiplies eight pairs of 16-bit
//! integers an instruction, where the exact kernels widen every weight to f32 and multiply four.
//!
//! Each kernel keeps its portable twin's lanes (`dot_row`'s eight are two f32x4 registers) and its arithmetic:
//! the same multiplications and additions in the same order (simd128 has no fused multiply-add), so the results
//! equal the portable code's bit for bit (tests/wasm.rs).
//!
//! Compiled where the target has simd128: the project's wasm builds enable it (`.cargo/config.toml`,
//! scripts/worker-threads.sh), and every browser with WebGPU or wasm threads has it.

use core::arch::wasm32::*;

use candle_core::quantized::GgmlDType;

use super::blocks::{f16_table, half_in, scale_min_k4};
use super::int8::Q8Row;

/// `blocks::dot_row` for the types written here; `None` for the others.
pub fn dot_row(dtype: GgmlDType, bytes: &[u8], x: &[f32]) -> Option<f32> {
    dot_rows(dtype, bytes, [x], None).map(|[dot]| dot)
}

/// Whether `dot_row` and `dot_rows` cover `dtype`: asked of `dot_rows` itself, with no activation rows and no
/// blocks, so that the answer cannot drift from the kernels' own list.
pub fn covers(dtype: GgmlDType) -> bool {
    dot_rows::<0>(dtype, &[], [], None).is_some()
}

/// The eight lanes of `sum8` of each 32-value block of an activation row, eight values a block. They are the same
/// for every weight row, so a product makes them once per activation row and hands them to `dot_rows`, which
/// otherwise sums them again for each weight row (a third of Q4_1's additions).
pub fn block_sums(x: &[f32]) -> Vec<f32> {
    let mut sums = vec![0f32; x.len() / 32 * 8];
    for (block, x) in x.chunks_exact(32).enumerate() {
        let lanes = sum8(x.try_into().unwrap());
        store4(&mut sums, 8 * block, lanes.low);
        store4(&mut sums, 8 * block + 4, lanes.high);
    }
    sums
}

/// `dot_row` of one weight row with each of `M` activation rows, the row's blocks unpacked once for all of them.
/// Each activation row gets the same operations in the same order as alone, so each value is `dot_row`'s bit for
/// bit: this is a batched step's exact product in wasm (`QuantMatrix`'s `Form::Rows`), which then gives a
/// sequence what a step of its own gives it. `sums`, where given, are each row's `block_sums`, which Q4_1's and
/// Q4_K's kernels read (the others need none): the values they would sum, so the same results.
pub fn dot_rows<const M: usize>(
    dtype: GgmlDType,
    bytes: &[u8],
    xs: [&[f32]; M],
    sums: Option<[&[f32]; M]>,
) -> Option<[f32; M]> {
    let summed = |_: usize, _: usize, x: &[f32; 32]| sum8(x);
    Some(match (dtype, sums) {
        (GgmlDType::Q8_0, _) => q8_0(bytes, xs),
        (GgmlDType::Q4_1, None) => q4_1(bytes, xs, summed),
        (GgmlDType::Q4_1, Some(sums)) => q4_1(bytes, xs, read_sums(xs, sums)),
        (GgmlDType::Q5_0, _) => q5_0(bytes, xs),
        (GgmlDType::Q4K, None) => q4k(bytes, xs, summed),
        (GgmlDType::Q4K, Some(sums)) => q4k(bytes, xs, read_sums(xs, sums)),
        (GgmlDType::Q6K, _) => q6k(bytes, xs),
        _ => return None,
    })
}

/// The `SumsOf` that reads each activation row's `block_sums` (checked to cover every block).
fn read_sums<'a, const M: usize>(xs: [&[f32]; M], sums: [&'a [f32]; M]) -> impl SumsOf + 'a {
    for (x, sums) in xs.iter().zip(sums) {
        assert!(sums.len() >= x.len() / 32 * 8, "block sums for every block");
    }
    move |j: usize, at: usize, _: &[f32; 32]| Lanes { low: load4(sums[j], at / 4), high: load4(sums[j], at / 4 + 4) }
}

/// Eight running lanes, as `blocks::dot_row` keeps them: lanes 0-3 and 4-7.
#[derive(Clone, Copy)]
struct Lanes {
    low: v128,
    high: v128,
}

impl Lanes {
    fn zero() -> Self {
        Self { low: f32x4_splat(0.0), high: f32x4_splat(0.0) }
    }

    /// `acc[l] += scale * v[l]` (`blocks::add_scaled`).
    #[inline(always)]
    fn add_scaled(&mut self, scale: f32, v: Lanes) {
        let s = f32x4_splat(scale);
        self.low = f32x4_add(self.low, f32x4_mul(s, v.low));
        self.high = f32x4_add(self.high, f32x4_mul(s, v.high));
    }

    /// The eight lanes summed in order, as `blocks::dot_row` sums its lanes.
    fn sum(self) -> f32 {
        let lanes = [
            f32x4_extract_lane::<0>(self.low),
            f32x4_extract_lane::<1>(self.low),
            f32x4_extract_lane::<2>(self.low),
            f32x4_extract_lane::<3>(self.low),
            f32x4_extract_lane::<0>(self.high),
            f32x4_extract_lane::<1>(self.high),
            f32x4_extract_lane::<2>(self.high),
            f32x4_extract_lane::<3>(self.high),
        ];
        lanes.iter().sum()
    }
}

/// `blocks::dequantize` for the types written here; `false` for the others.
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    match dtype {
        GgmlDType::Q8_0 => dequantize_q8_0(bytes, out),
        GgmlDType::Q4_1 => dequantize_q4_1(bytes, out),
        GgmlDType::Q5_0 => dequantize_q5_0(bytes, out),
        GgmlDType::Q4K => dequantize_q4k(bytes, out),
        GgmlDType::Q6K => dequantize_q6k(bytes, out),
        _ => return false,
    }
    true
}

/// Values `at..at + 4` of `x`.
#[inline(always)]
fn load4(x: &[f32], at: usize) -> v128 {
    assert!(at + 4 <= x.len());
    // SAFETY: the four values lie inside `x` (asserted; with fixed-size blocks the check folds away).
    unsafe { v128_load(x.as_ptr().add(at) as *const v128) }
}

/// Stores four values at `y[at..at + 4]`.
#[inline(always)]
fn store4(y: &mut [f32], at: usize, v: v128) {
    assert!(at + 4 <= y.len());
    // SAFETY: the four values lie inside `y` (asserted).
    unsafe { v128_store(y.as_mut_ptr().add(at) as *mut v128, v) }
}

/// Sixteen bytes from `b[at..at + 16]`.
#[inline(always)]
fn load16(b: &[u8], at: usize) -> v128 {
    assert!(at + 16 <= b.len());
    // SAFETY: the sixteen bytes lie inside `b` (asserted); v128 loads need no alignment.
    unsafe { v128_load(b.as_ptr().add(at) as *const v128) }
}

/// The sixteen signed bytes of `v` as four f32x4: values 0-3, 4-7, 8-11, 12-15.
#[inline(always)]
fn widen_i8(v: v128) -> [v128; 4] {
    let (low, high) = (i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v));
    [
        f32x4_convert_i32x4(i32x4_extend_low_i16x8(low)),
        f32x4_convert_i32x4(i32x4_extend_high_i16x8(low)),
        f32x4_convert_i32x4(i32x4_extend_low_i16x8(high)),
        f32x4_convert_i32x4(i32x4_extend_high_i16x8(high)),
    ]
}

/// `widen_i8` for unsigned bytes.
#[inline(always)]
fn widen_u8(v: v128) -> [v128; 4] {
    let (low, high) = (u16x8_extend_low_u8x16(v), u16x8_extend_high_u8x16(v));
    [
        f32x4_convert_u32x4(u32x4_extend_low_u16x8(low)),
        f32x4_convert_u32x4(u32x4_extend_high_u16x8(low)),
        f32x4_convert_u32x4(u32x4_extend_low_u16x8(high)),
        f32x4_convert_u32x4(u32x4_extend_high_u16x8(high)),
    ]
}

/// Thirty-two values (eight f32x4, in order) dotted with `x` into eight lanes: lane l sums q[l + 8c] * x[l + 8c]
/// over c in 0..4, from zero, in `blocks::dot8`'s order.
#[inline(always)]
fn dot8(q: [v128; 8], x: &[f32; 32]) -> Lanes {
    let mut s = Lanes::zero();
    for c in 0..4 {
        s.low = f32x4_add(s.low, f32x4_mul(q[2 * c], load4(x, 8 * c)));
        s.high = f32x4_add(s.high, f32x4_mul(q[2 * c + 1], load4(x, 8 * c + 4)));
    }
    s
}

/// Lane l of `x[l + 8c]` summed over c in 0..4, from zero (`blocks::sum8`).
#[inline(always)]
fn sum8(x: &[f32; 32]) -> Lanes {
    let mut s = Lanes::zero();
    for c in 0..4 {
        s.low = f32x4_add(s.low, load4(x, 8 * c));
        s.high = f32x4_add(s.high, load4(x, 8 * c + 4));
    }
    s
}

/// `dot8` over values 0-15 and 16-31 separately, each the sum of two products with no zero first
/// (`blocks::dot8_halves`).
#[inline(always)]
fn dot8_halves(q: [v128; 8], x: &[f32; 32]) -> (Lanes, Lanes) {
    let pair = |a: usize| Lanes {
        low: f32x4_add(f32x4_mul(q[a], load4(x, 4 * a)), f32x4_mul(q[a + 2], load4(x, 4 * a + 8))),
        high: f32x4_add(f32x4_mul(q[a + 1], load4(x, 4 * a + 4)), f32x4_mul(q[a + 3], load4(x, 4 * a + 12))),
    };
    (pair(0), pair(4))
}

/// The low and the high four bits of each of the sixteen bytes of `v`.
#[inline(always)]
fn nibbles(v: v128) -> (v128, v128) {
    (v128_and(v, u8x16_splat(0x0f)), u8x16_shr(v, 4))
}

/// Byte j of the result is all ones where bit j of `bits` (its low 16 bits) is set, else zero.
#[inline(always)]
fn bytes_from_bits(bits: u32) -> v128 {
    let spread = i8x16_swizzle(u16x8_splat(bits as u16), i8x16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    let bit = u8x16(1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128);
    i8x16_eq(v128_and(spread, bit), bit)
}

/// The 32 values of a Q5_0 block as signed bytes (values 0-15, then 16-31): `(q | bit << 4) - 16` is the nibble
/// itself where the fifth bit is set, else the nibble with the byte's top four bits set (the nibble minus 16).
#[inline(always)]
fn q5_0_values(b: &[u8]) -> (v128, v128) {
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let (low, high) = nibbles(load16(b, 6));
    let top = i8x16_splat(-16);
    (v128_or(low, v128_andnot(top, bytes_from_bits(qh))), v128_or(high, v128_andnot(top, bytes_from_bits(qh >> 16))))
}

/// `blocks::q5_0_as_q8_0`: each 22-byte Q5_0 block of `bytes` as a 34-byte Q8_0 block in `out`, its scale copied
/// and its values unpacked as the Q5_0 kernels unpack them.
pub fn q5_0_as_q8_0(bytes: &[u8], out: &mut [u8]) {
    for (b, o) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(34)) {
        let (low, high) = q5_0_values(b);
        o[..2].copy_from_slice(&b[..2]);
        // SAFETY: `o` is 34 bytes: sixteen from 2 and sixteen from 18 lie inside it.
        unsafe {
            v128_store(o.as_mut_ptr().add(2) as *mut v128, low);
            v128_store(o.as_mut_ptr().add(18) as *mut v128, high);
        }
    }
}

/// Sixteen values of each of the four runs of 32 of half `h` of a Q6_K block (values l + 32k of the half, run k,
/// for l in `at..at + 16`, `at` 0 or 16), as signed bytes: four low bits from `ql` and two high bits from `qh`,
/// minus 32, as `blocks::dot_row` and `blocks::dequantize` unpack them.
#[inline(always)]
fn q6k_runs(b: &[u8], h: usize, at: usize) -> [v128; 4] {
    let (low_a, high_a) = nibbles(load16(b, 64 * h + at));
    let (low_b, high_b) = nibbles(load16(b, 64 * h + 32 + at));
    let qh = load16(b, 128 + 32 * h + at);
    let top = |shift: u32| u8x16_shl(v128_and(u8x16_shr(qh, shift), u8x16_splat(3)), 4);
    let offset = i8x16_splat(32);
    [
        i8x16_sub(v128_or(low_a, top(0)), offset),
        i8x16_sub(v128_or(low_b, top(2)), offset),
        i8x16_sub(v128_or(high_a, top(4)), offset),
        i8x16_sub(v128_or(high_b, top(6)), offset),
    ]
}

/// Two runs of sixteen values as the eight f32x4 of thirty-two.
#[inline(always)]
fn join(a: [v128; 4], b: [v128; 4]) -> [v128; 8] {
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// Runs `f(lanes, block, activations, at)` over the blocks of a row (`B` bytes and `V` values per block) and the
/// matching values of each of the `M` activation rows, which start at value `at` of the rows; `f` adds the block's
/// contribution to each row's lanes.
fn fold_blocks<const B: usize, const V: usize, const M: usize>(
    bytes: &[u8],
    xs: [&[f32]; M],
    f: impl Fn(&mut [Lanes; M], &[u8; B], [&[f32; V]; M], usize),
) -> [f32; M] {
    let blocks = xs.iter().fold(bytes.len() / B, |n, x| n.min(x.len() / V));
    let mut acc = [Lanes::zero(); M];
    for (n, b) in bytes.chunks_exact(B).take(blocks).enumerate() {
        f(&mut acc, b.try_into().unwrap(), xs.map(|x| x[n * V..(n + 1) * V].try_into().unwrap()), n * V);
    }
    acc.map(Lanes::sum)
}

fn q8_0<const M: usize>(bytes: &[u8], xs: [&[f32]; M]) -> [f32; M] {
    let t = f16_table();
    fold_blocks::<34, 32, M>(bytes, xs, |acc, b, xs, _| {
        let q = join(widen_i8(load16(b, 2)), widen_i8(load16(b, 18)));
        let d = half_in(t, b, 0);
        for (acc, x) in acc.iter_mut().zip(xs) {
            acc.add_scaled(d, dot8(q, x));
        }
    })
}

/// Q8_0's greedy screen in wasm (`greedy_screen::rounded_dots`): one weight row against `M` activation rows rounded
/// to 8 bits, their values widened to i16 (`xs`) with their blocks' scales (`scales`). Each block's weights are
/// widened once for the `M` rows; `i32x4_dot_i16x8` sums a pair of products into each of four i32 lanes, eight
/// multiplications an instruction, where the exact kernel converts every weight to f32 first. Lane l of a block
/// sums values `8v + 2l` and `8v + 2l + 1` over v in 0..4 in integers (exact), then adds `isum * (d * scale)` to
/// its f32 lane; the four lanes are summed in order at the end, as the portable twin does.
pub fn q8_0_rounded<const M: usize>(bytes: &[u8], xs: [&[i16]; M], scales: [&[f32]; M]) -> [f32; M] {
    let t = f16_table();
    let blocks = bytes.len() / 34;
    for (x, scale) in xs.iter().zip(&scales) {
        assert!(x.len() >= 32 * blocks && scale.len() >= blocks, "rounded activations for every block");
    }
    let mut acc = [f32x4_splat(0.0); M];
    for (n, b) in bytes.chunks_exact(34).enumerate() {
        let b: &[u8; 34] = b.try_into().unwrap();
        let (low, high) = (load16(b, 2), load16(b, 18));
        let w = [
            i16x8_extend_low_i8x16(low),
            i16x8_extend_high_i8x16(low),
            i16x8_extend_low_i8x16(high),
            i16x8_extend_high_i8x16(high),
        ];
        let d = half_in(t, b, 0);
        for j in 0..M {
            let x: &[i16; 32] = xs[j][32 * n..32 * n + 32].try_into().unwrap();
            let dot = |v: usize| i32x4_dot_i16x8(w[v], load8_i16(x, 8 * v));
            let isum = i32x4_add(i32x4_add(dot(0), dot(1)), i32x4_add(dot(2), dot(3)));
            let scale = f32x4_splat(d * scales[j][n]);
            acc[j] = f32x4_add(acc[j], f32x4_mul(f32x4_convert_i32x4(isum), scale));
        }
    }
    acc.map(|a| {
        [f32x4_extract_lane::<0>(a), f32x4_extract_lane::<1>(a), f32x4_extract_lane::<2>(a), f32x4_extract_lane::<3>(a)]
            .iter()
            .sum()
    })
}

/// Values `at..at + 8` of `x`.
#[inline(always)]
fn load8_i16(x: &[i16], at: usize) -> v128 {
    assert!(at + 8 <= x.len());
    // SAFETY: the eight values lie inside `x` (asserted; with fixed-size blocks the check folds away).
    unsafe { v128_load(x.as_ptr().add(at) as *const v128) }
}

/// Where Q4_1's and Q4_K's kernels get `sum8` of the 32 values `x` of activation row `j` from value `at` on:
/// summed from `x`, or read from the row's `block_sums`.
trait SumsOf: Fn(usize, usize, &[f32; 32]) -> Lanes {}
impl<F: Fn(usize, usize, &[f32; 32]) -> Lanes> SumsOf for F {}

fn q4_1<const M: usize>(bytes: &[u8], xs: [&[f32]; M], sums: impl SumsOf) -> [f32; M] {
    let t = f16_table();
    fold_blocks::<20, 32, M>(bytes, xs, |acc, b, xs, at| {
        let (low, high) = nibbles(load16(b, 4));
        let q = join(widen_u8(low), widen_u8(high));
        let (d, m) = (half_in(t, b, 0), half_in(t, b, 2));
        for (j, (acc, x)) in acc.iter_mut().zip(xs).enumerate() {
            acc.add_scaled(d, dot8(q, x));
            acc.add_scaled(m, sums(j, at, x));
        }
    })
}

fn q5_0<const M: usize>(bytes: &[u8], xs: [&[f32]; M]) -> [f32; M] {
    let t = f16_table();
    fold_blocks::<22, 32, M>(bytes, xs, |acc, b, xs, _| {
        let (low, high) = q5_0_values(b);
        let q = join(widen_i8(low), widen_i8(high));
        let d = half_in(t, b, 0);
        for (acc, x) in acc.iter_mut().zip(xs) {
            acc.add_scaled(d, dot8(q, x));
        }
    })
}

fn q4k<const M: usize>(bytes: &[u8], xs: [&[f32]; M], sums: impl SumsOf) -> [f32; M] {
    let t = f16_table();
    fold_blocks::<144, 256, M>(bytes, xs, |acc, b, xs, at| {
        let (d, dmin) = (half_in(t, b, 0), half_in(t, b, 2));
        let scales = &b[4..16];
        for g in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * g, scales);
            let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
            let ((low_a, high_a), (low_c, high_c)) = (nibbles(load16(b, 16 + 32 * g)), nibbles(load16(b, 32 + 32 * g)));
            let low = join(widen_u8(low_a), widen_u8(low_c));
            let high = join(widen_u8(high_a), widen_u8(high_c));
            for (j, (acc, x)) in acc.iter_mut().zip(xs).enumerate() {
                let x1: &[f32; 32] = x[64 * g..64 * g + 32].try_into().unwrap();
                let x2: &[f32; 32] = x[64 * g + 32..64 * g + 64].try_into().unwrap();
                acc.add_scaled(d * sc1 as f32, dot8(low, x1));
                acc.add_scaled(d * sc2 as f32, dot8(high, x2));
                acc.add_scaled(-dmin * m1 as f32, sums(j, at + 64 * g, x1));
                acc.add_scaled(-dmin * m2 as f32, sums(j, at + 64 * g + 32, x2));
            }
        }
    })
}

fn q6k<const M: usize>(bytes: &[u8], xs: [&[f32]; M]) -> [f32; M] {
    let t = f16_table();
    fold_blocks::<210, 256, M>(bytes, xs, |acc, b, xs, _| {
        let d = half_in(t, b, 208);
        for h in 0..2 {
            let sc = &b[192 + 8 * h..200 + 8 * h];
            let (first16, last16) = (q6k_runs(b, h, 0), q6k_runs(b, h, 16));
            for k in 0..4 {
                let q = join(widen_i8(first16[k]), widen_i8(last16[k]));
                for (acc, x) in acc.iter_mut().zip(xs) {
                    let run: &[f32; 32] = x[128 * h + 32 * k..128 * h + 32 * k + 32].try_into().unwrap();
                    let (first, second) = dot8_halves(q, run);
                    acc.add_scaled(d * (sc[2 * k] as i8) as f32, first);
                    acc.add_scaled(d * (sc[2 * k + 1] as i8) as f32, second);
                }
            }
        }
    })
}

/// Stores the sixteen values of `q` (four f32x4) at `y[at..at + 16]`, each multiplied by `d` and, with `add`,
/// plus `add` (`q * d + m` as `blocks::portable_dequantize` computes it).
#[inline(always)]
fn store16(y: &mut [f32], at: usize, q: [v128; 4], d: f32, add: Option<f32>) {
    let d = f32x4_splat(d);
    for (i, q) in q.into_iter().enumerate() {
        let v = f32x4_mul(q, d);
        store4(y, at + 4 * i, add.map_or(v, |m| f32x4_add(v, f32x4_splat(m))));
    }
}

fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
    let t = f16_table();
    for (b, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = half_in(t, b, 0);
        store16(y, 0, widen_i8(load16(b, 2)), d, None);
        store16(y, 16, widen_i8(load16(b, 18)), d, None);
    }
}

fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) {
    let t = f16_table();
    for (b, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (half_in(t, b, 0), half_in(t, b, 2));
        let (low, high) = nibbles(load16(b, 4));
        store16(y, 0, widen_u8(low), d, Some(m));
        store16(y, 16, widen_u8(high), d, Some(m));
    }
}

fn dequantize_q5_0(bytes: &[u8], out: &mut [f32]) {
    let t = f16_table();
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let d = half_in(t, b, 0);
        let (low, high) = q5_0_values(b);
        store16(y, 0, widen_i8(low), d, None);
        store16(y, 16, widen_i8(high), d, None);
    }
}

fn dequantize_q4k(bytes: &[u8], out: &mut [f32]) {
    let t = f16_table();
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let (d, dmin) = (half_in(t, b, 0), half_in(t, b, 2));
        let scales = &b[4..16];
        for g in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * g, scales);
            let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
            let (d1, min1) = (f32x4_splat(d * sc1 as f32), f32x4_splat(dmin * m1 as f32));
            let (d2, min2) = (f32x4_splat(d * sc2 as f32), f32x4_splat(dmin * m2 as f32));
            for part in 0..2 {
                let (low, high) = nibbles(load16(b, 16 + 32 * g + 16 * part));
                let (low, high) = (widen_u8(low), widen_u8(high));
                for i in 0..4 {
                    let at = 64 * g + 16 * part + 4 * i;
                    store4(y, at, f32x4_sub(f32x4_mul(d1, low[i]), min1));
                    store4(y, at + 32, f32x4_sub(f32x4_mul(d2, high[i]), min2));
                }
            }
        }
    }
}

fn dequantize_q6k(bytes: &[u8], out: &mut [f32]) {
    let t = f16_table();
    for (b, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = half_in(t, b, 208);
        for h in 0..2 {
            let sc = &b[192 + 8 * h..200 + 8 * h];
            for (j, at) in [0, 16].into_iter().enumerate() {
                // Values l + 32k of the half, l in 16j..16j + 16, take scale `sc[j + 2k]` (`is = l / 16`).
                for (k, run) in q6k_runs(b, h, at).into_iter().enumerate() {
                    let scale = d * (sc[j + 2 * k] as i8) as f32;
                    store16(y, 128 * h + 32 * k + at, widen_i8(run), scale, None);
                }
            }
        }
    }
}

/// `int8::portable_dot_row` for Q4_1, Q5_0, Q4_K, Q6_K and Q8_0 (wasm's Q5_0 rows, `blocks::q5_0_as_q8_0`), bit for
/// bit; `None` for the other types. `q` is `x.values` widened to i16 (`int8::widen`), once for every weight row of
/// a product. Each block's integer sum is exact in either (i32 lanes of pair products, then the lanes added), and
/// the f32 operations that scale it are the twin's, in its order. Except Q5_0's (which wasm stores as Q8_0), the
/// blocks' sums are made four blocks (or sub-blocks, or Q6_K's runs) at a time, in one transpose (`four_sums`), and
/// their terms scaled in one f32x4: Q4_1's products took 1.3x as long a block at a time, Q8_0's 1.15-1.25x, Q4_K's
/// 1.3x and Q6_K's 1.2x (docs/benchmarks.md, stop 49).
pub fn int8_dot_row(dtype: GgmlDType, bytes: &[u8], x: &Q8Row, q: &[i16]) -> Option<f32> {
    let t = f16_table();
    assert_eq!(q.len(), x.values.len(), "the rounded row widened");
    let (scale, scaled_sum) = (&x.scale, &x.scaled_sum);
    let mut acc = 0f32;
    match dtype {
        GgmlDType::Q4_1 => {
            let sums = |b: usize, w: &[u8; 20]| {
                let (low, high) = nibbles(load16(w, 4));
                block_products(widen_u8_i16(low), widen_u8_i16(high), q, 32 * b)
            };
            let terms = |b: usize, w: [&[u8; 20]; 4], s: v128| {
                let d = f32x4(half_in(t, w[0], 0), half_in(t, w[1], 0), half_in(t, w[2], 0), half_in(t, w[3], 0));
                let m = f32x4(half_in(t, w[0], 2), half_in(t, w[1], 2), half_in(t, w[2], 2), half_in(t, w[3], 2));
                let scaled = f32x4_mul(f32x4_mul(d, load4(scale, b)), f32x4_convert_i32x4(s));
                f32x4_add(scaled, f32x4_mul(m, load4(scaled_sum, b)))
            };
            let term = |b: usize, w: &[u8; 20], s: i32| {
                half_in(t, w, 0) * scale[b] * s as f32 + half_in(t, w, 2) * scaled_sum[b]
            };
            acc = fold_four_blocks::<20>(bytes, sums, terms, term);
        }
        GgmlDType::Q5_0 => {
            for (b, w) in bytes.chunks_exact(22).enumerate() {
                let (low, high) = q5_0_values(w);
                let s = block_sum(widen_i8_i16(low), widen_i8_i16(high), q, 32 * b);
                acc += half_in(t, w, 0) * scale[b] * s as f32;
            }
        }
        GgmlDType::Q8_0 => {
            let sums = |b: usize, w: &[u8; 34]| {
                block_products(widen_i8_i16(load16(w, 2)), widen_i8_i16(load16(w, 18)), q, 32 * b)
            };
            let terms = |b: usize, w: [&[u8; 34]; 4], s: v128| {
                let d = f32x4(half_in(t, w[0], 0), half_in(t, w[1], 0), half_in(t, w[2], 0), half_in(t, w[3], 0));
                f32x4_mul(f32x4_mul(d, load4(scale, b)), f32x4_convert_i32x4(s))
            };
            let term = |b: usize, w: &[u8; 34], s: i32| half_in(t, w, 0) * scale[b] * s as f32;
            acc = fold_four_blocks::<34>(bytes, sums, terms, term);
        }
        GgmlDType::Q4K => {
            for (sb, w) in bytes.chunks_exact(144).enumerate() {
                let (d, dmin) = (half_in(t, w, 0), half_in(t, w, 2));
                let w: &[u8; 144] = w.try_into().unwrap();
                // Sub-blocks 2p and 2p + 1 share 32 bytes: low nibbles, then high. Four sub-blocks at a time, their
                // sums together and their terms scaled in one f32x4 (as `fold_four_blocks`), lane by lane the
                // twin's `d * sc * scale * s - dmin * m * scaled_sum`.
                for first in [0, 4] {
                    let mut p = [i32x4_splat(0); 4];
                    for pair in 0..2 {
                        let at = 16 + 32 * (first / 2 + pair);
                        let ((low_a, high_a), (low_b, high_b)) = (nibbles(load16(w, at)), nibbles(load16(w, at + 16)));
                        let b = sb * 8 + first + 2 * pair;
                        p[2 * pair] = block_products(widen_u8_i16(low_a), widen_u8_i16(low_b), q, 32 * b);
                        p[2 * pair + 1] = block_products(widen_u8_i16(high_a), widen_u8_i16(high_b), q, 32 * b + 32);
                    }
                    let sm: [(u8, u8); 4] = std::array::from_fn(|j| scale_min_k4(first + j, &w[4..16]));
                    let sc = f32x4(sm[0].0 as f32, sm[1].0 as f32, sm[2].0 as f32, sm[3].0 as f32);
                    let m = f32x4(sm[0].1 as f32, sm[1].1 as f32, sm[2].1 as f32, sm[3].1 as f32);
                    let b = sb * 8 + first;
                    let sums = f32x4_convert_i32x4(four_sums(p));
                    let up = f32x4_mul(f32x4_mul(f32x4_mul(f32x4_splat(d), sc), load4(scale, b)), sums);
                    let down = f32x4_mul(f32x4_mul(f32x4_splat(dmin), m), load4(scaled_sum, b));
                    add_in_order(&mut acc, f32x4_sub(up, down));
                }
            }
        }
        GgmlDType::Q6K => {
            for (sb, w) in bytes.chunks_exact(210).enumerate() {
                let d = half_in(t, w, 208);
                for h in 0..2 {
                    let (first, second) = (q6k_runs(w, h, 0), q6k_runs(w, h, 16));
                    // The four runs at once: each run's two half sums (`four_sums` of their lanes), times their i8
                    // scales and added in i32 (exact, as the twin's), then `d * scale * s` lane by lane.
                    let b = sb * 8 + 4 * h;
                    let halves = |runs: [v128; 4], at: usize| {
                        four_sums(std::array::from_fn(|run| {
                            pair_products(widen_i8_i16(runs[run]), q, 32 * (b + run) + at)
                        }))
                    };
                    let scale_of = |k: usize| {
                        let sc = |run: usize| w[192 + 2 * (4 * h + run) + k] as i8 as i32;
                        i32x4(sc(0), sc(1), sc(2), sc(3))
                    };
                    let s =
                        i32x4_add(i32x4_mul(scale_of(0), halves(first, 0)), i32x4_mul(scale_of(1), halves(second, 16)));
                    let terms = f32x4_mul(f32x4_mul(f32x4_splat(d), load4(scale, b)), f32x4_convert_i32x4(s));
                    add_in_order(&mut acc, terms);
                }
            }
        }
        _ => return None,
    }
    Some(acc)
}

/// Sixteen signed bytes as two i16x8: values 0-7 and 8-15.
#[inline(always)]
fn widen_i8_i16(v: v128) -> [v128; 2] {
    [i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v)]
}

/// `widen_i8_i16` for unsigned bytes.
#[inline(always)]
fn widen_u8_i16(v: v128) -> [v128; 2] {
    [u16x8_extend_low_u8x16(v), u16x8_extend_high_u8x16(v)]
}

/// The sum of a block's 32 weights (values 0-15 in `low`, 16-31 in `high`) times `q[at..at + 32]`, exact: the four
/// pair products' lanes added, then the lanes.
#[inline(always)]
fn block_sum(low: [v128; 2], high: [v128; 2], q: &[i16], at: usize) -> i32 {
    lanes_sum(block_products(low, high, q, at))
}

/// `block_sum` before its lanes are added: four i32 lanes whose sum is the block's.
#[inline(always)]
fn block_products(low: [v128; 2], high: [v128; 2], q: &[i16], at: usize) -> v128 {
    i32x4_add(pair_products(low, q, at), pair_products(high, q, at + 16))
}

/// The sums of the four lanes of each of `p[0..4]`, in one vector: `[p0_0 + p0_2, p1_0 + p1_2, p0_1 + p0_3, p1_1 +
/// p1_3]` and the same of p2 and p3, then their halves added (integers, so in any order the same).
#[inline(always)]
fn four_sums(p: [v128; 4]) -> v128 {
    let a = i32x4_add(i32x4_shuffle::<0, 4, 1, 5>(p[0], p[1]), i32x4_shuffle::<2, 6, 3, 7>(p[0], p[1]));
    let c = i32x4_add(i32x4_shuffle::<0, 4, 1, 5>(p[2], p[3]), i32x4_shuffle::<2, 6, 3, 7>(p[2], p[3]));
    i32x4_add(i32x4_shuffle::<0, 1, 4, 5>(a, c), i32x4_shuffle::<2, 3, 6, 7>(a, c))
}

/// `acc += v[0]; acc += v[1]; ..`: four blocks' terms added one by one, as the twin adds them.
#[inline(always)]
fn add_in_order(acc: &mut f32, v: v128) {
    *acc += f32x4_extract_lane::<0>(v);
    *acc += f32x4_extract_lane::<1>(v);
    *acc += f32x4_extract_lane::<2>(v);
    *acc += f32x4_extract_lane::<3>(v);
}

/// The sum of a row's blocks (`B` bytes each) as `int8::portable_dot_row` adds them: one f32 term a block, in
/// order, from zero. `products(b, block)` gives block b's four lanes of integer products (`block_products`). Four
/// blocks at a time, their four sums come out of one transpose and `terms(b, blocks, sums)` scales them together,
/// each lane with the twin's operations; the last one to three blocks take `term(b, block, sum)`, the same
/// operations on one block. The blocks are fixed-size arrays: as slices, Q8_0's product ran at half the speed.
#[inline(always)]
fn fold_four_blocks<const B: usize>(
    bytes: &[u8],
    products: impl Fn(usize, &[u8; B]) -> v128,
    terms: impl Fn(usize, [&[u8; B]; 4], v128) -> v128,
    term: impl Fn(usize, &[u8; B], i32) -> f32,
) -> f32 {
    let mut acc = 0f32;
    let fours = bytes.chunks_exact(4 * B);
    let rest = fours.remainder();
    let mut b = 0;
    for four in fours {
        let w: [&[u8; B]; 4] = std::array::from_fn(|i| four[i * B..(i + 1) * B].try_into().unwrap());
        let p: [v128; 4] = std::array::from_fn(|i| products(b + i, w[i]));
        add_in_order(&mut acc, terms(b, w, four_sums(p)));
        b += 4;
    }
    for w in rest.chunks_exact(B) {
        let w: &[u8; B] = w.try_into().unwrap();
        acc += term(b, w, lanes_sum(products(b, w)));
        b += 1;
    }
    acc
}

/// Sixteen weights (two i16x8) times the rounded activations `q[at..at + 16]`, as four i32 lanes of sums of pairs.
#[inline(always)]
fn pair_products(w: [v128; 2], q: &[i16], at: usize) -> v128 {
    i32x4_add(i32x4_dot_i16x8(w[0], load8_i16(q, at)), i32x4_dot_i16x8(w[1], load8_i16(q, at + 8)))
}

/// The four i32 lanes of `v` added.
#[inline(always)]
fn lanes_sum(v: v128) -> i32 {
    let v = i32x4_add(v, i32x4_shuffle::<2, 3, 0, 1>(v, v));
    i32x4_extract_lane::<0>(i32x4_add(v, i32x4_shuffle::<1, 0, 3, 2>(v, v)))
}

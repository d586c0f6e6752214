//! `int8_rows::portable_rows` with AVX-512 VNNI, where the CPU has it (detected at run time: natively the project
//! builds for x86-64-v3, which stops at AVX2). Lane i of every register is activation row i. Per block, the
//! activations' `len / 4` registers of bytes are loaded once for `ROWS` weight rows; each weight row's four bytes
//! at a time are broadcast to every lane, and `vpdpbusd` adds their four products with each lane's four
//! activation bytes into that lane's i32 sum. Then each lane's sum is scaled into its f32 sum with the same
//! operations as the twin, in the same order (`int8_rows`' module comment), so the two agree bit for bit.

use std::arch::x86_64::*;

use super::int8_rows::{Lanes, Layout, Unpacked, LANES, ROWS};

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni")
}

/// `int8_rows::portable_rows`, bit for bit, where the CPU has AVX-512 VNNI (false otherwise: nothing written).
pub fn rows(w: &Unpacked, first: usize, x: &Lanes, layout: Layout, out: &mut [[f32; LANES]]) -> bool {
    if !available() {
        return false;
    }
    assert!(
        (first + out.len()) * w.k <= w.bytes.len()
            && (first + out.len()) * w.blocks <= w.scale.len().min(w.offset.len())
            && x.len == layout.len
            && w.blocks * layout.len == w.k
            && x.values.len() * 4 >= w.k
            && x.scale.len().min(x.scaled_sum.len()).min(x.sums.len()) >= w.blocks
    );
    // SAFETY: the CPU has AVX-512 F and VNNI (checked above); the reads stay inside the sizes asserted above.
    unsafe {
        match (layout.len, out.len()) {
            (32, ROWS) => block::<8, ROWS>(w, first, x, layout, out),
            (32, n) => (0..n).for_each(|r| block::<8, 1>(w, first + r, x, layout, &mut out[r..r + 1])),
            (16, ROWS) => block::<4, ROWS>(w, first, x, layout, out),
            (16, n) => (0..n).for_each(|r| block::<4, 1>(w, first + r, x, layout, &mut out[r..r + 1])),
            _ => unreachable!("blocks of 16 or 32 values"),
        }
    }
    true
}

/// `R` weight rows from `first`, blocks of `4 * G` values.
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn block<const G: usize, const R: usize>(
    w: &Unpacked,
    first: usize,
    x: &Lanes,
    layout: Layout,
    out: &mut [[f32; LANES]],
) {
    let (k, nb) = (w.k, w.blocks);
    let minus_bias = _mm512_set1_epi32(-layout.bias);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let xs: [__m512i; G] = std::array::from_fn(|g| _mm512_loadu_si512(x.values[b * G + g].as_ptr().cast()));
        let start = _mm512_mullo_epi32(minus_bias, _mm512_loadu_si512(x.sums[b].as_ptr().cast()));
        let dx = _mm512_loadu_ps(x.scale[b].as_ptr());
        let scaled_sum = _mm512_loadu_ps(x.scaled_sum[b].as_ptr());
        // The rows' sums interleaved, so that the dependent `vpdpbusd`s of a row (one per four bytes of a block) do not wait on each other
        // one by one (integer sums: any order gives the same values).
        let rows: [*const u8; R] = std::array::from_fn(|r| w.bytes.as_ptr().add((first + r) * k + b * 4 * G));
        let mut isum = [start; R];
        for (g, xg) in xs.iter().enumerate() {
            for r in 0..R {
                let four = _mm512_set1_epi32(std::ptr::read_unaligned(rows[r].add(4 * g).cast::<i32>()));
                isum[r] = _mm512_dpbusd_epi32(isum[r], four, *xg);
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let at = (first + r) * nb + b;
            let scale = _mm512_mul_ps(_mm512_set1_ps(*w.scale.get_unchecked(at)), dx);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), scale, *acc);
            if layout.offset {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*w.offset.get_unchecked(at)), scaled_sum, *acc);
            }
        }
    }
    for (out, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }
}

/// `int8_rows::portable_rows` for Q8_0 read straight from its `blocks` (`out.len()` rows of 34-byte blocks, whose
/// `Q8Terms` are `scale` and `minus_128_sum`), bit for bit: each block's values are broadcast from where they lie as
/// the signed operand, against the activations offset by 128 as the unsigned one; the integer sum then equals the
/// twin's, and the f32 operations are the same. Call only where `available()`.
pub fn q8_0_rows(blocks: &[u8], scale: &[f32], minus_128_sum: &[i32], x: &Lanes, out: &mut [[f32; LANES]]) {
    let nb = scale.len() / out.len().max(1);
    assert!(
        available()
            && blocks.len() == out.len() * nb * 34
            && minus_128_sum.len() == scale.len()
            && scale.len() == out.len() * nb
            && x.len == 32
            && x.offset_values.len() >= nb * 8
            && x.scale.len() >= nb
    );
    // SAFETY: the CPU has AVX-512 F and VNNI, and the reads stay inside the sizes asserted above.
    unsafe {
        match out.len() {
            ROWS => q8_0_block::<ROWS>(blocks, scale, minus_128_sum, nb, x, out),
            n => (0..n).for_each(|r| {
                let (b, t) = (r * nb * 34..(r + 1) * nb * 34, r * nb..(r + 1) * nb);
                q8_0_block::<1>(&blocks[b], &scale[t.clone()], &minus_128_sum[t], nb, x, &mut out[r..r + 1])
            }),
        }
    }
}

#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn q8_0_block<const R: usize>(
    blocks: &[u8],
    scale: &[f32],
    minus_128_sum: &[i32],
    nb: usize,
    x: &Lanes,
    out: &mut [[f32; LANES]],
) {
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let xs: [__m512i; 8] = std::array::from_fn(|g| _mm512_loadu_si512(x.offset_values[b * 8 + g].as_ptr().cast()));
        let dx = _mm512_loadu_ps(x.scale[b].as_ptr());
        // Each row's block values start after its 2-byte scale.
        let rows: [*const u8; R] = std::array::from_fn(|r| blocks.as_ptr().add((r * nb + b) * 34 + 2));
        let mut isum: [__m512i; R] =
            std::array::from_fn(|r| _mm512_set1_epi32(*minus_128_sum.get_unchecked(r * nb + b)));
        for (g, xg) in xs.iter().enumerate() {
            for r in 0..R {
                let four = _mm512_set1_epi32(std::ptr::read_unaligned(rows[r].add(4 * g).cast::<i32>()));
                isum[r] = _mm512_dpbusd_epi32(isum[r], *xg, four);
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let scale = _mm512_mul_ps(_mm512_set1_ps(*scale.get_unchecked(r * nb + b)), dx);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), scale, *acc);
        }
    }
    for (out, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }
}

/// `int8_rows::portable_rows` for Q4_1 read straight from its `blocks` (`out.len()` rows of `nb` 20-byte blocks),
/// bit for bit. Q4_1's bias is 0, and a block's four bytes `4g..4g + 4` hold values `4g..4g + 4` in their low
/// nibbles and `16 + 4g..` in their high ones, so one broadcast and a mask give the operands of two `vpdpbusd`s,
/// against the activations' groups g and 4 + g; each block's scale and minimum are converted from its two f16s
/// where they lie. The integer sums are the twin's (any order gives the same i32), and the f32 operations the
/// same. Unpacking the nibbles to bytes and the scales to f32 first took a sixth of a batched SmolLM2 step's
/// products (`batch_speed`, 16 rows: 87 GMAC/s then, 100 now). Call only where `available()`.
pub fn q4_1_rows(blocks: &[u8], nb: usize, x: &Lanes, out: &mut [[f32; LANES]]) {
    assert!(
        available()
            && std::is_x86_feature_detected!("f16c")
            && blocks.len() == out.len() * nb * 20
            && x.len == 32
            && x.values.len() >= nb * 8
            && x.scale.len().min(x.scaled_sum.len()) >= nb
    );
    // SAFETY: the CPU has AVX-512 F, VNNI and F16C, and the reads stay inside the sizes asserted above.
    unsafe {
        match out.len() {
            ROWS => q4_1_block::<ROWS>(blocks, nb, x, out),
            n => {
                (0..n).for_each(|r| q4_1_block::<1>(&blocks[r * nb * 20..(r + 1) * nb * 20], nb, x, &mut out[r..r + 1]))
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512vnni,f16c")]
unsafe fn q4_1_block<const R: usize>(blocks: &[u8], nb: usize, x: &Lanes, out: &mut [[f32; LANES]]) {
    let nibble = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let xs: [__m512i; 8] = std::array::from_fn(|g| _mm512_loadu_si512(x.values[b * 8 + g].as_ptr().cast()));
        let dx = _mm512_loadu_ps(x.scale[b].as_ptr());
        let scaled_sum = _mm512_loadu_ps(x.scaled_sum[b].as_ptr());
        // Each row's 16 bytes of nibbles start after its two f16s.
        let rows: [*const u8; R] = std::array::from_fn(|r| blocks.as_ptr().add((r * nb + b) * 20 + 4));
        // Low and high nibbles in sums of their own, so that no `vpdpbusd` waits on the one before it. The high
        // nibbles are multiplied where they lie, as 16 times their value (a product of at most 240 * 128 fits the
        // instruction's 16-bit intermediates, and a block's sum 491,520), and their sum divided by 16 at the end.
        let mut low = [_mm512_setzero_si512(); R];
        let mut high = [_mm512_setzero_si512(); R];
        for g in 0..4 {
            for r in 0..R {
                let four = _mm512_set1_epi32(std::ptr::read_unaligned(rows[r].add(4 * g).cast::<i32>()));
                low[r] = _mm512_dpbusd_epi32(low[r], _mm512_and_si512(four, nibble), xs[g]);
                high[r] = _mm512_dpbusd_epi32(high[r], _mm512_andnot_si512(nibble, four), xs[4 + g]);
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let isum = _mm512_add_epi32(low[r], _mm512_srai_epi32::<4>(high[r]));
            // The block's scale and minimum, its first two f16s, converted together: `avx2::f16_pair`'s conversion,
            // read through the row's pointer, as the checked slice it takes cost this kernel 7% (99 GMAC/s
            // against 107 in `batch_speed`).
            let pair = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(rows[r].sub(4).cast::<i32>())));
            let scale = _mm512_mul_ps(_mm512_broadcastss_ps(pair), dx);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
            *acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(_mm_movehdup_ps(pair)), scaled_sum, *acc);
        }
    }
    for (out, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }
}

/// Writes each lane's `ROWS` values, `out[0][i], .., out[ROWS - 1][i]`, to `dst[i * stride..]` for the sixteen
/// lanes i: a 4 x 16 transpose in eight shuffles and sixteen 128-bit stores, where lane by lane the values took
/// four scalar loads each. Call only where `available()`.
pub fn write_lanes(out: &[[f32; LANES]; ROWS], dst: &mut [f32], stride: usize) {
    assert!(available() && stride >= ROWS && dst.len() >= (LANES - 1) * stride + ROWS);
    // SAFETY: the CPU has AVX-512 F; each store writes `ROWS` values at `i * stride`, inside `dst` (asserted).
    unsafe { transposed_lanes(out, dst, stride) }
}

#[target_feature(enable = "avx512f")]
unsafe fn transposed_lanes(out: &[[f32; LANES]; ROWS], dst: &mut [f32], stride: usize) {
    let r = out.map(|row| _mm512_loadu_ps(row.as_ptr()));
    // Per 128-bit quarter k: rows 0 and 1 interleaved, lanes 4k, 4k + 1 (low) and 4k + 2, 4k + 3 (high); the same
    // for rows 2 and 3.
    let (a_lo, a_hi) = (_mm512_unpacklo_ps(r[0], r[1]), _mm512_unpackhi_ps(r[0], r[1]));
    let (b_lo, b_hi) = (_mm512_unpacklo_ps(r[2], r[3]), _mm512_unpackhi_ps(r[2], r[3]));
    let pairs = |a: __m512, b: __m512, high: bool| {
        let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
        _mm512_castpd_ps(if high { _mm512_unpackhi_pd(a, b) } else { _mm512_unpacklo_pd(a, b) })
    };
    // Quarter k of `lanes[j]` holds lane 4k + j's four values.
    let lanes = [pairs(a_lo, b_lo, false), pairs(a_lo, b_lo, true), pairs(a_hi, b_hi, false), pairs(a_hi, b_hi, true)];
    let base = dst.as_mut_ptr();
    let at = |i: usize| base.add(i * stride);
    for (j, v) in lanes.into_iter().enumerate() {
        _mm_storeu_ps(at(j), _mm512_extractf32x4_ps::<0>(v));
        _mm_storeu_ps(at(4 + j), _mm512_extractf32x4_ps::<1>(v));
        _mm_storeu_ps(at(8 + j), _mm512_extractf32x4_ps::<2>(v));
        _mm_storeu_ps(at(12 + j), _mm512_extractf32x4_ps::<3>(v));
    }
}

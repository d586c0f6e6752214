//! The exact-rows product's inner loop (batched decoding) with AVX-512, where the CPU has it (detected at run
//! time: natively the project builds for x86-64-v3, which stops at AVX2). `dot`'s sixteen lanes are one 512-bit
//! register here, so a block of six activation rows against four weight rows keeps its 24 sums in registers and
//! reads each chunk of the ten rows once: the AVX2 `dot4` reads an activation row's chunk once per four weight
//! rows, and its loads, not its multiply-adds, bounded it. Every lane is the same fused multiply-add in the same
//! order as `avx2::lanes16`'s, and the lanes are summed by the same `finish`, so each value is `dot`'s bit for bit.

use std::arch::x86_64::*;

use super::avx2::finish;

/// Activation rows per block: 6 x 4 sums, 4 weight chunks and 1 activation chunk fill 29 of the 32 registers.
pub const ROWS: usize = 6;

/// Whether this CPU runs the kernels below.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// `out[i][r] = dot(x[i], w[r])` for up to `ROWS` activation rows, bit for bit. Call only where `available()`.
pub fn dot_block(x: &[&[f32]], w: [&[f32]; 4], out: &mut [[f32; 4]]) {
    assert!(available() && x.len() <= ROWS && out.len() == x.len());
    // SAFETY: the CPU has AVX-512 F (asserted), and `lanes16` checks the lengths it reads.
    unsafe {
        match x.len() {
            6 => finish_block(block::<6>(x.try_into().unwrap(), w), x, w, out),
            5 => finish_block(block::<5>(x.try_into().unwrap(), w), x, w, out),
            4 => finish_block(block::<4>(x.try_into().unwrap(), w), x, w, out),
            3 => finish_block(block::<3>(x.try_into().unwrap(), w), x, w, out),
            2 => finish_block(block::<2>(x.try_into().unwrap(), w), x, w, out),
            1 => finish_block(block::<1>(x.try_into().unwrap(), w), x, w, out),
            _ => {}
        }
    }
}

/// The lanes of each (activation row, weight row) pair over the whole chunks of sixteen.
#[target_feature(enable = "avx512f")]
unsafe fn block<const X: usize>(x: [&[f32]; X], w: [&[f32]; 4]) -> [[__m512; 4]; X] {
    let mut acc = [[_mm512_setzero_ps(); 4]; X];
    let chunks = x[0].len() / 16;
    // Once per call, not per chunk: every row holds the whole chunks.
    assert!(x.iter().chain(&w).all(|row| row.len() >= 16 * chunks), "dot products of unequal lengths");
    for c in 0..chunks {
        let wc = w.map(|row| _mm512_loadu_ps(row.as_ptr().add(16 * c)));
        for i in 0..X {
            let xc = _mm512_loadu_ps(x[i].as_ptr().add(16 * c));
            for r in 0..4 {
                acc[i][r] = _mm512_fmadd_ps(xc, wc[r], acc[i][r]);
            }
        }
    }
    acc
}

/// Lanes 0-7 and 8-15 of each sum, handed to AVX2's `finish` (the tree and the tail).
#[target_feature(enable = "avx512f")]
unsafe fn finish_block<const X: usize>(acc: [[__m512; 4]; X], x: &[&[f32]], w: [&[f32]; 4], out: &mut [[f32; 4]]) {
    for i in 0..X {
        for r in 0..4 {
            let lo = _mm512_castps512_ps256(acc[i][r]);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[i][r])));
            out[i][r] = finish(x[i], w[r], lo, hi);
        }
    }
}

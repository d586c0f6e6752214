//! Dot products of f32 rows: the exact products' inner loops (`dot`, four weight rows at a time in `dot4`, and a
//! block of activation rows in `dot4_each`) and attention's scores (`dots_rows`). Each sums sixteen lanes and adds
//! them as a tree, in one order on every path (AVX2 and AVX-512 natively, the portable twins elsewhere), so that a
//! value never depends on which path or which group of rows computed it.

use super::CacheValue;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
use super::{avx2, avx512};

/// f32 dot product with 16 independent partial sums: the AVX2 kernel where the target has it, else the portable
/// code, which the compiler turns into SIMD (wasm simd128).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return avx2::dot(a, b);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    portable_dot(a, b)
}

/// `dot` in portable Rust.
pub fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (ac, bc) = (&a[c * LANES..(c + 1) * LANES], &b[c * LANES..(c + 1) * LANES]);
        for l in 0..LANES {
            acc[l] += ac[l] * bc[l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i];
    }
    sum16(acc) + tail
}

/// The sixteen lanes of a dot product summed as a tree: lane i plus lane i + 8, then plus i + 4, i + 2 and i + 1,
/// the order the AVX2 kernels' register halvings give.
fn sum16(mut lanes: [f32; 16]) -> f32 {
    for width in [8, 4, 2, 1] {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0]
}

/// `dot(a, b)` for four `b`s at once, each with exactly `dot`'s arithmetic (the same lanes in the same order), so
/// that a row's result does not depend on whether it came in a group of four.
pub fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return avx2::dot4(a, b);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    portable_dot4(a, b)
}

/// `put(i, dot4(x_i, w))` for every row `x_i` of `x` (rows of `k`): the exact-rows product's inner loop. With
/// AVX-512 (detected at run time), six activation rows at a time, each value still `dot`'s bit for bit.
pub(super) fn dot4_each(x: &[f32], k: usize, w: [&[f32]; 4], mut put: impl FnMut(usize, [f32; 4])) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if avx512::available() {
        let m = x.len() / k;
        let mut values = [[0f32; 4]; avx512::ROWS];
        for first in (0..m).step_by(avx512::ROWS) {
            let n = avx512::ROWS.min(m - first);
            let rows: [&[f32]; avx512::ROWS] = std::array::from_fn(|j| {
                let i = first + j.min(n - 1);
                &x[i * k..(i + 1) * k]
            });
            avx512::dot_block(&rows[..n], w, &mut values[..n]);
            for (j, v) in values[..n].iter().enumerate() {
                put(first + j, *v);
            }
        }
        return;
    }
    for (i, xi) in x.chunks_exact(k).enumerate() {
        put(i, dot4(xi, w));
    }
}

/// `dot(x_i, key(j))` for every row `x_i` of `x` (rows of `k` values) and every j in `keys`, each value `dot`'s bit
/// for bit, into `out` (row i's at `i * keys.len() + j - keys.start`): a decoding step's attention scores, the query
/// heads that share a key-value head against its keys. With AVX-512 (detected at run time) and rows of a multiple
/// of sixteen values, up to four rows against as many keys as make at most sixteen pairs (one row and 16 keys, two
/// and 8, three and 5, four and 4), their lanes summed together, and the keys left over one at a time with all the
/// rows (`avx512::dots`); else four keys at a time (`dot4`). The keys may be f16 (an f16 cache): each value is then
/// `dot`'s of the key widened to f32.
pub fn dots_rows<'a, V: CacheValue>(
    x: &[f32],
    k: usize,
    keys: std::ops::Range<usize>,
    key: impl Fn(usize) -> &'a [V],
    out: &mut [f32],
) {
    let m = x.len() / k.max(1);
    let width = keys.len();
    assert!(out.len() >= m * width, "room for every score");
    let row = |i: usize| &x[i * k..(i + 1) * k];
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if avx512::available() && k.is_multiple_of(16) && k > 0 {
        for first in (0..m).step_by(4) {
            let n = 4.min(m - first);
            let (rows, set) = (first..first + n, keys.clone());
            match n {
                1 => avx512::dots::<1, 16, V>([row(first)], set, &key, out, rows),
                2 => avx512::dots::<2, 8, V>(std::array::from_fn(|i| row(first + i)), set, &key, out, rows),
                3 => avx512::dots::<3, 5, V>(std::array::from_fn(|i| row(first + i)), set, &key, out, rows),
                _ => avx512::dots::<4, 4, V>(std::array::from_fn(|i| row(first + i)), set, &key, out, rows),
            }
        }
        return;
    }
    let whole = keys.start + width / 4 * 4;
    let mut four_keys: [Vec<f32>; 4] = Default::default();
    let mut scratch = Vec::new();
    for i in 0..m {
        let out = &mut out[i * width..(i + 1) * width];
        for j in (keys.start..whole).step_by(4) {
            let [a, b, c, d] = &mut four_keys;
            let keys4 = [(a, j), (b, j + 1), (c, j + 2), (d, j + 3)].map(|(s, j)| V::as_f32(key(j), s));
            let at = j - keys.start;
            out[at..at + 4].copy_from_slice(&dot4(row(i), keys4));
        }
        for j in whole..keys.end {
            out[j - keys.start] = dot(row(i), V::as_f32(key(j), &mut scratch));
        }
    }
}

/// `dot4` in portable Rust (the compiler left it scalar natively, hence the AVX2 kernel).
pub fn portable_dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    const LANES: usize = 16;
    let mut acc = [[0f32; LANES]; 4];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let ac: &[f32; LANES] = a[c * LANES..(c + 1) * LANES].try_into().unwrap();
        for (acc, b) in acc.iter_mut().zip(&b) {
            let bc: &[f32; LANES] = b[c * LANES..(c + 1) * LANES].try_into().unwrap();
            for l in 0..LANES {
                acc[l] += ac[l] * bc[l];
            }
        }
    }
    let mut out = [0f32; 4];
    for (r, b) in b.iter().enumerate() {
        let mut tail = 0f32;
        for i in chunks * LANES..a.len() {
            tail += a[i] * b[i];
        }
        out[r] = sum16(acc[r]) + tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dots_rows` gives every (row, key) pair `dot`'s value bit for bit: 1 to 6 rows (sixteen pairs at a time in
    /// each shape where the CPU has AVX-512, and the rows of a fifth or sixth set), keys from an offset with a
    /// remainder; rows of 64 and 256 values, and of 72 (the four-key form). With f16 keys (an f16 cache), each
    /// value is `dot`'s of the key widened to f32.
    #[test]
    fn dots_rows_is_dot_for_every_pair() {
        for k in [64, 72, 256] {
            let keys: Vec<Vec<f32>> = (0..41)
                .map(|j| (0..k).map(|d| ((j * 7919 + d * 104729) % 1999) as f32 / 999.5 - 1.0).collect())
                .collect();
            let halves: Vec<Vec<half::f16>> =
                keys.iter().map(|row| row.iter().map(|&v| half::f16::from_f32(v * 10.0)).collect()).collect();
            let widened: Vec<Vec<f32>> = halves.iter().map(|row| row.iter().map(|h| h.to_f32()).collect()).collect();
            for m in 1..=6 {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 113) as f32 - 56.0) * 0.0137).collect();
                check_dots_rows(&x, k, &keys, &keys, &format!("k {k}, {m} rows"));
                check_dots_rows(&x, k, &halves, &widened, &format!("k {k}, {m} rows, f16 keys"));
            }
        }
    }

    /// `dots_rows(x, k, 3..keys.len(), ..)` against `dot` with `reference` (the keys as f32): each pair's value bit
    /// for bit in its place, and nothing written past the rows (sentinels).
    fn check_dots_rows<V: CacheValue>(x: &[f32], k: usize, keys: &[Vec<V>], reference: &[Vec<f32>], what: &str) {
        let (m, width) = (x.len() / k, keys.len() - 3);
        let sentinel = f32::from_bits(0x7fc0_1234);
        let mut out = vec![sentinel; m * width + 5];
        dots_rows(x, k, 3..keys.len(), |j| &keys[j], &mut out);
        for i in 0..m {
            for j in 3..keys.len() {
                let want = dot(&x[i * k..(i + 1) * k], &reference[j]);
                assert_eq!(out[i * width + j - 3].to_bits(), want.to_bits(), "{what}: {i}, {j}");
            }
        }
        assert!(out[m * width..].iter().all(|v| v.to_bits() == sentinel.to_bits()), "{what}: past the rows");
    }

    #[test]
    fn dot4_is_dot_four_times_bit_for_bit() {
        let a: Vec<f32> = (0..101).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37).collect();
        let bs: Vec<Vec<f32>> =
            (0..4).map(|r| (0..101).map(|i| ((i * 13 + r * 7) % 19) as f32 * 0.11 - 1.0).collect()).collect();
        let four = dot4(&a, [&bs[0], &bs[1], &bs[2], &bs[3]]);
        let portable = portable_dot4(&a, [&bs[0], &bs[1], &bs[2], &bs[3]]);
        for r in 0..4 {
            assert_eq!(four[r].to_bits(), dot(&a, &bs[r]).to_bits(), "row {r}");
            assert_eq!(portable[r].to_bits(), portable_dot(&a, &bs[r]).to_bits(), "portable row {r}");
            // Either operand first: the exact-rows product dots activations against weights in groups.
            assert_eq!(dot(&bs[r], &a).to_bits(), dot(&a, &bs[r]).to_bits(), "row {r} commuted");
            assert_eq!(portable_dot(&bs[r], &a).to_bits(), portable_dot(&a, &bs[r]).to_bits(), "row {r} commuted");
            let exact: f64 = a.iter().zip(&bs[r]).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((four[r] as f64 - exact).abs() < 1e-4 && (portable[r] as f64 - exact).abs() < 1e-4, "row {r}");
        }
    }

    /// The exact-rows inner loop (in blocks of six activation rows where the CPU has AVX-512) gives `dot4`'s
    /// values bit for bit, for a row count that leaves a partial block, and lengths with a tail past the lanes
    /// (each sum finished alone) and without one (sixteen sums finished at a time).
    #[test]
    fn dot4_each_is_dot4_bit_for_bit() {
        for (m, k) in [(13, 101), (17, 64)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37).collect();
            let ws: Vec<Vec<f32>> =
                (0..4).map(|r| (0..k).map(|i| ((i * 13 + r * 7) % 19) as f32 * 0.11 - 1.0).collect()).collect();
            let w = [&ws[0][..], &ws[1], &ws[2], &ws[3]];
            let mut seen = vec![false; m];
            dot4_each(&x, k, w, |i, values| {
                let want = dot4(&x[i * k..(i + 1) * k], w);
                assert_eq!(values.map(f32::to_bits), want.map(f32::to_bits), "row {i} of {k}");
                seen[i] = true;
            });
            assert!(seen.iter().all(|&s| s), "every row once");
        }
    }

    #[test]
    fn dot_sums_its_lanes_as_a_tree_on_every_path() {
        // Products equal to b (a is all ones), so only the order of the lane sums matters. By hand, the tree
        // (lane i + lane i + 8, then i + 4, i + 2, i + 1): 1e8 - 1e8 = 0 and seven 1 + 1 = 2, then 2, 4, 4, 4, then
        // 6, 8, then 14. In lane order, each 1 added to 1e8 is lost to rounding and the sum is 7.
        let mut b = [1f32; 16];
        (b[0], b[8]) = (1e8, -1e8);
        let a = [1f32; 16];
        assert_eq!(sum16(b), 14.0);
        assert_eq!(dot(&a, &b), 14.0);
        assert_eq!(portable_dot(&a, &b), 14.0);
        assert_eq!(dot4(&a, [&b; 4]), [14.0; 4]);
        assert_eq!(portable_dot4(&a, [&b; 4]), [14.0; 4]);
    }

    #[test]
    fn dot_handles_lengths_that_are_not_a_multiple_of_the_lanes() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let b = vec![2.0f32; 37];
        assert_eq!(dot(&a, &b), (0..37).map(|i| 2.0 * i as f32).sum::<f32>());
    }
}

//! The MLP's activations on the CPU, written so the compiler vectorizes them: candle's `gelu` and `silu` call the
//! C library's `tanhf` and `expf` once per value, which took a tenth of Gemma's prompt processing. Both are written
//! here with one exponential of our own (range reduction to `2^n * e^r`, then a polynomial), and the tests hold
//! them to the f64 formulas. The attention's softmax on the CPU (`cpu::softmax_rows`) uses the same `exp`.

/// `e^x` for f32, within a few ulp of the exact value over the range the activations use; inputs below -87.3 or
/// above 88.3 are clamped there (their results underflow to about 1e-38 or stay below f32's largest value).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds x log2(e) to an integer (ties to even) held in the low bits of the sum.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + SHIFT;
    let n = shifted - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r for |r| <= ln 2 / 2: Taylor to degree 7 (the remainder is below 1e-8 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from the sum's bits, n + 127 in the exponent field: integer arithmetic that vectorizes. (`n as i32`
    // saturates and maps NaN to 0, which the compiler did value by value, a third of the time SmolLM2's gating
    // took in a batched step.) A NaN x gives NaN through p whatever these bits are.
    let two_to_n = f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    two_to_n * p
}

/// GELU, tanh form (Gemma): `0.5 x (1 + tanh(u))` with `u = sqrt(2 / pi) (x + 0.044715 x^3)`, computed as
/// `x / (1 + e^(-2u))`, the same function.
pub fn gelu_tanh(values: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if crate::quant::avx512::available() {
        // SAFETY: the CPU has AVX-512 F (checked just above).
        return unsafe { wide::gelu_tanh(values) };
    }
    gelu_tanh_here(values)
}

/// SiLU (Llama): `x / (1 + e^(-x))`.
pub fn silu(values: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if crate::quant::avx512::available() {
        // SAFETY: as in `gelu_tanh`.
        return unsafe { wide::silu(values) };
    }
    silu_here(values)
}

#[inline(always)]
fn gelu_tanh_here(values: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for v in values.iter_mut() {
        let x = *v;
        let u = SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x);
        *v = x / (1.0 + exp(-2.0 * u));
    }
}

#[inline(always)]
fn silu_here(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v /= 1.0 + exp(-*v);
    }
}

/// The activations compiled again for AVX-512, where the CPU has it (natively the project builds for x86-64-v3,
/// which stops at AVX2; the same condition as `quant::avx512`'s): the same operations on sixteen values at a time
/// instead of eight. Each value goes through the same IEEE operations in the same order (Rust fuses no multiply and
/// add by itself), so it is the same bit for bit in either build. A batched SmolLM2 `--int8` step is about 0.6%
/// shorter so (alternated runs, docs/benchmarks.md).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod wide {
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_tanh(values: &mut [f32]) {
        super::gelu_tanh_here(values)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu(values: &mut [f32]) {
        super::silu_here(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 1/64 from -20 to 20, and some far out.
    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (-1280..=1280).map(|i| i as f32 / 64.0).collect();
        xs.extend([-100.0, -87.0, -60.0, 60.0, 87.0, 100.0, 1e-30, -1e-30, 0.0]);
        xs
    }

    /// The AVX-512 build gives every value bit for bit as the other (an odd count, so the loops' ends run too).
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    #[test]
    fn the_avx512_build_gives_the_same_bits() {
        if !crate::quant::avx512::available() {
            return;
        }
        let xs: Vec<f32> =
            inputs().into_iter().chain([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.5, -2.25]).collect();
        assert_eq!(xs.len() % 2, 1);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (mut wide_gelu, mut gelu) = (xs.clone(), xs.clone());
        // SAFETY: the CPU has AVX-512 F (checked above).
        unsafe { wide::gelu_tanh(&mut wide_gelu) };
        gelu_tanh_here(&mut gelu);
        assert_eq!(bits(&wide_gelu), bits(&gelu));
        let (mut wide_silu, mut silu) = (xs.clone(), xs);
        // SAFETY: as above.
        unsafe { wide::silu(&mut wide_silu) };
        silu_here(&mut silu);
        assert_eq!(bits(&wide_silu), bits(&silu));
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        for x in (-8700..=8830).map(|i| i as f32 / 100.0) {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 4.0 * f32::EPSILON as f64 * want, "exp({x}) = {got}, not {want}");
        }
    }

    #[test]
    fn activations_match_their_formulas_in_f64() {
        let xs = inputs();
        let (mut g, mut s) = (xs.clone(), xs.clone());
        gelu_tanh(&mut g);
        silu(&mut s);
        for (i, &x) in xs.iter().enumerate() {
            let x64 = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            // 0.5 x (1 + tanh u), written as x / (1 + e^(-2u)): in the tanh form even f64 cancels to zero for
            // x below about -9, where the value is still ~1e-30.
            let gelu = x64 / (1.0 + (-2.0 * u).exp());
            if x64.abs() < 5.0 {
                assert!((gelu - 0.5 * x64 * (1.0 + u.tanh())).abs() < 1e-12, "the two forms at {x}");
            }
            let silu = x64 / (1.0 + (-x64).exp());
            // Relative to the value, within a few roundings of the argument's own: e^-2u carries u's rounding in
            // f32 times |2u| (up to 70 in the far tail). Where the value vanishes, within 1e-36 (the clamped
            // exponential leaves GELU at about -1e-37 far below -10, where the exact value is -1e-30 and less).
            let eps = f32::EPSILON as f64;
            let close = |got: f32, want: f64, exponent: f64| {
                (got as f64 - want).abs() <= (4.0 * eps * (1.0 + exponent.abs()) * want.abs()).max(1e-36)
            };
            assert!(close(g[i], gelu, 2.0 * u), "gelu({x}) = {}, not {gelu}", g[i]);
            assert!(close(s[i], silu, x64), "silu({x}) = {}, not {silu}", s[i]);
        }
        // By hand: both are zero at zero, and x for large x.
        assert_eq!((g[xs.len() - 1], s[xs.len() - 1]), (0.0, 0.0));
    }
}

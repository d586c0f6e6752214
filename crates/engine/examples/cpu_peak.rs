//! The ceilings the batched kernels run against, on one thread: how many 512-bit f32 multiply-adds (`vfmadd`) and
//! 8-bit dot products (`vpdpbusd`, 64 multiply-adds each) the CPU issues a second from registers alone, each on its
//! own and the two interleaved: `cargo run --release -p saif-engine --example cpu_peak`. Where the interleaved pairs
//! run at half the rate of either alone, the two share their pipes, and a kernel's float epilogue (the scales'
//! multiply-adds) takes its time from its integer products. docs/benchmarks.md records its figures (stop 51). x86-64
//! with AVX-512 F and VNNI only; elsewhere it says so.

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// Independent chains, enough to cover the instructions' latency.
    pub const CHAINS: usize = 12;

    /// `n` rounds of `CHAINS` multiply-adds.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(n: usize) -> f32 {
        let (x, y) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999_9));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..n {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        _mm512_reduce_add_ps(acc.into_iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, a)))
    }

    /// `n` rounds of `CHAINS` 8-bit dot products.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dpbusd(n: usize) -> i32 {
        let (u, s) = (_mm512_set1_epi8(3), _mm512_set1_epi8(-2));
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..n {
            for a in &mut acc {
                *a = _mm512_dpbusd_epi32(*a, u, s);
            }
        }
        _mm512_reduce_add_epi32(acc.into_iter().fold(_mm512_setzero_si512(), |t, a| _mm512_add_epi32(t, a)))
    }

    /// `n` rounds of `CHAINS / 2` pairs: a multiply-add and a dot product.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn both(n: usize) -> (f32, i32) {
        let (x, y) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999_9));
        let (u, s) = (_mm512_set1_epi8(3), _mm512_set1_epi8(-2));
        let mut floats = [_mm512_setzero_ps(); CHAINS / 2];
        let mut ints = [_mm512_setzero_si512(); CHAINS / 2];
        for _ in 0..n {
            for (f, i) in floats.iter_mut().zip(&mut ints) {
                *f = _mm512_fmadd_ps(*f, x, y);
                *i = _mm512_dpbusd_epi32(*i, u, s);
            }
        }
        let f = floats.into_iter().fold(_mm512_setzero_ps(), |t, a| _mm512_add_ps(t, a));
        let i = ints.into_iter().fold(_mm512_setzero_si512(), |t, a| _mm512_add_epi32(t, a));
        (_mm512_reduce_add_ps(f), _mm512_reduce_add_epi32(i))
    }
}

/// Seconds of the fastest of three runs of `run(n)`: `n` passes through `black_box` after the clock starts, so
/// that the compiler cannot move the run (which touches no memory) out of the timed stretch.
fn best_of_three<T>(n: usize, mut run: impl FnMut(usize) -> T) -> f64 {
    (0..3)
        .map(|_| {
            let started = std::time::Instant::now();
            std::hint::black_box(run(std::hint::black_box(n)));
            started.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
        let n = 20_000_000;
        let instructions = (n * peak::CHAINS) as f64;
        // SAFETY: the CPU has AVX-512 F and VNNI (checked above); the kernels touch registers only.
        let fma = instructions / best_of_three(n, |n| unsafe { peak::fma(n) }) / 1e9;
        let dpbusd = instructions / best_of_three(n, |n| unsafe { peak::dpbusd(n) }) / 1e9;
        let both = instructions / best_of_three(n, |n| unsafe { peak::both(n) }) / 1e9;
        println!("vfmadd (512-bit f32): {fma:.2} G a second ({:.0} GFLOP/s)", fma * 32.0);
        println!(
            "vpdpbusd (512-bit, 64 8-bit multiply-adds): {dpbusd:.2} G a second ({:.0} G multiply-adds)",
            dpbusd * 64.0
        );
        let ratio = both / fma.max(dpbusd);
        // 1: one set of pipes runs both kinds; 2: each kind has pipes of its own.
        println!("the two interleaved: {both:.2} G instructions a second, {ratio:.2}x either alone");
        return;
    }
    println!("cpu_peak measures AVX-512 F and VNNI instructions, which this CPU lacks");
}

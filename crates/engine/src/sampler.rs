//! Choosing the next token from logits: greedy, or temperature with optional top-k and top-p, from a seed.
//!
//! The draw is stateless so that a GPU kernel can make the same one: at generation step `step`, every token `i`
//! gets Gumbel noise `g_i = -ln(-ln(u_i))` from a hash of (seed, step, i), and the pick is the kept token with the
//! largest `l_i / T + g_i` (the Gumbel-max trick: an exact draw from softmax(l / T) over the kept tokens). The
//! same seed gives the same tokens, on every backend and platform.
//!
//! Kept tokens: those at least as likely as the k-th most likely (top-k), then the most likely ones whose
//! probability mass first reaches p (top-p): every token whose logit is at least the largest threshold `t` with
//! mass(logit >= t) >= p.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Sampling {
    /// The highest logit; the lowest id among equals.
    Greedy,
    /// Sample from softmax(logits / temperature) over the kept tokens.
    Random { temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64 },
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if let Sampling::Random { temperature, top_k, top_p, .. } = *self {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(EngineError::InvalidRequest(format!(
                    "temperature must be a positive number (got {temperature}); use greedy decoding for 0"
                )));
            }
            if top_k == Some(0) {
                return Err(EngineError::InvalidRequest("top-k must be at least 1".into()));
            }
            if let Some(p) = top_p {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(EngineError::InvalidRequest(format!("top-p must be in (0, 1] (got {p})")));
                }
            }
        }
        Ok(())
    }
}

/// lowbias32 (Chris Wellons): a 32-bit integer hash with good avalanche, cheap in WGSL too.
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The uniform number in (0, 1) of token `index` at `step` for `seed` (24 bits of a hash, centred).
pub fn uniform(seed: u64, step: u32, index: u32) -> f32 {
    let h = mix32(mix32(mix32((seed as u32) ^ mix32((seed >> 32) as u32)) ^ step) ^ index);
    ((h >> 8) as f32 + 0.5) / 16_777_216.0
}

/// Gumbel noise of token `index` at `step`.
pub fn gumbel(seed: u64, step: u32, index: u32) -> f32 {
    -(-uniform(seed, step, index).ln()).ln()
}

/// The next token after `logits` at generation step `step` (0 for the first generated token).
pub fn pick(logits: &[f32], sampling: &Sampling, step: u32) -> u32 {
    match *sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Random { temperature, top_k, top_p, seed } => {
            let threshold = keep_threshold(logits, temperature, top_k, top_p);
            let mut best = (f32::NEG_INFINITY, 0u32);
            for (i, &l) in logits.iter().enumerate() {
                if l >= threshold {
                    let score = l / temperature + gumbel(seed, step, i as u32);
                    if score > best.0 {
                        best = (score, i as u32);
                    }
                }
            }
            best.1
        }
    }
}

/// The smallest logit a token may have to be kept by top-k and top-p (negative infinity keeps all).
pub fn keep_threshold(logits: &[f32], temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> f32 {
    if top_k.is_none() && top_p.is_none_or(|p| p >= 1.0) {
        return f32::NEG_INFINITY;
    }
    let candidates = top_candidates(logits, top_k);
    let mut threshold = candidates.last().map_or(f32::NEG_INFINITY, |c| c.1);
    if let Some(p) = top_p.filter(|&p| p < 1.0) {
        let max = candidates[0].1 as f64;
        let weights: Vec<f64> = candidates.iter().map(|c| ((c.1 as f64 - max) / temperature as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut mass = 0.0;
        for (c, w) in candidates.iter().zip(&weights) {
            mass += w / total;
            if mass >= p as f64 {
                threshold = c.1;
                break;
            }
        }
    }
    threshold
}

/// The index of the highest value; the first among equals; NaN never wins; 0 when no value is above negative
/// infinity. In two passes the compiler vectorizes: the highest value, kept lane by lane with the comparison of
/// the one-pass loop (`v > best`, false for NaN), then the first index that holds it. The one-pass loop, a branch
/// per value, took about a millisecond per batched step over Gemma's 262,144 logits per sequence.
pub fn argmax(values: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (best, &v) in lanes.iter_mut().zip(chunk) {
            *best = if v > *best { v } else { *best };
        }
    }
    let highest = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |best, &v| if v > best { v } else { best });
    if highest == f32::NEG_INFINITY {
        return 0;
    }
    values.iter().position(|&v| v == highest).expect("the highest value is one of them") as u32
}

/// (id, logit) of the `k` highest logits (all when `k` is `None`), highest first, lower id first among equals.
pub fn top_candidates(logits: &[f32], k: Option<usize>) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> =
        logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as u32, l)).collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if let Some(k) = k {
        if k < all.len() {
            all.select_nth_unstable_by(k, order);
            all.truncate(k);
        }
    }
    all.sort_by(order);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampling {
        Sampling::Random { temperature, top_k, top_p, seed }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
        assert_eq!(pick(&[0.0, 2.0, 1.0], &Sampling::Greedy, 9), 1);
    }

    /// The two-pass `argmax` is the one-pass loop's index on rows long enough for its lanes: ties (the first
    /// wins, wherever the lanes put them), NaN, infinities, signed zeros, and a maximum in the tail.
    #[test]
    fn argmax_is_the_one_pass_loop() {
        let one_pass = |values: &[f32]| {
            let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
            for (i, &v) in values.iter().enumerate() {
                if v > best_value {
                    (best, best_value) = (i, v);
                }
            }
            best as u32
        };
        let mut rows: Vec<Vec<f32>> = (0..40)
            .map(|r: u64| {
                (0..(37 + 13 * r as usize)).map(|i| ((i as u64 * 7919 + r * 31) % 23) as f32 - 11.0).collect()
            })
            .collect();
        rows.push(vec![f32::NAN; 40]);
        rows.push(vec![f32::NEG_INFINITY; 40]);
        rows.push(
            (0..40)
                .map(|i| {
                    if i == 3 {
                        f32::NAN
                    } else if i == 20 {
                        f32::INFINITY
                    } else {
                        1.0
                    }
                })
                .collect(),
        );
        rows.push((0..40).map(|i| if i % 2 == 0 { -0.0 } else { 0.0 }).collect());
        rows.push((0..35).map(|i| if i == 34 { 5.0 } else { i as f32 * 0.1 }).collect());
        rows.push((0..35).map(|i| if i == 0 { f32::NAN } else { f32::NEG_INFINITY }).collect());
        for row in &rows {
            assert_eq!(argmax(row), one_pass(row), "{row:?}");
        }
    }

    #[test]
    fn top_candidates_are_sorted_and_cut() {
        let c = top_candidates(&[0.1, 0.9, 0.5, 0.9, 0.3], Some(3));
        assert_eq!(c, vec![(1, 0.9), (3, 0.9), (2, 0.5)]);
    }

    #[test]
    fn uniforms_are_uniform_and_depend_on_every_input() {
        let n = 20_000;
        let mean = (0..n).map(|i| uniform(1, 0, i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert!((0..n).all(|i| {
            let u = uniform(1, 0, i);
            u > 0.0 && u < 1.0
        }));
        assert_ne!(uniform(1, 0, 5), uniform(2, 0, 5));
        assert_ne!(uniform(1, 0, 5), uniform(1, 1, 5));
        assert_ne!(uniform(1 << 40, 0, 5), uniform(0, 0, 5));
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| (0..64).map(|step| pick(&logits, &random(1.5, None, None, seed), step)).collect::<Vec<_>>();
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        assert!((0..20).all(|s| pick(&logits, &random(1.0, Some(1), None, 1), s) == 1));
        // Ids 1 and 2 hold almost all the mass: top-p 0.9 never picks 0 or 3.
        let picks: Vec<u32> = (0..200).map(|s| pick(&logits, &random(1.0, None, Some(0.9), 3), s)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
        assert_eq!(keep_threshold(&logits, 1.0, Some(2), None), 4.9);
        assert_eq!(keep_threshold(&logits, 1.0, None, Some(0.5)), 5.0);
        assert_eq!(keep_threshold(&logits, 1.0, None, None), f32::NEG_INFINITY);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.2 / 0.8 at temperature 1, and 1/3 / 2/3 at temperature 2.
        let logits = [0.0, (4.0f32).ln()];
        let share = |t: f32| {
            (0..20_000).filter(|&s| pick(&logits, &random(t, None, None, 11), s) == 1).count() as f64 / 20_000.0
        };
        assert!((share(1.0) - 0.8).abs() < 0.015, "{}", share(1.0));
        assert!((share(2.0) - 2.0 / 3.0).abs() < 0.015, "{}", share(2.0));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(random(0.0, None, None, 0).validate().is_err());
        assert!(random(1.0, Some(0), None, 0).validate().is_err());
        assert!(random(1.0, None, Some(1.5), 0).validate().is_err());
        assert!(random(0.7, Some(40), Some(0.9), 0).validate().is_ok());
    }
}

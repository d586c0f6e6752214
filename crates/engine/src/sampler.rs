//! Choosing the next token from logits: greedy, or temperature with optional top-k and top-p, from a seeded
//! generator so that the same seed gives the same tokens on every platform.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Sampling {
    /// The highest logit; the lowest id among equals.
    Greedy,
    /// Sample from softmax(logits / temperature), restricted to the `top_k` highest and then to the smallest set
    /// whose probability reaches `top_p`.
    Random {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    },
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if let Sampling::Random {
            temperature,
            top_k,
            top_p,
            ..
        } = *self
        {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(EngineError::InvalidRequest(format!(
                    "temperature must be a positive number (got {temperature}); use greedy decoding for 0"
                )));
            }
            if top_k == Some(0) {
                return Err(EngineError::InvalidRequest(
                    "top-k must be at least 1".into(),
                ));
            }
            if let Some(p) = top_p {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(EngineError::InvalidRequest(format!(
                        "top-p must be in (0, 1] (got {p})"
                    )));
                }
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Result<Self> {
        sampling.validate()?;
        let seed = match sampling {
            Sampling::Random { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Ok(Self {
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Random {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                let candidates = top_candidates(logits, top_k);
                let max = candidates.first().map_or(0.0, |&(_, l)| l as f64);
                let mut probs: Vec<(u32, f64)> = candidates
                    .iter()
                    .map(|&(i, l)| (i, ((l as f64 - max) / temperature as f64).exp()))
                    .collect();
                let total: f64 = probs.iter().map(|p| p.1).sum();
                if let Some(p) = top_p {
                    let mut cumulative = 0.0;
                    let mut keep = probs.len();
                    for (n, &(_, w)) in probs.iter().enumerate() {
                        cumulative += w / total;
                        if cumulative >= p as f64 {
                            keep = n + 1;
                            break;
                        }
                    }
                    probs.truncate(keep);
                }
                let total: f64 = probs.iter().map(|p| p.1).sum();
                let mut r = self.rng.random::<f64>() * total;
                for &(id, w) in &probs {
                    if r < w {
                        return id;
                    }
                    r -= w;
                }
                probs.last().map_or(0, |p| p.0)
            }
        }
    }
}

/// The index of the highest value; the first among equals; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// (id, logit) of the `k` highest logits (all when `k` is `None`), highest first, lower id first among equals.
pub fn top_candidates(logits: &[f32], k: Option<usize>) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i as u32, l))
        .collect();
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

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }

    #[test]
    fn top_candidates_are_sorted_and_cut() {
        let c = top_candidates(&[0.1, 0.9, 0.5, 0.9, 0.3], Some(3));
        assert_eq!(c, vec![(1, 0.9), (3, 0.9), (2, 0.5)]);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(Sampling::Random {
                temperature: 1.5,
                top_k: None,
                top_p: None,
                seed,
            })
            .unwrap();
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        let mut s = Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: Some(1),
            top_p: None,
            seed: 1,
        })
        .unwrap();
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        // Ids 1 and 2 hold almost all the mass: top-p 0.9 never picks 0 or 3.
        let mut s = Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.9),
            seed: 3,
        })
        .unwrap();
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.2 / 0.8 at temperature 1.
        let logits = [0.0, (4.0f32).ln()];
        let mut s = Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 11,
        })
        .unwrap();
        let ones = (0..5000).filter(|_| s.sample(&logits) == 1).count() as f64 / 5000.0;
        assert!((ones - 0.8).abs() < 0.03, "{ones}");
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Sampler::new(Sampling::Random {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0
        })
        .is_err());
        assert!(Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: Some(0),
            top_p: None,
            seed: 0
        })
        .is_err());
        assert!(Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: None,
            top_p: Some(1.5),
            seed: 0
        })
        .is_err());
    }
}

//! Steering: what is added to the residual stream, as engine hooks.
//!
//! - SAE latents: `h' = h + m * sum_j s_j * W_dec[j]`, where `s_j` is latent j's strength (the coefficient on its
//!   decoder row; the same number in the page, in links and in `saif steer`) and `m` a global multiplier. SAIF's
//!   vector sets `s_j = alpha * c_j`, with `c_j` the latent's delta or its mean activation on positives
//!   (`discover::Coefficient`).
//! - Difference-in-means (Stolfo et al. 2024): `d = mean(h_pos - h_neg)` of last-token residuals. Added as
//!   `h' = h + alpha * d`, or as format steering that sets the projection onto `u = d / |d|` to `alpha * c`, with
//!   `c` the mean projection of the positives.
//! - Random latents: `k` latents drawn with a seed, scaled so the vector's norm matches another's (the control
//!   that separates "the right latents" from "any push of this size").
//!
//! Every steering applies at one layer, to the positions of a `Scope` (all, the prompt's, the generated ones).

use saif_engine::{EngineError, Hooks, Scope};
use serde::{Deserialize, Serialize};

use crate::sae::Sae;

/// A change of `resid_post[layer]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Steering {
    /// Nothing changes.
    None,
    /// `h' = h + vector`.
    Add { layer: usize, vector: Vec<f32>, scope: Scope },
    /// `h' = h + (value - h.unit) unit`.
    SetProjection { layer: usize, unit: Vec<f32>, value: f32, scope: Scope },
}

impl Steering {
    /// The engine hooks that make this change.
    pub fn hooks(&self) -> Hooks {
        match self {
            Steering::None => Hooks::none(),
            Steering::Add { layer, vector, scope } => Hooks::none().add(*layer, vector.clone(), *scope),
            Steering::SetProjection { layer, unit, value, scope } => {
                Hooks::none().project(*layer, unit.clone(), *value, *scope)
            }
        }
    }

    /// The norm of what is added (of the vector; of `value` for a projection).
    pub fn norm(&self) -> f64 {
        match self {
            Steering::None => 0.0,
            Steering::Add { vector, .. } => norm(vector),
            Steering::SetProjection { value, .. } => value.abs() as f64,
        }
    }
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// `m * sum_j s_j * W_dec[j]` for `(j, s_j)` in `latents`. Refuses latents the SAE does not have, and strengths
/// or a multiplier that are not finite numbers or that make the vector overflow.
pub fn latent_vector(sae: &Sae, latents: &[(usize, f32)], multiplier: f32) -> Result<Vec<f32>, EngineError> {
    if !multiplier.is_finite() {
        return Err(EngineError::InvalidRequest(format!("the global multiplier {multiplier} is not a finite number")));
    }
    let mut v = vec![0f32; sae.info.d_in];
    for &(j, s) in latents {
        if j >= sae.info.d_sae {
            return Err(EngineError::InvalidRequest(format!(
                "latent {j} does not exist: the SAE has latents 0..{}",
                sae.info.d_sae - 1
            )));
        }
        if !s.is_finite() {
            return Err(EngineError::InvalidRequest(format!("latent {j} has strength {s}, not a finite number")));
        }
        v.iter_mut().zip(sae.decoder_row(j)).for_each(|(x, w)| *x += multiplier * s * w);
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(EngineError::InvalidRequest(
            "the steering vector overflows (strengths too large for 32-bit floats)".into(),
        ));
    }
    Ok(v)
}

/// Difference-in-means statistics of last-token residuals at one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiffMean {
    pub layer: usize,
    /// `mean(h_pos) - mean(h_neg)`.
    pub difference: Vec<f32>,
    /// Mean projection of the positives onto the unit difference.
    pub positive_projection: f32,
    /// Mean projection of the negatives onto the unit difference.
    pub negative_projection: f32,
    /// Mean norm of the negatives' residuals (the scale a steering vector is measured against).
    pub residual_norm: f32,
}

impl DiffMean {
    /// From residual rows of positives and negatives (`hidden` values each).
    pub fn from_rows(layer: usize, positives: &[Vec<f32>], negatives: &[Vec<f32>]) -> Result<Self, EngineError> {
        if positives.is_empty() || negatives.is_empty() {
            return Err(EngineError::InvalidRequest("difference-in-means needs positives and negatives".into()));
        }
        let hidden = positives[0].len();
        let mean = |rows: &[Vec<f32>]| -> Vec<f64> {
            let mut m = vec![0f64; hidden];
            for r in rows {
                m.iter_mut().zip(r).for_each(|(a, &b)| *a += b as f64);
            }
            m.iter_mut().for_each(|a| *a /= rows.len() as f64);
            m
        };
        let (mp, mn) = (mean(positives), mean(negatives));
        let difference: Vec<f32> = mp.iter().zip(&mn).map(|(a, b)| (a - b) as f32).collect();
        let d = norm(&difference);
        let project = |m: &[f64]| -> f32 {
            if d == 0.0 {
                0.0
            } else {
                (m.iter().zip(&difference).map(|(a, &b)| a * b as f64).sum::<f64>() / d) as f32
            }
        };
        let residual_norm = (negatives.iter().map(|r| norm(r)).sum::<f64>() / negatives.len() as f64) as f32;
        Ok(Self {
            layer,
            positive_projection: project(&mp),
            negative_projection: project(&mn),
            difference,
            residual_norm,
        })
    }

    /// `h' = h + alpha * d`.
    pub fn add(&self, alpha: f32, scope: Scope) -> Steering {
        Steering::Add { layer: self.layer, vector: self.difference.iter().map(|x| alpha * x).collect(), scope }
    }

    /// The projection onto `d / |d|` set to `alpha` times the positives' mean projection.
    pub fn set_projection(&self, alpha: f32, scope: Scope) -> Result<Steering, EngineError> {
        let d = norm(&self.difference);
        if d == 0.0 {
            return Err(EngineError::InvalidRequest("the positives and negatives have the same mean".into()));
        }
        let unit = self.difference.iter().map(|&x| (x as f64 / d) as f32).collect();
        Ok(Steering::SetProjection { layer: self.layer, unit, value: alpha * self.positive_projection, scope })
    }
}

/// `k` distinct latents of `0..d_sae` drawn with `seed`, none of `exclude` (a Fisher-Yates shuffle driven by
/// splitmix64, so the draw is the same everywhere).
pub fn random_latents(d_sae: usize, k: usize, seed: u64, exclude: &[usize]) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..d_sae).filter(|j| !exclude.contains(j)).collect();
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let k = k.min(pool.len());
    for i in 0..k {
        let j = i + (next() % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool
}

/// `v` scaled to norm `target` (unchanged when `v` is zero).
pub fn with_norm(v: &[f32], target: f64) -> Vec<f32> {
    let n = norm(v);
    if n == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|&x| (x as f64 * target / n) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_latents_are_distinct_seeded_and_avoid_the_excluded() {
        let a = random_latents(100, 15, 7, &[3, 4, 5]);
        assert_eq!(a.len(), 15);
        assert!(a.iter().all(|j| *j < 100 && ![3, 4, 5].contains(j)));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 15);
        assert_eq!(a, random_latents(100, 15, 7, &[3, 4, 5]));
        assert_ne!(a, random_latents(100, 15, 8, &[3, 4, 5]));
        assert_eq!(random_latents(4, 10, 1, &[0]).len(), 3);
    }

    #[test]
    fn diffmean_by_hand() {
        // Positives (2, 1) and (4, 1): mean (3, 1); negatives (0, 1): mean (0, 1); d = (3, 0), u = (1, 0).
        let dm = DiffMean::from_rows(2, &[vec![2.0, 1.0], vec![4.0, 1.0]], &[vec![0.0, 1.0]]).unwrap();
        assert_eq!(dm.difference, vec![3.0, 0.0]);
        assert_eq!((dm.positive_projection, dm.negative_projection), (3.0, 0.0));
        assert_eq!(dm.residual_norm, 1.0);
        assert_eq!(dm.add(0.5, Scope::All), Steering::Add { layer: 2, vector: vec![1.5, 0.0], scope: Scope::All });
        assert_eq!(
            dm.set_projection(1.0, Scope::Generated).unwrap(),
            Steering::SetProjection { layer: 2, unit: vec![1.0, 0.0], value: 3.0, scope: Scope::Generated }
        );
        assert!(DiffMean::from_rows(0, &[vec![1.0]], &[vec![1.0]]).unwrap().set_projection(1.0, Scope::All).is_err());
    }

    #[test]
    fn scaling_to_a_norm() {
        let v = with_norm(&[3.0, 4.0], 10.0);
        assert!((v[0] - 6.0).abs() < 1e-6 && (v[1] - 8.0).abs() < 1e-6);
        assert_eq!(with_norm(&[0.0, 0.0], 5.0), vec![0.0, 0.0]);
    }
}

//! The numbers an evaluation reports: accuracies with 95% Wilson intervals, and fluency next to them, so that
//! steering which only produces gibberish in the right language shows up as such.
//!
//! Fluency has two measures. *Perplexity*: the unsteered model's perplexity of the output read as a text of its
//! own (BOS, then the output's tokens), so it does not depend on the prompt or the steering; a loop of one token
//! can still read as likely, which is why the second measure is there. *Repetition*: the fraction of the output's
//! token 3-grams that repeat an earlier 3-gram ("La la la la", "JeJeJeJe" are near 1).

pub use saif_engine::token_nll;
use saif_engine::{Engine, EngineError};
use serde::{Deserialize, Serialize};

/// The 95% Wilson score interval of `successes` out of `n` (0 to 1 when `n` is 0).
pub fn wilson(successes: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let z = 1.959_963_984_540_054f64;
    let (n, p) = (n as f64, successes as f64 / n as f64);
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

/// The fraction of the 3-grams of `tokens` that repeat an earlier one (0 with fewer than four tokens).
pub fn repetition(tokens: &[u32]) -> f64 {
    if tokens.len() < 4 {
        return 0.0;
    }
    let grams: Vec<&[u32]> = tokens.windows(3).collect();
    let mut seen = std::collections::HashSet::new();
    let repeats = grams.iter().filter(|g| !seen.insert(**g)).count();
    repeats as f64 / grams.len() as f64
}

/// Fluency of a set of outputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Fluency {
    /// The unsteered model's perplexity of the outputs (geometric mean over all their tokens).
    pub perplexity: f64,
    /// Mean repetition rate of the outputs.
    pub repetition: f64,
    /// Mean output length in tokens.
    pub mean_tokens: f64,
}

/// Accumulates the log-likelihood of outputs under the unsteered model.
#[derive(Debug, Default)]
pub struct FluencyMeter {
    nll: f64,
    tokens: usize,
    repetition: f64,
    outputs: usize,
}

impl FluencyMeter {
    /// Adds outputs (their tokens, without any stop token), in order, read together where the backend can
    /// (`self_nlls`): the same measure whether they come in one call or in several.
    pub async fn add_all(&mut self, engine: &mut Engine, outputs: &[Vec<u32>]) -> Result<(), EngineError> {
        for (ids, (nll, n)) in outputs.iter().zip(self_nlls(engine, outputs).await?) {
            self.outputs += 1;
            self.repetition += repetition(ids);
            self.nll += nll;
            self.tokens += n;
        }
        Ok(())
    }

    pub fn finish(&self) -> Fluency {
        Fluency {
            perplexity: if self.tokens == 0 { f64::NAN } else { (self.nll / self.tokens as f64).exp() },
            repetition: self.repetition / self.outputs.max(1) as f64,
            mean_tokens: self.tokens as f64 / self.outputs.max(1) as f64,
        }
    }
}

/// For each of `outputs`: the negative log-likelihood of its tokens read after BOS (or after nothing, for models
/// without one) by the model without hooks, and how many tokens it covers. The outputs are read together where the
/// backend can (`LanguageModel::next_token_nlls`); each sum runs over its positions in order.
pub async fn self_nlls(engine: &mut Engine, outputs: &[Vec<u32>]) -> Result<Vec<(f64, usize)>, EngineError> {
    let bos: Vec<u32> = engine.tokenizer.bos().into_iter().collect();
    let longest = engine.model.max_context().saturating_sub(1);
    // Without BOS the first token has nothing to be predicted from, so every input's first token is context.
    let inputs: Vec<Vec<u32>> =
        outputs.iter().map(|ids| bos.iter().chain(ids.iter().take(longest)).copied().collect::<Vec<u32>>()).collect();
    let read: Vec<&[u32]> = inputs.iter().filter(|input| input.len() >= 2).map(Vec::as_slice).collect();
    let mut nlls = engine.model.next_token_nlls(&read).await?.into_iter();
    Ok(inputs
        .iter()
        .map(|input| match input.len() >= 2 {
            true => {
                let values = nlls.next().expect("one list per input read");
                (values.iter().fold(0.0, |sum, v| sum + v), values.len())
            }
            false => (0.0, 0),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_hand_computed_intervals() {
        // 15 of 20: p = 0.75, z = 1.96 -> [0.5313, 0.8881] (Wilson 1927; checked by hand).
        let [lo, hi] = wilson(15, 20);
        assert!((lo - 0.5313).abs() < 1e-4 && (hi - 0.8881).abs() < 1e-4, "{lo} {hi}");
        let [lo, hi] = wilson(0, 20);
        assert!(lo == 0.0 && (hi - 0.1611).abs() < 1e-4, "{hi}");
        let [lo, hi] = wilson(20, 20);
        assert!((lo - 0.8389).abs() < 1e-4 && hi == 1.0, "{lo}");
        assert_eq!(wilson(0, 0), [0.0, 1.0]);
    }

    #[test]
    fn repetition_counts_repeated_trigrams() {
        assert_eq!(repetition(&[1, 2, 3, 4, 1, 2]), 0.0);
        // Six equal tokens: 4 trigrams, all the same: 3 repeat the first.
        assert_eq!(repetition(&[7; 6]), 0.75);
        // 1 2 3 1 2 3: trigrams 123 231 312 123 -> one repeat of four.
        assert_eq!(repetition(&[1, 2, 3, 1, 2, 3]), 0.25);
        assert_eq!(repetition(&[1, 2]), 0.0);
    }
}

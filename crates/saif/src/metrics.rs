//! The numbers an evaluation reports: accuracies with 95% Wilson intervals, and fluency next to them, so that
//! steering which only produces gibberish in the right language shows up as such.
//!
//! Fluency has two measures. *Perplexity*: the unsteered model's perplexity of the output read as a text of its
//! own (BOS, then the output's tokens), so it does not depend on the prompt or the steering; a loop of one token
//! can still read as likely, which is why the second measure is there. *Repetition*: the fraction of the output's
//! token 3-grams that repeat an earlier 3-gram ("La la la la", "JeJeJeJe" are near 1).

use saif_engine::{Engine, EngineError, Hooks, LogitsWanted, Segment};
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

/// Accumulates the log-likelihood of outputs under the unsteered model, one output at a time.
#[derive(Debug, Default)]
pub struct FluencyMeter {
    nll: f64,
    tokens: usize,
    repetition: f64,
    outputs: usize,
}

impl FluencyMeter {
    /// Adds one output: `ids` are its tokens (without any stop token).
    pub async fn add(&mut self, engine: &mut Engine, ids: &[u32]) -> Result<(), EngineError> {
        self.outputs += 1;
        self.repetition += repetition(ids);
        let (nll, n) = self_nll(engine, ids).await?;
        self.nll += nll;
        self.tokens += n;
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

/// The negative log-likelihood of `ids` read after BOS (or after nothing, for models without one) by the model
/// without hooks, and how many tokens it covers.
pub async fn self_nll(engine: &mut Engine, ids: &[u32]) -> Result<(f64, usize), EngineError> {
    let ids: Vec<u32> = ids.iter().copied().take(engine.model.max_context().saturating_sub(1)).collect();
    if ids.is_empty() {
        return Ok((0.0, 0));
    }
    let mut input: Vec<u32> = engine.tokenizer.bos().into_iter().collect();
    let skip = input.len();
    input.extend(&ids);
    if input.len() < 2 {
        return Ok((0.0, 0));
    }
    engine.model.reset();
    let out = engine.model.forward(&input, Segment::Prompt, &Hooks::none(), LogitsWanted::All).await?;
    let vocab = engine.config().vocab_size;
    let logits = out.all_logits.as_deref().ok_or_else(|| EngineError::InvalidRequest("no logits".into()))?;
    let first = skip.max(1); // without BOS the first token has nothing to be predicted from
    let mut nll = 0.0;
    for p in first..input.len() {
        nll += token_nll(&logits[(p - 1) * vocab..p * vocab], input[p]);
    }
    Ok((nll, input.len() - first))
}

/// `-log softmax(row)[token]`, in f64.
pub fn token_nll(row: &[f32], token: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let log_z = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    log_z - row[token as usize] as f64
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

    #[test]
    fn nll_of_a_token_is_minus_its_log_probability() {
        let row = [0.0f32, (3f32).ln()]; // p = [0.25, 0.75]
        assert!((token_nll(&row, 1) - (-(0.75f64).ln())).abs() < 1e-6);
        assert!((token_nll(&row, 0) - (-(0.25f64).ln())).abs() < 1e-6);
    }
}

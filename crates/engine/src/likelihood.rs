//! How likely a model finds a text: the negative log-likelihood of each token given the ones before it, from the
//! logits at the position before. SAIF's fluency measure reads every answer so (`LanguageModel::next_token_nlls`).

/// `-log softmax(row)[token]`, in f64: the logits' largest value taken out before the exponentials, so that none
/// overflows.
pub fn token_nll(row: &[f32], token: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let log_z = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    log_z - row[token as usize] as f64
}

/// `token_nll` of each position of `tokens` after the first: value p - 1 is `tokens[p]`'s, from row p - 1 of
/// `logits` (all positions' logits, `vocab` a row).
pub fn next_token_nlls(logits: &[f32], vocab: usize, tokens: &[u32]) -> Vec<f64> {
    (1..tokens.len()).map(|p| token_nll(&logits[(p - 1) * vocab..p * vocab], tokens[p])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a hand computation: logits (0, ln 2, ln 5) are probabilities 1/8, 2/8 and 5/8 (and (0, ln 3) are 1/4
    /// and 3/4).
    #[test]
    fn token_nll_is_minus_log_softmax() {
        let row = [0.0, 2f32.ln(), 5f32.ln()];
        for (token, p) in [(0u32, 0.125f64), (1, 0.25), (2, 0.625)] {
            assert!((token_nll(&row, token) - -p.ln()).abs() < 1e-6, "token {token}");
        }
        assert!((token_nll(&[0.0, 3f32.ln()], 1) - -(0.75f64).ln()).abs() < 1e-6);
        // Large logits do not overflow.
        assert!((token_nll(&[1000.0, 1000.0], 1) - 2f64.ln()).abs() < 1e-12);
    }
}

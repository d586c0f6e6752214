//! How good an SAE is, on held-out text: the fraction of the residual stream's variance its reconstruction leaves
//! unexplained (FVU), the mean number of active latents per token (L0), the fraction of latents that never fire,
//! and the model's next-token loss with the SAE's reconstruction spliced into the stream, against the clean model
//! and against the layer zeroed: `ce_recovered = (zero - sae) / (zero - clean)`.
//!
//! Spliced, zeroed and counted are every position but the first of each text (`corpus::skipped_position`): the
//! SAEs are not trained there, as the attention sink's residual is hundreds of times larger than the others.

use saif_engine::{Engine, EngineError, Hooks, LogitsWanted, Positions, Segment};
use serde::Serialize;

use crate::corpus::{line_tokens, skipped_position};
use crate::sae::Sae;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SaeEval {
    pub layer: usize,
    pub fvu: f64,
    pub l0: f64,
    pub dead_fraction: f64,
    pub ce_loss_clean: f64,
    pub ce_loss_sae: f64,
    pub ce_loss_zero: f64,
    pub ce_recovered: f64,
    /// Tokens the statistics cover.
    pub tokens: usize,
    pub texts: usize,
}

/// Mean next-token cross-entropy of `ids` from `vocab`-wide logits after every position.
fn cross_entropy(all_logits: &[f32], ids: &[u32], vocab: usize) -> (f64, usize) {
    let mut total = 0.0;
    for p in 0..ids.len() - 1 {
        let row = &all_logits[p * vocab..(p + 1) * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let log_z = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        total += log_z - row[ids[p + 1] as usize] as f64;
    }
    (total, ids.len() - 1)
}

/// Evaluates `sae` on `resid_post[layer]` over `lines`; `progress(done, total)` after each text.
pub async fn evaluate(
    engine: &mut Engine,
    sae: &Sae,
    layer: usize,
    lines: &[String],
    progress: impl FnMut(usize, usize),
) -> Result<SaeEval, EngineError> {
    let mut evals = evaluate_layers(engine, &[(sae, layer)], lines, progress).await?;
    Ok(evals.remove(0))
}

/// Evaluates several SAEs, each on its layer, over the same `lines`: one clean pass per text reads every layer, then
/// each SAE gets its spliced and its zeroed pass. The same figures as `evaluate` on each, for a quarter less work
/// on a model's whole set of SAEs.
pub async fn evaluate_layers(
    engine: &mut Engine,
    saes: &[(&Sae, usize)],
    lines: &[String],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<SaeEval>, EngineError> {
    let c = engine.config().clone();
    for &(sae, layer) in saes {
        sae.check_fits(c.hidden, c.n_layers, layer).map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
    }
    let (d, vocab) = (c.hidden, c.vocab_size);
    let mut tallies: Vec<Tally> = saes.iter().map(|(sae, _)| Tally::new(sae.info.d_sae, d)).collect();
    let (mut ce_clean, mut ce_tokens, mut texts) = (0f64, 0usize, 0usize);
    let reads = saes.iter().fold(Hooks::none(), |hooks, &(_, layer)| hooks.read(layer, Positions::All));
    for (i, line) in lines.iter().enumerate() {
        let ids = line_tokens(engine, line)?;
        if ids.len() < 3 {
            continue;
        }
        texts += 1;
        engine.model.reset();
        let clean = engine.model.forward(&ids, Segment::Prompt, &reads, LogitsWanted::All).await?;
        let (loss, n) = cross_entropy(clean.all_logits.as_deref().expect("asked for"), &ids, vocab);
        ce_clean += loss;
        ce_tokens += n;
        for (&(sae, layer), tally) in saes.iter().zip(&mut tallies) {
            // Per position: the reconstruction minus the stream (splice) and minus the stream (zero).
            let mut splice = vec![0f32; ids.len() * d];
            let mut zero = vec![0f32; ids.len() * d];
            for cap in clean.captures.iter().filter(|cap| cap.layer == layer && !skipped_position(cap.position)) {
                let latents = sae.encode_sparse(&cap.values);
                tally.active += latents.len();
                latents.iter().for_each(|&(j, _)| tally.fired[j as usize] = true);
                let recon = sae.decode(&latents);
                let p = cap.position;
                for j in 0..d {
                    let h = cap.values[j] as f64;
                    tally.sq_err += (h - recon[j] as f64).powi(2);
                    tally.sum[j] += h;
                    tally.sum_sq += h * h;
                    splice[p * d + j] = recon[j] - cap.values[j];
                    zero[p * d + j] = -cap.values[j];
                }
                tally.counted += 1;
            }
            for (delta, total) in [(splice, &mut tally.ce_sae), (zero, &mut tally.ce_zero)] {
                engine.model.reset();
                let hooks = Hooks::none().add_rows(layer, 0, delta);
                let out = engine.model.forward(&ids, Segment::Prompt, &hooks, LogitsWanted::All).await?;
                *total += cross_entropy(out.all_logits.as_deref().expect("asked for"), &ids, vocab).0;
            }
        }
        progress(i + 1, lines.len());
    }
    if texts == 0 {
        return Err(EngineError::InvalidRequest("no text long enough to evaluate the SAE on".into()));
    }
    let clean = ce_clean / ce_tokens as f64;
    saes.iter()
        .zip(tallies)
        .map(|(&(_, layer), t)| {
            let n = t.counted as f64;
            let variance = t.sum_sq - t.sum.iter().map(|s| s * s).sum::<f64>() / n;
            let (spliced, zeroed) = (t.ce_sae / ce_tokens as f64, t.ce_zero / ce_tokens as f64);
            Ok(SaeEval {
                layer,
                fvu: t.sq_err / variance,
                l0: t.active as f64 / n,
                dead_fraction: t.fired.iter().filter(|&&f| !f).count() as f64 / t.fired.len() as f64,
                ce_loss_clean: clean,
                ce_loss_sae: spliced,
                ce_loss_zero: zeroed,
                ce_recovered: (zeroed - spliced) / (zeroed - clean),
                tokens: t.counted,
                texts,
            })
        })
        .collect()
}

/// One SAE's running sums over the texts.
#[derive(Default)]
struct Tally {
    fired: Vec<bool>,
    sq_err: f64,
    sum: Vec<f64>,
    sum_sq: f64,
    active: usize,
    counted: usize,
    ce_sae: f64,
    ce_zero: f64,
}

impl Tally {
    fn new(d_sae: usize, hidden: usize) -> Self {
        Tally { fired: vec![false; d_sae], sum: vec![0.0; hidden], ..Default::default() }
    }
}

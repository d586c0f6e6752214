//! Discovery: the SAE latents that encode an instruction (SAIF, He et al. 2025).
//!
//! Each discovery content is run twice: with the instruction (a positive; the phrasings are used in turn, English
//! and other languages, so that wording-specific latents wash out) and alone (a negative). The SAE encodes
//! `resid_post[layer]` at the last prompt token, or averaged over every token after the instruction
//! (`ReadAt::AfterInstruction`). For every latent j:
//!
//! - `freq_pos`, `freq_neg`: the fraction of positives (negatives) on which it fires (activation > 0);
//! - `mean_pos`, `mean_neg`: its mean activation over positives (negatives), zeros included;
//! - `delta = mean_pos - mean_neg`.
//!
//! SAIF keeps the latents that fire on at least a fraction `tau` of positives and ranks them by `delta`
//! (`Rank::Delta`). `Rank::Output` re-ranks the best of those by their effect on the output (after Arad et al.,
//! EMNLP 2025): each candidate's decoder direction is added on the negatives, and it is scored by how much it
//! raises the log-likelihood of what the model answers when it *is* given the instruction. The same readings
//! give the difference-in-means baseline at the layer (`steer::DiffMean`).

use std::future::Future;

use saif_engine::{
    generate, Capture, Engine, EngineError, GenerateOptions, Hooks, LogitsWanted, Positions, Sampling, Scope, Segment,
};
use serde::{Deserialize, Serialize};

use crate::data::{self, Instruction, Placement, PromptStyle};
use crate::metrics::token_nll;
use crate::progress::{report, Progress};
use crate::sae::Sae;
use crate::steer::{norm, DiffMean};

/// Where the SAE reads each prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReadAt {
    /// The last prompt token (where the model is about to answer).
    #[default]
    LastToken,
    /// Every token after the instruction, averaged (see `data::prompt`).
    AfterInstruction,
}

/// How the latents that pass the frequency filter are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Rank {
    /// By `mean_pos - mean_neg` (SAIF).
    #[default]
    Delta,
    /// By the effect of the latent's decoder direction on the instructed answer's likelihood.
    Output,
}

impl Rank {
    pub fn parse(s: &str) -> Result<Self, EngineError> {
        match s {
            "delta" => Ok(Rank::Delta),
            "output" => Ok(Rank::Output),
            other => Err(EngineError::InvalidRequest(format!("rank \"{other}\": delta or output"))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiscoverOptions {
    pub placement: Placement,
    pub read_at: ReadAt,
    /// Keep latents firing on at least this fraction of positives.
    pub tau: f32,
    /// How many latents to keep.
    pub k: usize,
    pub rank: Rank,
    /// The word `include-word` asks for.
    pub keyword: String,
    /// Use the first this-many discovery contents (all of them when larger).
    pub contents: usize,
    /// `Rank::Output`: how many of the best latents by delta are probed.
    pub candidates: usize,
    /// `Rank::Output`: contents whose instructed answers the candidates are scored on.
    pub probes: usize,
    /// `Rank::Output`: tokens of each instructed answer scored.
    pub probe_tokens: usize,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        Self {
            placement: Placement::After,
            read_at: ReadAt::LastToken,
            tau: 0.5,
            k: 15,
            rank: Rank::Delta,
            keyword: data::default_keyword().to_string(),
            contents: usize::MAX,
            candidates: 48,
            probes: 6,
            probe_tokens: 16,
        }
    }
}

/// One latent's statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentStats {
    pub id: usize,
    pub freq_pos: f32,
    pub freq_neg: f32,
    pub mean_pos: f32,
    pub mean_neg: f32,
    pub delta: f32,
    /// `Rank::Output`: the mean rise in log-likelihood per token of the instructed answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_score: Option<f32>,
    /// The tokens its decoder direction promotes (filled by the caller from a logit lens).
    #[serde(default)]
    pub top_tokens: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Discovery {
    pub instruction: String,
    pub layer: usize,
    pub options: DiscoverOptions,
    pub positives: usize,
    pub negatives: usize,
    /// Latents that fire on at least `tau` of the positives with a positive delta.
    pub candidates: usize,
    /// The kept latents, best first.
    pub latents: Vec<LatentStats>,
    /// Difference-in-means of the same prompts' last-token residuals at the layer.
    pub diffmean: DiffMean,
}

/// The coefficient each kept latent is steered with, before alpha.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Coefficient {
    /// Its mean activation on positives (the paper's "activation strength", `abar_j`). Latents that fire without
    /// the instruction too get their whole activation added again, which derails the model (docs/results.md).
    MeanPos,
    /// Its delta, the instruction's share of it: over every latent, `sum_j delta_j W_dec[j]` is the difference in
    /// means of the SAE's reconstructions, so the top k give a sparse difference-in-means. The default.
    #[default]
    Delta,
}

impl Coefficient {
    pub fn parse(s: &str) -> Result<Self, EngineError> {
        match s {
            "mean" => Ok(Coefficient::MeanPos),
            "delta" => Ok(Coefficient::Delta),
            other => Err(EngineError::InvalidRequest(format!("coefficient \"{other}\": mean or delta"))),
        }
    }
}

impl Discovery {
    /// `(latent, coefficient)` of the kept latents: SAIF's steering at alpha = 1.
    pub fn strengths(&self, coefficient: Coefficient) -> Vec<(usize, f32)> {
        let pick = |l: &LatentStats| match coefficient {
            Coefficient::MeanPos => l.mean_pos,
            Coefficient::Delta => l.delta,
        };
        self.latents.iter().map(|l| (l.id, pick(l))).collect()
    }
}

/// Per-latent statistics from the SAE activations of positives and negatives (each prompt a list of
/// `(latent, activation)`, only nonzero ones), for latents `0..d_sae`.
pub fn statistics(positives: &[Vec<(u32, f32)>], negatives: &[Vec<(u32, f32)>], d_sae: usize) -> Vec<LatentStats> {
    let tally = |prompts: &[Vec<(u32, f32)>]| {
        let (mut fired, mut sum) = (vec![0usize; d_sae], vec![0f64; d_sae]);
        for p in prompts {
            for &(j, a) in p {
                if a > 0.0 {
                    fired[j as usize] += 1;
                }
                sum[j as usize] += a as f64;
            }
        }
        let n = prompts.len().max(1) as f64;
        (
            fired.into_iter().map(|f| (f as f64 / n) as f32).collect::<Vec<_>>(),
            sum.into_iter().map(|s| s / n).collect::<Vec<_>>(),
        )
    };
    let (freq_pos, mean_pos) = tally(positives);
    let (freq_neg, mean_neg) = tally(negatives);
    (0..d_sae)
        .map(|j| LatentStats {
            id: j,
            freq_pos: freq_pos[j],
            freq_neg: freq_neg[j],
            mean_pos: mean_pos[j] as f32,
            mean_neg: mean_neg[j] as f32,
            delta: (mean_pos[j] - mean_neg[j]) as f32,
            output_score: None,
            top_tokens: Vec::new(),
        })
        .collect()
}

/// The latents firing on at least `tau` of positives with a positive delta, by delta (largest first; the lower id
/// first on ties).
pub fn by_delta(stats: &[LatentStats], tau: f32) -> Vec<LatentStats> {
    let mut kept: Vec<LatentStats> = stats.iter().filter(|s| s.freq_pos >= tau && s.delta > 0.0).cloned().collect();
    kept.sort_by(|a, b| b.delta.total_cmp(&a.delta).then(a.id.cmp(&b.id)));
    kept
}

/// Discovery contents whose prompts (with and without the instruction) are read in one batch: one pass of the
/// CPU's batched reading.
const READ_CONTENTS: usize = saif_engine::model::PROMPTS_PER_READ / 2;

/// What one prompt's reading gives.
struct Reading {
    /// The SAE activations (mean over the read positions), nonzero ones; empty without an SAE.
    latents: Vec<(u32, f32)>,
    /// The residual at the last prompt token.
    last: Vec<f32>,
}

/// The hooks that read `resid_post[layer]` of `prompt`: at the last token, or with an SAE and
/// `ReadAt::AfterInstruction` at every token after the instruction.
fn read_hooks(sae: Option<&Sae>, layer: usize, prompt: &data::Prompt, read_at: ReadAt) -> Hooks {
    let n = prompt.ids.len();
    let positions = match (read_at, sae) {
        (ReadAt::AfterInstruction, Some(_)) => Positions::At((prompt.after_instruction.min(n - 1)..n).collect()),
        _ => Positions::Last,
    };
    Hooks::none().read(layer, positions)
}

/// Reads `resid_post[layer]` of each prompt (in one batch where the backend has batching). Only the residual at
/// `layer` is needed: the pass stops there, with no logits.
async fn read(
    engine: &mut Engine,
    sae: Option<&Sae>,
    layer: usize,
    prompts: &[data::Prompt],
    read_at: ReadAt,
) -> Result<Vec<Reading>, EngineError> {
    let hooks: Vec<Hooks> = prompts.iter().map(|p| read_hooks(sae, layer, p, read_at)).collect();
    let calls: Vec<(&[u32], &Hooks)> = prompts.iter().zip(&hooks).map(|(p, h)| (&p.ids[..], h)).collect();
    let mut readings = Vec::with_capacity(prompts.len());
    for captures in engine.model.read_prompts(&calls).await? {
        readings.push(reading(sae, &captures)?);
    }
    Ok(readings)
}

/// One prompt's reading from its captures: the residual at the last prompt token, and the SAE's activations
/// averaged over the read positions.
fn reading(sae: Option<&Sae>, captures: &[Capture]) -> Result<Reading, EngineError> {
    let last = captures.last().ok_or_else(|| EngineError::InvalidRequest("no activation was read".into()))?;
    let mut latents = Vec::new();
    if let Some(sae) = sae {
        let mut dense = vec![0f32; sae.info.d_sae];
        for c in captures {
            for (j, a) in sae.encode_sparse(&c.values) {
                dense[j as usize] += a / captures.len() as f32;
            }
        }
        latents = dense.iter().enumerate().filter(|(_, &a)| a != 0.0).map(|(j, &a)| (j as u32, a)).collect();
    }
    Ok(Reading { latents, last: last.values.clone() })
}

/// The readings of every discovery content with the instruction (positives) and without (negatives).
struct Contrast {
    positives: Vec<Reading>,
    negatives: Vec<Reading>,
}

async fn read_contrast<F, Fut>(
    engine: &mut Engine,
    sae: Option<&Sae>,
    layer: usize,
    instruction: &Instruction,
    options: &DiscoverOptions,
    progress: &mut F,
) -> Result<Contrast, EngineError>
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = bool>,
{
    if layer >= engine.config().n_layers {
        return Err(EngineError::InvalidRequest(format!(
            "layer {layer} does not exist: the model has layers 0..{}",
            engine.config().n_layers - 1
        )));
    }
    let style = PromptStyle::for_engine(engine);
    let contents: Vec<&str> = data::discovery_contents().into_iter().take(options.contents.max(1)).collect();
    let mut contrast = Contrast { positives: Vec::new(), negatives: Vec::new() };
    let phase = "reading the prompts with and without the instruction";
    // A batch of contents at a time: each content's prompt with the instruction, then without.
    for (b, batch) in contents.chunks(READ_CONTENTS).enumerate() {
        let first = b * READ_CONTENTS;
        report(progress, phase, first, contents.len()).await?;
        let mut prompts = Vec::with_capacity(2 * batch.len());
        for (i, content) in batch.iter().enumerate() {
            let phrasing = instruction.phrasing_for(first + i, &options.keyword);
            prompts.push(data::prompt(engine, content, Some(&phrasing), options.placement, style)?);
            prompts.push(data::prompt(engine, content, None, options.placement, style)?);
        }
        let readings = read(engine, sae, layer, &prompts, options.read_at).await?;
        let mut readings = readings.into_iter();
        while let (Some(with), Some(without)) = (readings.next(), readings.next()) {
            contrast.positives.push(with);
            contrast.negatives.push(without);
        }
    }
    report(progress, phase, contents.len(), contents.len()).await?;
    Ok(contrast)
}

impl Contrast {
    fn diffmean(&self, layer: usize) -> Result<DiffMean, EngineError> {
        let last = |r: &[Reading]| r.iter().map(|r| r.last.clone()).collect::<Vec<_>>();
        DiffMean::from_rows(layer, &last(&self.positives), &last(&self.negatives))
    }
}

/// The difference-in-means statistics of `instruction` at `layer`, from the discovery contents (no SAE needed).
pub async fn diffmean<F, Fut>(
    engine: &mut Engine,
    layer: usize,
    instruction: &Instruction,
    options: &DiscoverOptions,
    mut progress: F,
) -> Result<DiffMean, EngineError>
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = bool>,
{
    read_contrast(engine, None, layer, instruction, options, &mut progress).await?.diffmean(layer)
}

/// Checks that `sae` reads `layer` of the engine's model and that `k` fits it.
pub fn check_sae(engine: &Engine, sae: &Sae, layer: usize, k: usize) -> Result<(), EngineError> {
    let c = engine.config();
    sae.check_fits(c.hidden, c.n_layers, layer).map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
    if let Some(l) = sae.info.layer.filter(|&l| l != layer) {
        return Err(EngineError::InvalidRequest(format!("this SAE was trained on layer {l}, not on layer {layer}")));
    }
    if k == 0 || k > sae.info.d_sae {
        return Err(EngineError::InvalidRequest(format!("k = {k}: the SAE has {} latents", sae.info.d_sae)));
    }
    Ok(())
}

/// Finds the latents of `sae` (on `resid_post[layer]`) that encode `instruction`.
pub async fn discover<F, Fut>(
    engine: &mut Engine,
    sae: &Sae,
    layer: usize,
    instruction: &Instruction,
    options: &DiscoverOptions,
    mut progress: F,
) -> Result<Discovery, EngineError>
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = bool>,
{
    check_sae(engine, sae, layer, options.k)?;
    if !(options.tau >= 0.0 && options.tau <= 1.0) {
        return Err(EngineError::InvalidRequest(format!("tau = {}: a fraction between 0 and 1", options.tau)));
    }
    let style = PromptStyle::for_engine(engine);
    let contrast = read_contrast(engine, Some(sae), layer, instruction, options, &mut progress).await?;
    let diffmean = contrast.diffmean(layer)?;
    let latents = |r: &[Reading]| r.iter().map(|r| r.latents.clone()).collect::<Vec<_>>();
    let (pos, neg) = (latents(&contrast.positives), latents(&contrast.negatives));
    let ranked = by_delta(&statistics(&pos, &neg, sae.info.d_sae), options.tau);
    let candidates = ranked.len();
    let latents = match options.rank {
        Rank::Delta => ranked.into_iter().take(options.k).collect(),
        Rank::Output => {
            let pool: Vec<LatentStats> = ranked.into_iter().take(options.candidates.max(options.k)).collect();
            let mut scored =
                output_scores(engine, sae, layer, instruction, options, style, &diffmean, pool, &mut progress).await?;
            scored.sort_by(|a, b| {
                b.output_score.unwrap_or(f32::MIN).total_cmp(&a.output_score.unwrap_or(f32::MIN)).then(a.id.cmp(&b.id))
            });
            scored.truncate(options.k);
            scored
        }
    };
    Ok(Discovery {
        instruction: instruction.id.clone(),
        layer,
        options: options.clone(),
        positives: pos.len(),
        negatives: neg.len(),
        candidates,
        latents,
        diffmean,
    })
}

/// Scores each latent of `pool` by how much its decoder direction, added at every position of the negatives (at
/// the size of the difference-in-means vector, so every latent gets the same push), raises the mean per-token
/// log-likelihood of the answers the model gives when instructed.
#[allow(clippy::too_many_arguments)]
async fn output_scores<F, Fut>(
    engine: &mut Engine,
    sae: &Sae,
    layer: usize,
    instruction: &Instruction,
    options: &DiscoverOptions,
    style: PromptStyle,
    diffmean: &DiffMean,
    mut pool: Vec<LatentStats>,
    progress: &mut F,
) -> Result<Vec<LatentStats>, EngineError>
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = bool>,
{
    // The probes: a negative prompt followed by the answer the model gives to the positive one.
    let stop = match style {
        PromptStyle::Chat => engine.chat_stop_tokens(),
        PromptStyle::Plain => engine.stop_tokens(),
    };
    let generate_options = GenerateOptions {
        max_new_tokens: options.probe_tokens.max(1),
        sampling: Sampling::Greedy,
        stop_tokens: stop.clone(),
    };
    let contents = data::discovery_contents();
    let mut probes: Vec<(Vec<u32>, usize)> = Vec::new(); // (negative prompt + answer, answer start)
    for (i, content) in contents.iter().take(options.probes.max(1)).enumerate() {
        let phrasing = instruction.phrasing_for(i, &options.keyword);
        let with = data::prompt(engine, content, Some(&phrasing), options.placement, style)?;
        let answer = generate(engine.model.as_mut(), &with.ids, &generate_options, &Hooks::none(), |_| true).await?;
        let answer: Vec<u32> = answer.ids.into_iter().filter(|t| !stop.contains(t)).collect();
        if answer.is_empty() {
            continue;
        }
        let mut ids = data::prompt(engine, content, None, options.placement, style)?.ids;
        let start = ids.len();
        ids.extend(answer);
        probes.push((ids, start));
    }
    if probes.is_empty() {
        return Err(EngineError::InvalidRequest("the instructed model gave no answer to score latents by".into()));
    }
    let push = norm(&diffmean.difference);
    let base = answer_nll(engine, &probes, &Hooks::none()).await?;
    let total = pool.len();
    for (i, latent) in pool.iter_mut().enumerate() {
        report(progress, "scoring candidate latents by their effect on the answer", i, total).await?;
        let direction = crate::steer::with_norm(sae.decoder_row(latent.id), push);
        let steered = answer_nll(engine, &probes, &Hooks::none().add(layer, direction, Scope::All)).await?;
        latent.output_score = Some((base - steered) as f32);
    }
    Ok(pool)
}

/// The mean per-token negative log-likelihood of the answers of `probes` (token ids, answer start) under `hooks`.
async fn answer_nll(engine: &mut Engine, probes: &[(Vec<u32>, usize)], hooks: &Hooks) -> Result<f64, EngineError> {
    let (mut total, mut count) = (0f64, 0usize);
    let vocab = engine.config().vocab_size;
    for (ids, start) in probes {
        engine.model.reset();
        let out = engine.model.forward(ids, Segment::Prompt, hooks, LogitsWanted::All).await?;
        let all = out.all_logits.as_deref().unwrap_or_default();
        for p in *start..ids.len() {
            total += token_nll(&all[(p - 1) * vocab..p * vocab], ids[p]);
            count += 1;
        }
    }
    Ok(total / count.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three positives and two negatives over four latents, computed by hand.
    #[test]
    fn statistics_by_hand() {
        let positives = vec![vec![(0, 2.0), (1, 1.0)], vec![(0, 4.0)], vec![(0, 3.0), (2, 0.5)]];
        let negatives = vec![vec![(1, 1.0)], vec![(0, 1.0), (1, 3.0)]];
        let s = statistics(&positives, &negatives, 4);
        // Latent 0: fires on 3/3 positives (mean 3), 1/2 negatives (mean 0.5): delta 2.5.
        assert_eq!((s[0].freq_pos, s[0].mean_pos, s[0].freq_neg, s[0].mean_neg, s[0].delta), (1.0, 3.0, 0.5, 0.5, 2.5));
        // Latent 1: 1/3 positives (mean 1/3), 2/2 negatives (mean 2).
        assert!((s[1].freq_pos - 1.0 / 3.0).abs() < 1e-6 && (s[1].delta - (1.0 / 3.0 - 2.0)).abs() < 1e-6);
        // Latent 2: 1/3 positives (mean 1/6), never on negatives.
        assert!((s[2].mean_pos - 1.0 / 6.0).abs() < 1e-6 && s[2].freq_neg == 0.0);
        assert_eq!((s[3].freq_pos, s[3].delta), (0.0, 0.0));
        // tau 0.5 keeps latent 0 only; tau 0.3 adds latent 2 (latent 1 has a negative delta).
        assert_eq!(by_delta(&s, 0.5).iter().map(|l| l.id).collect::<Vec<_>>(), vec![0]);
        assert_eq!(by_delta(&s, 0.3).iter().map(|l| l.id).collect::<Vec<_>>(), vec![0, 2]);
    }
}

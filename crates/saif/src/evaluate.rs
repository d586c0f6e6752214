//! Evaluation: does a method make the model follow an instruction it was not given? Every method runs on the same
//! held-out contents with the same decoding, and every output is judged by the deterministic checkers (`check`).
//!
//! Methods (`Method`):
//! - `none`: the content alone, no steering (the floor);
//! - `prompt`: the instruction given in words, no steering (the ceiling a steering method is measured against);
//! - `diffmean`: the content alone, `h + alpha * d` with `d` the difference in means of last-token residuals
//!   (Stolfo et al.); `diffmean-project`: the projection onto `d / |d|` set to `alpha` times the positives' mean;
//! - `random`: k random latents of the SAE, scaled to the norm of SAIF's vector;
//! - `saif`: the k discovered latents, `h + alpha * sum_j c_j * W_dec[j]`, with `c_j` the latent's delta (by
//!   default) or its mean activation on positives (the paper's `abar_j`; `discover::Coefficient`).
//!
//! The steering methods get their statistics from the discovery contents only; the evaluation runs on held-out
//! contents (or a file of the caller's). Accuracies come with 95% Wilson intervals and fluency (`metrics`).

use std::future::Future;

use saif_engine::{generate_batch, Engine, EngineError, GenerateOptions, Sampling, Scope, SequenceRequest, StopReason};
use serde::{Deserialize, Serialize};

use crate::check::Check;
use crate::data::{self, Instruction, Placement, PromptStyle};
use crate::discover::{diffmean, discover, Coefficient, DiscoverOptions, Discovery, Rank, ReadAt};
use crate::metrics::{wilson, Fluency, FluencyMeter};
use crate::progress::{report, Progress};
use crate::sae::Sae;
use crate::steer::{latent_vector, random_latents, with_norm, DiffMean, Steering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    None,
    Prompt,
    Diffmean,
    DiffmeanProject,
    Random,
    Saif,
}

impl Method {
    pub const ALL: [Method; 6] =
        [Method::None, Method::Prompt, Method::Diffmean, Method::DiffmeanProject, Method::Random, Method::Saif];

    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Prompt => "prompt",
            Method::Diffmean => "diffmean",
            Method::DiffmeanProject => "diffmean-project",
            Method::Random => "random",
            Method::Saif => "saif",
        }
    }

    pub fn parse(s: &str) -> Result<Self, EngineError> {
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "unknown method \"{s}\"; one of {}",
                Method::ALL.map(|m| m.name()).join(", ")
            ))
        })
    }

    /// Whether the method steers (and so needs a layer and a strength).
    pub fn steers(self) -> bool {
        !matches!(self, Method::None | Method::Prompt)
    }

    /// Whether the method needs an SAE.
    pub fn needs_sae(self) -> bool {
        matches!(self, Method::Random | Method::Saif)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalOptions {
    pub method: Method,
    /// The layer steered (and read by the SAE).
    pub layer: usize,
    /// The steering strength (see the module doc for what it multiplies).
    pub alpha: f32,
    /// Latents steered with (`saif`, `random`).
    pub k: usize,
    /// Where the instruction goes for `prompt` and in discovery.
    pub placement: Placement,
    /// Where discovery reads the SAE.
    pub read_at: ReadAt,
    pub rank: Rank,
    /// What multiplies each latent's decoder row before alpha (`saif`).
    pub coefficient: Coefficient,
    /// Positions steered.
    pub scope: Scope,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// The draw of `random`'s latents.
    pub seed: u64,
    pub keyword: String,
    /// Discovery contents used for the statistics (all when larger).
    pub discovery_contents: usize,
}

impl EvalOptions {
    pub fn new(method: Method, layer: usize, alpha: f32, k: usize) -> Self {
        Self {
            method,
            layer,
            alpha,
            k,
            placement: Placement::After,
            read_at: ReadAt::LastToken,
            rank: Rank::Delta,
            coefficient: Coefficient::Delta,
            scope: Scope::All,
            max_new_tokens: 32,
            sampling: Sampling::Greedy,
            seed: 0,
            keyword: data::default_keyword().to_string(),
            discovery_contents: usize::MAX,
        }
    }

    pub fn discover_options(&self) -> DiscoverOptions {
        DiscoverOptions {
            placement: self.placement,
            read_at: self.read_at,
            k: self.k,
            rank: self.rank,
            keyword: self.keyword.clone(),
            contents: self.discovery_contents,
            ..DiscoverOptions::default()
        }
    }
}

/// One judged output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub content: String,
    pub output: String,
    pub strict: bool,
    pub loose: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub method: Method,
    pub instruction: String,
    pub layer: Option<usize>,
    pub alpha: Option<f32>,
    pub k: Option<usize>,
    pub n: usize,
    pub strict: f64,
    pub loose: f64,
    pub strict_ci: [f64; 2],
    pub loose_ci: [f64; 2],
    pub fluency: Fluency,
    /// The norm of the steering vector (of the projection's value for `diffmean-project`).
    pub steering_norm: f64,
    /// The latents steered with (`saif`, `random`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latents: Vec<usize>,
    pub samples: Vec<Sample>,
}

/// What the steering methods are built from: a discovery (`saif`, `random`) or difference-in-means statistics
/// (`diffmean*`), on the steered layer.
#[derive(Clone, Copy, Default)]
pub struct Statistics<'a> {
    pub discovery: Option<&'a Discovery>,
    pub diffmean: Option<&'a DiffMean>,
    pub sae: Option<&'a Sae>,
}

/// The steering a method applies, and the latents it uses.
pub fn steering(
    method: Method,
    stats: Statistics,
    options: &EvalOptions,
) -> Result<(Steering, Vec<usize>), EngineError> {
    let Statistics { discovery, diffmean, sae } = stats;
    let diffmean = diffmean.or(discovery.map(|d| &d.diffmean));
    let need = |what: &str| EngineError::InvalidRequest(format!("the {} method needs {what}", method.name()));
    if options.method.steers() && !options.alpha.is_finite() {
        return Err(EngineError::InvalidRequest(format!("alpha = {}: not a finite number", options.alpha)));
    }
    let (scope, layer) = (options.scope, options.layer);
    Ok(match method {
        Method::None | Method::Prompt => (Steering::None, vec![]),
        Method::Diffmean => {
            (diffmean.ok_or_else(|| need("difference-in-means statistics"))?.add(options.alpha, scope), vec![])
        }
        Method::DiffmeanProject => (
            diffmean.ok_or_else(|| need("difference-in-means statistics"))?.set_projection(options.alpha, scope)?,
            vec![],
        ),
        Method::Saif | Method::Random => {
            let (d, sae) = (discovery.ok_or_else(|| need("a discovery"))?, sae.ok_or_else(|| need("an SAE"))?);
            if d.latents.is_empty() {
                return Err(EngineError::InvalidRequest(format!(
                    "discovery found no latent that fires on at least {:.0}% of the positives with a positive delta",
                    100.0 * d.options.tau
                )));
            }
            let saif = latent_vector(sae, &d.strengths(options.coefficient), options.alpha)?;
            let ids: Vec<usize> = d.latents.iter().map(|l| l.id).collect();
            if method == Method::Saif {
                (Steering::Add { layer, vector: saif, scope }, ids)
            } else {
                let drawn = random_latents(sae.info.d_sae, ids.len(), options.seed, &ids);
                let ones: Vec<(usize, f32)> = drawn.iter().map(|&j| (j, 1.0)).collect();
                let v = with_norm(&latent_vector(sae, &ones, 1.0)?, crate::steer::norm(&saif));
                (Steering::Add { layer, vector: v, scope }, drawn)
            }
        }
    })
}

/// Answers whose fluency one call reads (`FluencyMeter::add_all`): the CPU reads them in one pass, each weight
/// decoded once for all of them; few enough that the progress line moves during a page's evaluation of 8 contents.
const FLUENCY_BATCH: usize = 4;

/// Runs `instruction` with `options.method` on `contents` and judges the outputs. Steering methods need their
/// `stats` (see `steering`); `run` gathers them and evaluates.
pub async fn evaluate<F, Fut>(
    engine: &mut Engine,
    instruction: &Instruction,
    contents: &[String],
    stats: Statistics<'_>,
    options: &EvalOptions,
    mut progress: F,
) -> Result<EvalReport, EngineError>
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = bool>,
{
    if contents.is_empty() {
        return Err(EngineError::InvalidRequest("no contents to evaluate on (the contents file is empty)".into()));
    }
    if options.max_new_tokens == 0 {
        return Err(EngineError::InvalidRequest("max-new-tokens must be at least 1".into()));
    }
    let (steer, latents) = steering(options.method, stats, options)?;
    let hooks = steer.hooks();
    hooks.validate(engine.config().n_layers, engine.config().hidden)?;
    let style = PromptStyle::for_engine(engine);
    let stop_tokens = match style {
        PromptStyle::Chat => engine.chat_stop_tokens(),
        PromptStyle::Plain => engine.stop_tokens(),
    };
    let generate_options = GenerateOptions {
        max_new_tokens: options.max_new_tokens,
        sampling: options.sampling,
        stop_tokens: stop_tokens.clone(),
    };
    let instruction_text = instruction.canonical(&options.keyword);
    let given = (options.method == Method::Prompt).then_some(instruction_text.as_str());
    let prompts = contents
        .iter()
        .map(|content| Ok(data::prompt(engine, content, given, options.placement, style)?.ids))
        .collect::<Result<Vec<_>, EngineError>>()?;
    let requests: Vec<SequenceRequest> =
        prompts.iter().map(|p| SequenceRequest { prompt: p, hooks: &hooks, options: &generate_options }).collect();
    let phase = format!("generating: {}", options.method.name());
    let total = contents.len() * options.max_new_tokens;
    let mut generated = 0;
    let generations = generate_batch(engine.model.as_mut(), &requests, |_, _| {
        generated += 1;
        progress(Progress { phase: phase.clone(), done: generated.min(total), total })
    })
    .await?;
    if generations.iter().any(|g| g.stop == StopReason::Cancelled) {
        return Err(EngineError::Stopped);
    }
    let answers: Vec<Vec<u32>> = generations
        .into_iter()
        .map(|generation| generation.ids.into_iter().filter(|t| !stop_tokens.contains(t)).collect())
        .collect();
    // The answers read again for their fluency, `FLUENCY_BATCH` at a time (together where the backend can).
    let mut fluency = FluencyMeter::default();
    for (i, batch) in answers.chunks(FLUENCY_BATCH).enumerate() {
        report(&mut progress, "measuring fluency", i * FLUENCY_BATCH, answers.len()).await?;
        fluency.add_all(engine, batch).await?;
    }
    let mut samples = Vec::with_capacity(contents.len());
    for (content, ids) in contents.iter().zip(&answers) {
        let output = engine.tokenizer.decode(ids)?;
        let verdict = Check::for_instruction(instruction, content, &options.keyword).judge(&output);
        samples.push(Sample { content: content.clone(), output, strict: verdict.strict, loose: verdict.loose });
    }
    let n = samples.len();
    let (strict, loose, strict_ci, loose_ci) = accuracies(&samples);
    let steers = options.method.steers();
    Ok(EvalReport {
        method: options.method,
        instruction: instruction.id.clone(),
        layer: steers.then_some(options.layer),
        alpha: steers.then_some(options.alpha),
        k: options.method.needs_sae().then_some(latents.len()),
        n,
        strict,
        loose,
        strict_ci,
        loose_ci,
        fluency: fluency.finish(),
        steering_norm: steer.norm(),
        latents,
        samples,
    })
}

/// Judges stored outputs of `instruction` again with today's checkers (for `include-word`, on `keyword`) and
/// returns how many samples changed verdict. Generation is deterministic, so this gives what a new run would,
/// without generating again.
pub fn judge_again(instruction: &str, samples: &mut [Sample], keyword: &str) -> Result<usize, EngineError> {
    let instruction = data::instruction(instruction)?;
    let mut changed = 0;
    for sample in samples {
        let verdict = Check::for_instruction(instruction, &sample.content, keyword).judge(&sample.output);
        changed += usize::from(verdict.strict != sample.strict || verdict.loose != sample.loose);
        (sample.strict, sample.loose) = (verdict.strict, verdict.loose);
    }
    Ok(changed)
}

/// Accuracies and their intervals from judged samples: (strict, loose, strict_ci, loose_ci).
pub fn accuracies(samples: &[Sample]) -> (f64, f64, [f64; 2], [f64; 2]) {
    let n = samples.len();
    let (strict, loose) = (samples.iter().filter(|s| s.strict).count(), samples.iter().filter(|s| s.loose).count());
    let share = |c: usize| if n == 0 { 0.0 } else { c as f64 / n as f64 };
    (share(strict), share(loose), wilson(strict, n), wilson(loose, n))
}

impl EvalReport {
    /// Judges the stored outputs again (`judge_again`) and sets the accuracies from the new verdicts. Returns how
    /// many samples changed verdict.
    pub fn judge_again(&mut self, keyword: &str) -> Result<usize, EngineError> {
        if self.samples.len() != self.n || self.n == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "the report holds {} samples for n = {}; only a report with every sample can be judged again",
                self.samples.len(),
                self.n
            )));
        }
        let changed = judge_again(&self.instruction, &mut self.samples, keyword)?;
        (self.strict, self.loose, self.strict_ci, self.loose_ci) = accuracies(&self.samples);
        Ok(changed)
    }
}

/// Gathers the statistics the method needs (a discovery, or difference-in-means) and evaluates.
pub async fn run<F, Fut>(
    engine: &mut Engine,
    instruction: &Instruction,
    contents: &[String],
    sae: Option<&Sae>,
    options: &EvalOptions,
    mut progress: F,
) -> Result<EvalReport, EngineError>
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = bool>,
{
    // Settings that would fail after a long discovery fail now.
    if options.method.steers() && !options.alpha.is_finite() {
        return Err(EngineError::InvalidRequest(format!("alpha = {}: not a finite number", options.alpha)));
    }
    if contents.is_empty() {
        return Err(EngineError::InvalidRequest("no contents to evaluate on (the contents file is empty)".into()));
    }
    let discover_options = options.discover_options();
    let (mut discovery, mut means) = (None, None);
    match options.method {
        Method::None | Method::Prompt => {}
        Method::Diffmean | Method::DiffmeanProject => {
            means = Some(diffmean(engine, options.layer, instruction, &discover_options, &mut progress).await?)
        }
        Method::Saif | Method::Random => {
            let sae = sae.ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "the {} method needs an SAE; none is loaded",
                    options.method.name()
                ))
            })?;
            discovery = Some(discover(engine, sae, options.layer, instruction, &discover_options, &mut progress).await?)
        }
    }
    let stats = Statistics { discovery: discovery.as_ref(), diffmean: means.as_ref(), sae };
    evaluate(engine, instruction, contents, stats, options, progress).await
}

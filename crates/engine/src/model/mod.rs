//! A language model with a KV cache, behind one interface for every backend.
//!
//! `cpu` runs the transformer with candle-core tensors (natively and in wasm); `crate::gpu` runs it with WGSL
//! kernels through wgpu. The three architectures share one transformer whose differences are fields of
//! `ModelConfig`. Calls return futures because a GPU's results arrive asynchronously in the browser (nothing may
//! block there); the CPU's futures are ready at once, and native callers wait with `block_on`.

mod activations;
pub mod cpu;
mod kv_cache;
pub mod value_sums;

use std::future::Future;
use std::pin::Pin;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::hooks::{Capture, Hooks, Segment};
use crate::likelihood;
use crate::sampler::{pick, Sampling};

/// Prompts a batching backend reads in one pass of `read_prompts` (the CPU's batch); callers that hand prompts
/// over in groups (discovery, between its progress reports) make groups of this size.
pub const PROMPTS_PER_READ: usize = 16;

/// A boxed future that may hold references and need not be `Send` (wasm futures are not).
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What one forward call returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Next-token logits after the last position of the call (`vocab_size` values).
    pub logits: Vec<f32>,
    /// Next-token logits after every position of the call, when asked for (row-major, positions x vocab).
    pub all_logits: Option<Vec<f32>>,
    /// The activations the read hooks asked for, in layer then position order.
    pub captures: Vec<Capture>,
}

/// What a forward call that also picks the next token returns.
#[derive(Debug, Clone)]
pub struct Picked {
    pub token: u32,
    pub captures: Vec<Capture>,
    /// The logits, where the backend had them on the CPU anyway (the GPU keeps them on the device).
    pub logits: Option<Vec<f32>>,
}

impl Picked {
    /// The token `sampler::pick` takes from a forward call's last logits (generation step `step`), with the call's
    /// captures and the logits kept.
    pub(crate) fn from_logits(out: StepOutput, sampling: &Sampling, step: u32) -> Self {
        Picked { token: pick(&out.logits, sampling, step), captures: out.captures, logits: Some(out.logits) }
    }
}

/// Figures a backend reports about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// GPU memory the model holds (weights, KV cache, scratch buffers).
    pub gpu_memory_bytes: Option<u64>,
    /// Compute dispatches recorded per decoded token.
    pub dispatches_per_token: Option<usize>,
    /// Batched decoding steps that ran as one call for all their sequences, since loading (a GPU runs steps whose
    /// hooks read or project one sequence at a time).
    pub batched_steps: Option<usize>,
}

/// What turns a residual vector into logits: the final norm's weights and the unembedding (the LM head, or the
/// tied embedding). SAE tools read latents through it (the logit lens, searching latents by token).
#[derive(Clone)]
pub struct Readout {
    pub unembedding: crate::quant::QuantMatrix,
    pub final_norm: Vec<f32>,
}

/// Which logits a forward call computes: the LM head is the largest matrix, so by default only the last row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsWanted {
    #[default]
    Last,
    All,
}

/// One sequence's part of a batched forward call: `tokens` run at the sequence's own positions, with its own
/// hooks, against its own KV cache.
#[derive(Clone, Copy)]
pub struct BatchCall<'a> {
    /// Which sequence (0..`batch_capacity()`); sequence 0 is the one `forward` runs.
    pub sequence: usize,
    pub tokens: &'a [u32],
    pub segment: Segment,
    pub hooks: &'a Hooks,
}

pub trait LanguageModel {
    fn config(&self) -> &ModelConfig;

    /// Tokens in the KV cache: the position the next token will take.
    fn position(&self) -> usize;

    /// The most tokens the cache may hold (the model's context, possibly capped at load time).
    fn max_context(&self) -> usize;

    /// Empties the KV cache.
    fn reset(&mut self);

    /// A short name of the backend ("cpu", "wgpu ...") for reports.
    fn backend_name(&self) -> String;

    /// What the backend holds and does per token, for benchmarks.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// Milliseconds spent per kernel (name, total ms, dispatches) in one forward call of `tokens`, where the
    /// backend can tell (the GPU backend, natively); `None` elsewhere.
    fn profile(&mut self, _tokens: &[u32]) -> Option<Result<Vec<(String, f64, usize)>>> {
        None
    }

    /// Runs `tokens` at positions `position()..position() + tokens.len()`, appends their keys and values to the
    /// cache and returns the logits after the last one, with the hooks applied.
    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        segment: Segment,
        hooks: &'a Hooks,
        logits: LogitsWanted,
    ) -> LocalBoxFuture<'a, Result<StepOutput>>;

    /// Runs `tokens` as a fresh prompt for what `hooks` read, and nothing else: no logits, and a backend may stop
    /// after the last layer the hooks touch (the CPU does). The model is reset before and after, since its cache
    /// is left incomplete. Discovery reads about 500 prompts this way, at one layer.
    fn read_prompt<'a>(&'a mut self, tokens: &'a [u32], hooks: &'a Hooks) -> LocalBoxFuture<'a, Result<Vec<Capture>>> {
        Box::pin(async move {
            self.reset();
            let out = self.forward(tokens, Segment::Prompt, hooks, LogitsWanted::Last).await;
            self.reset();
            Ok(out?.captures)
        })
    }

    /// `read_prompt` of several prompts, each with its own hooks: one list of captures per prompt, each equal to
    /// what `read_prompt` gives that prompt alone. A backend with batching reads them together (the CPU does, as
    /// sequences 0..n of one pass, which it resets before and after); the others read them one by one.
    fn read_prompts<'a>(
        &'a mut self,
        prompts: &'a [(&'a [u32], &'a Hooks)],
    ) -> LocalBoxFuture<'a, Result<Vec<Vec<Capture>>>> {
        Box::pin(async move {
            let mut all = Vec::with_capacity(prompts.len());
            for &(tokens, hooks) in prompts {
                all.push(self.read_prompt(tokens, hooks).await?);
            }
            Ok(all)
        })
    }

    /// For each prompt, read alone from an empty sequence without hooks (as `reset`, then `forward` with all
    /// positions' logits): `token_nll` of each token after the first, given the ones before it
    /// (`likelihood::next_token_nlls`). SAIF's fluency measure. The CPU reads several prompts in one pass and
    /// computes the values on its pass's threads, with the same numbers; the others read them one by one. Leaves
    /// sequence 0 empty (the CPU reads the prompts as its sequences 0..n, and leaves those empty, as `read_prompts`).
    fn next_token_nlls<'a>(&'a mut self, prompts: &'a [&'a [u32]]) -> LocalBoxFuture<'a, Result<Vec<Vec<f64>>>> {
        Box::pin(async move {
            let mut all = Vec::with_capacity(prompts.len());
            for &tokens in prompts {
                self.reset();
                let out = self.forward(tokens, Segment::Prompt, &Hooks::none(), LogitsWanted::All).await?;
                self.reset();
                let logits = out.all_logits.ok_or_else(|| EngineError::InvalidRequest("no logits".into()))?;
                all.push(likelihood::next_token_nlls(&logits, out.logits.len(), tokens));
            }
            Ok(all)
        })
    }

    /// The final norm and unembedding, where the backend keeps them on the CPU (both backends do).
    fn readout(&self) -> Option<Readout> {
        None
    }

    /// How many sequences a batched call may hold (1: the backend runs one sequence at a time).
    fn batch_capacity(&self) -> usize {
        1
    }

    /// Tokens sequence `sequence`'s cache holds (the GPU gives the sequences of a batch less than sequence 0).
    fn sequence_context(&self, _sequence: usize) -> usize {
        self.max_context()
    }

    /// Empties sequence `sequence`'s cache (`reset` empties sequence 0's).
    fn reset_sequence(&mut self, sequence: usize) {
        if sequence == 0 {
            self.reset();
        }
    }

    /// Tokens in sequence `sequence`'s cache.
    fn sequence_position(&self, sequence: usize) -> usize {
        if sequence == 0 {
            self.position()
        } else {
            0
        }
    }

    /// Runs one call for each of several distinct sequences at once and returns each call's logits after its last
    /// token (and its captures). Each row's numbers are those the sequence gets alone. Backends without batching
    /// take a single call on sequence 0.
    fn forward_batch<'a>(&'a mut self, calls: &'a [BatchCall<'a>]) -> LocalBoxFuture<'a, Result<Vec<StepOutput>>> {
        Box::pin(async move {
            match calls {
                [call] if call.sequence == 0 => {
                    Ok(vec![self.forward(call.tokens, call.segment, call.hooks, LogitsWanted::Last).await?])
                }
                _ => Err(EngineError::InvalidRequest(format!(
                    "the {} backend runs one sequence at a time",
                    self.backend_name()
                ))),
            }
        })
    }

    /// `forward_batch` for the last token of each call, then call i's next token picked from its logits with
    /// `picks[i]` (its sampling and generation step, see `sampler::pick`): the batched `forward_pick`, for
    /// generation loops that want only tokens. The CPU picks on its pass's threads and keeps the logits: picked one
    /// after another on the caller's thread, each from its own copy of its logits, the greedy picks alone were
    /// 0.8-1.1% of a batched SmolLM2 `--int8` step's samples in `perf record`, with the pass's threads idle.
    fn forward_batch_pick<'a>(
        &'a mut self,
        calls: &'a [BatchCall<'a>],
        picks: &'a [(Sampling, u32)],
    ) -> LocalBoxFuture<'a, Result<Vec<Picked>>> {
        Box::pin(async move {
            let outputs = self.forward_batch(calls).await?;
            Ok(outputs
                .into_iter()
                .zip(picks)
                .map(|(out, (sampling, step))| Picked::from_logits(out, sampling, *step))
                .collect())
        })
    }

    /// As `forward`, then picks the next token (generation step `step`, see `sampler`). A GPU backend does the
    /// picking on the device and reads back one token id instead of the logits.
    fn forward_pick<'a>(
        &'a mut self,
        tokens: &'a [u32],
        segment: Segment,
        hooks: &'a Hooks,
        sampling: Sampling,
        step: u32,
    ) -> LocalBoxFuture<'a, Result<Picked>> {
        Box::pin(async move {
            let out = self.forward(tokens, segment, hooks, LogitsWanted::Last).await?;
            Ok(Picked::from_logits(out, &sampling, step))
        })
    }
}

/// Checks a forward call before any work: tokens present and in the vocabulary, room in the cache, hooks that
/// fit the model. Every backend calls it.
pub(crate) fn check_request(
    config: &ModelConfig,
    position: usize,
    max_context: usize,
    tokens: &[u32],
    hooks: &Hooks,
) -> Result<()> {
    if tokens.is_empty() {
        return Err(EngineError::InvalidRequest("no tokens to run".into()));
    }
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(EngineError::InvalidRequest(format!(
            "token id {bad} is outside the vocabulary (size {})",
            config.vocab_size
        )));
    }
    let needed = position + tokens.len();
    if needed > max_context {
        return Err(EngineError::ContextOverflow { tokens: needed, context: max_context });
    }
    hooks.validate(config.n_layers, config.hidden)
}

/// Runs a future to completion on this thread (native only; the browser awaits instead).
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: Future>(future: F) -> F::Output {
    pollster::block_on(future)
}

//! A language model with a KV cache, behind one interface for every backend.
//!
//! `cpu` runs the transformer with candle-core tensors (natively and in wasm); the WebGPU backend implements the
//! same trait. The three architectures share one transformer whose differences are fields of `ModelConfig`.

pub mod cpu;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::hooks::{Capture, Hooks, Segment};

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

/// Which logits a forward call computes: the LM head is the largest matrix, so by default only the last row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsWanted {
    #[default]
    Last,
    All,
}

pub trait LanguageModel {
    fn config(&self) -> &ModelConfig;

    /// Tokens in the KV cache: the position the next token will take.
    fn position(&self) -> usize;

    /// The most tokens the cache may hold (the model's context, possibly capped at load time).
    fn max_context(&self) -> usize;

    /// Empties the KV cache.
    fn reset(&mut self);

    /// Runs `tokens` at positions `position()..position() + tokens.len()`, appends their keys and values to the
    /// cache and returns the logits after the last one, with the hooks applied.
    fn forward(
        &mut self,
        tokens: &[u32],
        segment: Segment,
        hooks: &Hooks,
        logits: LogitsWanted,
    ) -> Result<StepOutput>;

    /// A short name of the backend ("cpu", "wgpu") for reports.
    fn backend_name(&self) -> String;
}

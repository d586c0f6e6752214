//! The generation loop: prefill the prompt, then one token at a time until an end token or the limit, on any
//! backend, with hooks applied throughout.

use std::future::Future;

use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::hooks::{Capture, Hooks, Segment};
use crate::model::LanguageModel;
use crate::sampler::Sampling;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops after any of these (the GGUF's EOS; a chat also adds the end-of-turn token).
    pub stop_tokens: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token was generated (it is the last of `ids`).
    EndToken,
    /// `max_new_tokens` were generated.
    Limit,
    /// The caller's token callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated tokens only, a stop token included.
    pub ids: Vec<u32>,
    pub stop: StopReason,
    /// What the read hooks captured, prompt and generation.
    pub captures: Vec<Capture>,
    /// Next-token logits after the last prompt token, where the backend read them back (the CPU does).
    pub prompt_logits: Option<Vec<f32>>,
}

/// Generates from `prompt` (already tokenized, BOS included where the model wants it), starting from an empty
/// cache. `on_token` sees each new token as it comes and returns false to stop early.
pub async fn generate(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    options: &GenerateOptions,
    hooks: &Hooks,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    generate_async(model, prompt, options, hooks, |token| std::future::ready(on_token(token))).await
}

/// As `generate`, with a callback that may wait (a browser worker yields there so that a stop request can
/// arrive between tokens).
pub async fn generate_async<F: Future<Output = bool>>(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    options: &GenerateOptions,
    hooks: &Hooks,
    mut on_token: impl FnMut(u32) -> F,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    options.sampling.validate()?;
    // The last generated token is never fed back, so the cache needs prompt + max_new_tokens - 1 places.
    let needed = prompt.len() + options.max_new_tokens.saturating_sub(1);
    if needed > model.max_context() {
        return Err(EngineError::ContextOverflow { tokens: needed, context: model.max_context() });
    }
    model.reset();
    let mut ids = Vec::with_capacity(options.max_new_tokens);
    let mut captures = Vec::new();
    let mut prompt_logits = None;
    let mut stop = StopReason::Limit;
    let mut input = prompt.to_vec();
    let mut segment = Segment::Prompt;
    while ids.len() < options.max_new_tokens {
        let step = ids.len() as u32;
        let picked = model.forward_pick(&input, segment, hooks, options.sampling, step).await?;
        if segment == Segment::Prompt {
            prompt_logits = picked.logits;
        }
        captures.extend(picked.captures);
        let next = picked.token;
        ids.push(next);
        if !on_token(next).await {
            stop = StopReason::Cancelled;
            break;
        }
        if options.stop_tokens.contains(&next) {
            stop = StopReason::EndToken;
            break;
        }
        input = vec![next];
        segment = Segment::Generated;
    }
    Ok(Generation { ids, stop, captures, prompt_logits })
}

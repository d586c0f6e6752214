//! The generation loop: prefill the prompt, then one token at a time until an end token or the limit, on any
//! backend, with hooks applied throughout.

use std::future::Future;

use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::hooks::{Capture, Hooks, Segment};
use crate::model::{BatchCall, LanguageModel};
use crate::sampler::{pick, Sampling};

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

/// One sequence of a batched generation: its prompt, hooks and options.
#[derive(Clone, Copy)]
pub struct SequenceRequest<'a> {
    pub prompt: &'a [u32],
    pub hooks: &'a Hooks,
    pub options: &'a GenerateOptions,
}

/// Generates every request, several sequences per forward call where the backend batches
/// (`LanguageModel::batch_capacity`), one after the other where it does not. A sequence gets exactly the same
/// tokens, logits and captures whatever it is batched with (its rows are computed independently of the others';
/// `generate` may differ from it at near-ties, as its products sum in another order). `on_token(i, token)` sees
/// request i's tokens as they come and returns false to stop that sequence.
pub async fn generate_batch<F: Future<Output = bool>>(
    model: &mut dyn LanguageModel,
    requests: &[SequenceRequest<'_>],
    mut on_token: impl FnMut(usize, u32) -> F,
) -> Result<Vec<Generation>> {
    let capacity = model.batch_capacity();
    // A request longer than every sequence of a batch may hold runs alone, as all do then (sequence 0 holds the
    // whole context; the GPU gives the others less).
    let batch_context = (0..capacity).map(|s| model.sequence_context(s)).min().unwrap_or(0);
    let fits = requests.iter().all(|r| r.prompt.len() + r.options.max_new_tokens.saturating_sub(1) <= batch_context);
    if capacity < 2 || !fits {
        let mut out = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            out.push(generate_async(model, r.prompt, r.options, r.hooks, |t| on_token(i, t)).await?);
        }
        return Ok(out);
    }
    for r in requests {
        if r.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        r.options.sampling.validate()?;
        let needed = r.prompt.len() + r.options.max_new_tokens.saturating_sub(1);
        if needed > model.max_context() {
            return Err(EngineError::ContextOverflow { tokens: needed, context: model.max_context() });
        }
    }
    let mut out: Vec<Option<Generation>> = vec![None; requests.len()];
    let indices: Vec<usize> = (0..requests.len()).collect();
    for group in indices.chunks(capacity) {
        // State per sequence of the group: generated ids, captures, prompt logits, whether it goes on.
        let mut gens: Vec<Generation> = group
            .iter()
            .map(|_| Generation { ids: Vec::new(), stop: StopReason::Limit, captures: Vec::new(), prompt_logits: None })
            .collect();
        let mut running: Vec<bool> = group.iter().map(|&i| requests[i].options.max_new_tokens > 0).collect();
        // Prompts one at a time (each as it runs alone), then steps of one token per running sequence.
        for (slot, &i) in group.iter().enumerate() {
            model.reset_sequence(slot);
            if !running[slot] {
                continue;
            }
            let r = &requests[i];
            let call = [BatchCall { sequence: slot, tokens: r.prompt, segment: Segment::Prompt, hooks: r.hooks }];
            let step = model.forward_batch(&call).await?.pop().expect("one output per call");
            gens[slot].prompt_logits = Some(step.logits.clone());
            gens[slot].captures.extend(step.captures);
            let token = pick(&step.logits, &r.options.sampling, 0);
            running[slot] = accept(&mut gens[slot], token, r.options, on_token(i, token).await);
        }
        while running.iter().any(|&r| r) {
            let live: Vec<usize> = (0..group.len()).filter(|&s| running[s]).collect();
            let last: Vec<[u32; 1]> = live.iter().map(|&s| [*gens[s].ids.last().expect("a token")]).collect();
            let calls: Vec<BatchCall> = live
                .iter()
                .zip(&last)
                .map(|(&s, t)| BatchCall {
                    sequence: s,
                    tokens: t,
                    segment: Segment::Generated,
                    hooks: requests[group[s]].hooks,
                })
                .collect();
            let picks: Vec<(Sampling, u32)> =
                live.iter().map(|&s| (requests[group[s]].options.sampling, gens[s].ids.len() as u32)).collect();
            let steps = model.forward_batch_pick(&calls, &picks).await?;
            for (&slot, step) in live.iter().zip(steps) {
                let i = group[slot];
                gens[slot].captures.extend(step.captures);
                running[slot] = accept(&mut gens[slot], step.token, requests[i].options, on_token(i, step.token).await);
            }
        }
        for (slot, g) in gens.into_iter().enumerate() {
            out[group[slot]] = Some(g);
        }
    }
    Ok(out.into_iter().map(|g| g.expect("every request generated")).collect())
}

/// Records a sequence's new token; returns whether it goes on (not stopped by the caller, a stop token or the
/// limit).
fn accept(g: &mut Generation, token: u32, options: &GenerateOptions, keep_going: bool) -> bool {
    g.ids.push(token);
    if !keep_going {
        g.stop = StopReason::Cancelled;
        false
    } else if options.stop_tokens.contains(&token) {
        g.stop = StopReason::EndToken;
        false
    } else {
        g.ids.len() < options.max_new_tokens
    }
}

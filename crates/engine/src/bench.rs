//! Speed measurements shared by `saif bench` and the app's benchmark page: prefill and decode throughput, time to
//! first token, what the backend holds (GPU memory, dispatches per token), and the cost of active hooks. The
//! caller supplies the clock (`std::time::Instant` natively, `performance.now()` in a browser).

use serde::Serialize;

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::hooks::{Hooks, Positions, Scope, Segment};
use crate::model::BatchCall;
use crate::sampler::{pick, Sampling};

/// A paragraph of ordinary English, repeated to make prompts of any length.
const FILLER: &str = "The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing \
the rocky coast relied on its beam to find the harbour, and the village below slept soundly knowing that someone \
was watching over the sea. ";

#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct BenchSettings {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
    /// Also decode with a steering vector and a read hook on the last layer, to measure what hooks cost.
    pub with_hooks: bool,
    /// Also decode this many sequences at once (batched decoding), where the backend batches; 1: no.
    #[serde(default = "one")]
    pub batch: usize,
}

fn one() -> usize {
    1
}

impl Default for BenchSettings {
    fn default() -> Self {
        Self { prompt_tokens: 128, decode_tokens: 64, runs: 5, with_hooks: true, batch: 1 }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BenchResult {
    pub backend: String,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
    /// Medians over the runs.
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// From the start of prefill to the first generated token's id.
    pub time_to_first_token_ms: f64,
    pub prefill_tokens_per_s_runs: Vec<f64>,
    pub decode_tokens_per_s_runs: Vec<f64>,
    /// Decode with a steering vector added and the residual read at the last layer.
    pub decode_tokens_per_s_with_hooks: Option<f64>,
    /// How much slower decoding is with those hooks, in percent of the plain decode time.
    pub hooks_overhead_percent: Option<f64>,
    /// GPU memory the model holds (weights, KV cache, scratch); absent on the CPU.
    pub gpu_memory_bytes: Option<u64>,
    /// Compute dispatches recorded per decoded token; absent on the CPU.
    pub dispatches_per_token: Option<usize>,
    /// Sequences decoded at once for `batched_decode_tokens_per_s`.
    #[serde(default)]
    pub batch: Option<usize>,
    /// Tokens per second over all sequences when `batch` sequences decode together (median over the runs).
    #[serde(default)]
    pub batched_decode_tokens_per_s: Option<f64>,
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A prompt of exactly `tokens` tokens (BOS included where the model wants one).
pub fn bench_prompt(engine: &Engine, tokens: usize) -> Result<Vec<u32>> {
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < tokens {
        text.push_str(FILLER);
        ids = engine.tokenizer.encode_prompt(&text)?;
    }
    ids.truncate(tokens);
    Ok(ids)
}

/// Times `decode_tokens` greedy tokens after prefilling `prompt`; returns (time to first token, decode seconds).
async fn one_run(
    engine: &mut Engine,
    prompt: &[u32],
    decode_tokens: usize,
    hooks: &Hooks,
    now: &dyn Fn() -> f64,
) -> Result<(f64, f64)> {
    let model = engine.model.as_mut();
    model.reset();
    let t0 = now();
    let mut next = model.forward_pick(prompt, Segment::Prompt, hooks, Sampling::Greedy, 0).await?.token;
    let t1 = now();
    for step in 0..decode_tokens {
        next = model.forward_pick(&[next], Segment::Generated, hooks, Sampling::Greedy, step as u32 + 1).await?.token;
    }
    let t2 = now();
    Ok(((t1 - t0) / 1000.0, (t2 - t1) / 1000.0))
}

/// Times `decode_tokens` greedy steps of `batch` sequences decoding together after each prefilled `prompt`;
/// returns the seconds of the decoding steps.
async fn batched_run(
    engine: &mut Engine,
    prompt: &[u32],
    decode_tokens: usize,
    batch: usize,
    now: &dyn Fn() -> f64,
) -> Result<f64> {
    let model = engine.model.as_mut();
    let none = Hooks::none();
    let mut next = Vec::with_capacity(batch);
    for s in 0..batch {
        model.reset_sequence(s);
        let call = [BatchCall { sequence: s, tokens: prompt, segment: Segment::Prompt, hooks: &none }];
        next.push([pick(&model.forward_batch(&call).await?[0].logits, &Sampling::Greedy, 0)]);
    }
    let t0 = now();
    for _ in 0..decode_tokens {
        let calls: Vec<BatchCall> = next
            .iter()
            .enumerate()
            .map(|(s, t)| BatchCall { sequence: s, tokens: t, segment: Segment::Generated, hooks: &none })
            .collect();
        let picks = vec![(Sampling::Greedy, 1); batch];
        next = model.forward_batch_pick(&calls, &picks).await?.iter().map(|p| [p.token]).collect();
    }
    Ok((now() - t0) / 1000.0)
}

/// Runs the benchmark; `now` returns milliseconds.
pub async fn run(engine: &mut Engine, settings: &BenchSettings, now: &dyn Fn() -> f64) -> Result<BenchResult> {
    let BenchSettings { prompt_tokens, decode_tokens, runs, with_hooks, batch } = *settings;
    if prompt_tokens == 0 || runs == 0 {
        return Err(EngineError::InvalidRequest("the prompt length and the number of runs must be at least 1".into()));
    }
    let max = engine.model.max_context();
    if prompt_tokens + decode_tokens > max {
        return Err(EngineError::ContextOverflow { tokens: prompt_tokens + decode_tokens, context: max });
    }
    let prompt = bench_prompt(engine, prompt_tokens)?;
    let none = Hooks::none();
    // One untimed run compiles pipelines and warms caches.
    one_run(engine, &prompt, decode_tokens.min(2), &none, now).await?;
    let (mut prefill, mut decode, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    // Where batches are timed too, each run of one sequence is followed by a run of the batch, so that the ratio of
    // the two medians compares runs taken seconds apart, not minutes: on a shared machine whose speed drifts, the
    // ratio printed swung from 3.9x to 5.2x between calls when all single runs came first (docs/benchmarks.md).
    let batching = batch > 1 && decode_tokens > 0 && engine.model.batch_capacity() >= batch;
    let mut batched_speeds = Vec::new();
    for _ in 0..runs {
        let (first, rest) = one_run(engine, &prompt, decode_tokens, &none, now).await?;
        prefill.push(prompt_tokens as f64 / first);
        ttft.push(first * 1000.0);
        if decode_tokens > 0 {
            decode.push(decode_tokens as f64 / rest);
        }
        if batching {
            let seconds = batched_run(engine, &prompt, decode_tokens, batch, now).await?;
            batched_speeds.push((batch * decode_tokens) as f64 / seconds);
        }
    }
    let decode_median = median(&decode);
    let (with_hooks_speed, overhead) = if with_hooks && decode_tokens > 0 {
        let c = engine.config();
        let last = c.n_layers - 1;
        let vector: Vec<f32> = (0..c.hidden).map(|i| if i % 2 == 0 { 0.01 } else { -0.01 }).collect();
        let hooks = Hooks::none().add(last, vector, Scope::All).read(last, Positions::Last);
        let mut speeds = Vec::new();
        for _ in 0..runs {
            let (_, rest) = one_run(engine, &prompt, decode_tokens, &hooks, now).await?;
            speeds.push(decode_tokens as f64 / rest);
        }
        let hooked = median(&speeds);
        (Some(hooked), Some((decode_median / hooked - 1.0) * 100.0))
    } else {
        (None, None)
    };
    let batched = batching.then(|| median(&batched_speeds));
    let stats = engine.model.stats();
    Ok(BenchResult {
        backend: engine.model.backend_name(),
        prompt_tokens,
        decode_tokens,
        runs,
        prefill_tokens_per_s: median(&prefill),
        decode_tokens_per_s: decode_median,
        time_to_first_token_ms: median(&ttft),
        prefill_tokens_per_s_runs: prefill,
        decode_tokens_per_s_runs: decode,
        decode_tokens_per_s_with_hooks: with_hooks_speed,
        hooks_overhead_percent: overhead,
        gpu_memory_bytes: stats.gpu_memory_bytes,
        dispatches_per_token: stats.dispatches_per_token,
        batch: batched.map(|_| batch),
        batched_decode_tokens_per_s: batched,
    })
}

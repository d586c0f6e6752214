//! `saif bench`: prefill and decode throughput of a model on a backend, the median of several runs, with the
//! machine named so that figures from different machines are never mixed up.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use saif_engine::sampler::argmax;
use saif_engine::{block_on, Engine, Hooks, LogitsWanted, Segment};
use serde::Serialize;

/// A paragraph of ordinary English, repeated to make prompts of any length.
const FILLER: &str = "The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing \
the rocky coast relied on its beam to find the harbour, and the village below slept soundly knowing that someone \
was watching over the sea. ";

#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub logical_cores: usize,
    pub os: String,
}

#[derive(Serialize)]
pub struct BenchReport {
    pub model: String,
    pub backend: String,
    pub machine: Machine,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
    /// Median over runs.
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Median time from the start of prefill to the first token's logits.
    pub time_to_first_token_ms: f64,
    pub prefill_tokens_per_s_runs: Vec<f64>,
    pub decode_tokens_per_s_runs: Vec<f64>,
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        format!(
            "{} on {} ({}, {} logical cores)\nprefill {} tokens: {:.1} tokens/s (time to first token {:.1} ms)\ndecode {} tokens: {:.1} tokens/s\n(median of {} runs)",
            self.model,
            self.backend,
            self.machine.cpu,
            self.machine.logical_cores,
            self.prompt_tokens,
            self.prefill_tokens_per_s,
            self.time_to_first_token_ms,
            self.decode_tokens,
            self.decode_tokens_per_s,
            self.runs
        )
    }
}

pub fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    Machine {
        cpu,
        logical_cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        os: std::env::consts::OS.to_string(),
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(
    engine: &mut Engine,
    path: &Path,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
) -> Result<BenchReport> {
    ensure!(prompt_tokens > 0 && runs > 0, "--prompt-tokens and --runs must be at least 1");
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < prompt_tokens {
        text.push_str(FILLER);
        ids = engine.tokenizer.encode_prompt(&text)?;
    }
    ids.truncate(prompt_tokens);
    let hooks = Hooks::none();
    let model = engine.model.as_mut();
    ensure!(
        prompt_tokens + decode_tokens <= model.max_context(),
        "prompt plus decode tokens exceed the context of {}",
        model.max_context()
    );

    // One untimed run warms caches and allocations.
    model.reset();
    block_on(model.forward(&ids, Segment::Prompt, &hooks, LogitsWanted::Last))?;

    let (mut prefill, mut decode, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        model.reset();
        let t0 = Instant::now();
        let out = block_on(model.forward(&ids, Segment::Prompt, &hooks, LogitsWanted::Last))?;
        let dt = t0.elapsed().as_secs_f64();
        prefill.push(prompt_tokens as f64 / dt);
        ttft.push(dt * 1000.0);
        let mut next = argmax(&out.logits);
        let t1 = Instant::now();
        for _ in 0..decode_tokens {
            let out = block_on(model.forward(&[next], Segment::Generated, &hooks, LogitsWanted::Last))?;
            next = argmax(&out.logits);
        }
        if decode_tokens > 0 {
            decode.push(decode_tokens as f64 / t1.elapsed().as_secs_f64());
        }
    }
    Ok(BenchReport {
        model: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        backend: model.backend_name(),
        machine: machine(),
        prompt_tokens,
        decode_tokens,
        runs,
        prefill_tokens_per_s: median(&prefill),
        decode_tokens_per_s: if decode.is_empty() { 0.0 } else { median(&decode) },
        time_to_first_token_ms: median(&ttft),
        prefill_tokens_per_s_runs: prefill,
        decode_tokens_per_s_runs: decode,
    })
}

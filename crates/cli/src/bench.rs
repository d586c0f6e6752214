//! `saif bench`: the engine's benchmark (saif_engine::bench) with the machine named, so that figures from
//! different machines are never mixed up.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use saif_engine::bench::{BenchResult, BenchSettings};
use saif_engine::{block_on, Engine};
use serde::Serialize;

#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub logical_cores: usize,
    pub os: String,
}

#[derive(Serialize)]
pub struct BenchReport {
    pub model: String,
    pub machine: Machine,
    #[serde(flatten)]
    pub result: BenchResult,
    /// Where the time goes, per kernel, with `--profile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
}

/// Milliseconds per kernel for a prompt's forward and for one decode step.
#[derive(Serialize)]
pub struct Profile {
    pub prefill: Vec<KernelTime>,
    pub decode: Vec<KernelTime>,
}

#[derive(Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub ms: f64,
    pub dispatches: usize,
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        let r = &self.result;
        let mut s = format!(
            "{} on {} ({}, {} logical cores)\nprefill {} tokens: {:.1} tokens/s (time to first token {:.1} ms)\ndecode {} tokens: {:.1} tokens/s",
            self.model,
            r.backend,
            self.machine.cpu,
            self.machine.logical_cores,
            r.prompt_tokens,
            r.prefill_tokens_per_s,
            r.time_to_first_token_ms,
            r.decode_tokens,
            r.decode_tokens_per_s,
        );
        if let (Some(speed), Some(overhead)) = (r.decode_tokens_per_s_with_hooks, r.hooks_overhead_percent) {
            s +=
                &format!("\ndecode with a steering vector and a read hook: {speed:.1} tokens/s ({overhead:+.1}% time)");
        }
        if let (Some(batch), Some(speed)) = (r.batch, r.batched_decode_tokens_per_s) {
            s += &format!(
                "\ndecode {batch} sequences at once: {speed:.1} tokens/s in all ({:.1}x one sequence)",
                speed / r.decode_tokens_per_s
            );
        }
        if let Some(bytes) = r.gpu_memory_bytes {
            s += &format!("\nGPU memory held by the model: {:.1} MB", bytes as f64 / 1e6);
        }
        if let Some(d) = r.dispatches_per_token {
            s += &format!("\ndispatches per decoded token: {d}");
        }
        s += &format!("\n(median of {} runs)", r.runs);
        if let Some(p) = &self.profile {
            for (what, times) in [("prefill", &p.prefill), ("one decode step", &p.decode)] {
                let total: f64 = times.iter().map(|k| k.ms).sum();
                s += &format!("\nwhere the time goes, {what} (each dispatch timed alone, {total:.1} ms in all):");
                for k in times {
                    s += &format!(
                        "\n  {:>8.2} ms {:>5.1}%  {} ({} dispatches)",
                        k.ms,
                        100.0 * k.ms / total,
                        k.kernel,
                        k.dispatches
                    );
                }
            }
        }
        s
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

pub fn run(engine: &mut Engine, path: &Path, settings: &BenchSettings) -> Result<BenchReport> {
    let start = Instant::now();
    let now = move || start.elapsed().as_secs_f64() * 1000.0;
    let result = block_on(saif_engine::bench::run(engine, settings, &now))?;
    Ok(BenchReport {
        model: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        machine: machine(),
        result,
        profile: None,
    })
}

/// Times each kernel of a `prompt_tokens` forward, then of one decode step after it.
pub fn profile(engine: &mut Engine, prompt_tokens: usize) -> Result<Profile> {
    let prompt = saif_engine::bench::bench_prompt(engine, prompt_tokens)?;
    let model = engine.model.as_mut();
    let to_times = |v: Vec<(String, f64, usize)>| {
        v.into_iter().map(|(kernel, ms, dispatches)| KernelTime { kernel, ms, dispatches }).collect()
    };
    model.reset();
    let prefill = model.profile(&prompt).ok_or_else(|| anyhow::anyhow!("--profile needs --backend wgpu"))??;
    // Fill the cache with the prompt, then profile one token after it.
    model.reset();
    block_on(model.forward(&prompt, saif_engine::Segment::Prompt, &saif_engine::Hooks::none(), Default::default()))?;
    let decode = model.profile(&prompt[..1]).expect("the same backend")?;
    Ok(Profile { prefill: to_times(prefill), decode: to_times(decode) })
}

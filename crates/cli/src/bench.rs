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
        if let Some(bytes) = r.gpu_memory_bytes {
            s += &format!("\nGPU memory held by the model: {:.1} MB", bytes as f64 / 1e6);
        }
        if let Some(d) = r.dispatches_per_token {
            s += &format!("\ndispatches per decoded token: {d}");
        }
        s + &format!("\n(median of {} runs)", r.runs)
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
    })
}

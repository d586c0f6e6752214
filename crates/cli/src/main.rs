//! `saif`: the engine from the command line, for batch experiments and for checking the engine against
//! references. Every command prints one JSON object with `--json` (text without it) and exits non-zero with a
//! message on stderr on error.

mod bench;
mod method;
mod sae;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its place in the `mi_option_e` of mimalloc 3 (which `libmimalloc-sys`
/// builds) and 2, for which `libmimalloc-sys` has no constant.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc 3's default purge delay in milliseconds.
const DEFAULT_PURGE_DELAY: std::ffi::c_long = 1000;

/// Keeps the memory of freed blocks for reuse instead of handing it back to the kernel after mimalloc's default
/// delay (a second): a pass frees its outputs and allocates them again every few milliseconds, and each page handed
/// back was zeroed again by the kernel when next touched (on a `saif bench --int8 --batch 16` of SmolLM2, 3,442 page
/// faults against 739 with purging off, and 4.3% of the batched steps' samples in `perf record` zeroing pages). The
/// memory held stays what the largest step needed. Left alone where `MIMALLOC_PURGE_DELAY` set it otherwise.
fn keep_freed_memory() {
    // SAFETY: reads and sets one of mimalloc's options, which it reads whenever it would purge.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == DEFAULT_PURGE_DELAY {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use saif_engine::bench::BenchSettings;
use saif_engine::gpu::Gpu;
use saif_engine::sampler::top_candidates;
use saif_engine::{block_on, Engine, GenerateOptions, Hooks, LoadOptions, LogitsWanted, Positions, Sampling, Segment};
use serde_json::json;

#[derive(Parser)]
#[command(name = "saif", version, about = "SAIF in the browser: the inference engine from the command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Use an SAE even where it records another model than the one loaded (its shape must still fit).
    #[arg(long, global = true)]
    any_model: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Token ids of a text (no BOS added).
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        text: String,
    },
    /// Next-token logits after a prompt, and residual-stream norms at the last prompt token.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// How many of the highest logits to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Layers whose resid_post to report, e.g. 0,5,11,17.
        #[arg(long, value_delimiter = ',')]
        resid: Vec<usize>,
    },
    /// Generates a continuation of a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Wrap the prompt in the model's chat template and stop at the end of the answer's turn.
        #[arg(long)]
        chat: bool,
    },
    /// Prefill and decode speed (median of several runs).
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt length for the prefill measurement.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens decoded one at a time after the prompt.
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Skip the decode run with a steering vector and a read hook.
        #[arg(long)]
        no_hooks: bool,
        /// Also time each GPU kernel of a prompt's forward and of one decode step (wgpu only).
        #[arg(long)]
        profile: bool,
        /// Also decode this many sequences at once (batched decoding), and report their total tokens/s.
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// The GGUF's metadata and the model's shape.
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Speed of SAE training steps (`train-sae`'s inner loop) on random activations; needs no model.
    BenchTrain {
        /// Width of the activations (SmolLM2-135M: 576, Gemma 3 270M: 640, Gemma 2 2B: 2304).
        #[arg(long, default_value_t = 576)]
        d: usize,
        /// Latents.
        #[arg(long, default_value_t = 2304)]
        width: usize,
        #[arg(long, default_value_t = 32)]
        k: usize,
        #[arg(long, default_value_t = 1024)]
        batch: usize,
        /// Timed steps (after one untimed step); the median is reported.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        /// Also time each GPU kernel of one step (wgpu only).
        #[arg(long)]
        profile: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Trains a TopK SAE on resid_post of a layer (or several: --layer 20,29 writes DIR/layer_20, DIR/layer_29).
    TrainSae {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_delimiter = ',', required = true)]
        layer: Vec<usize>,
        /// Latents: one number for every layer, or one per layer (`--width 2560,4096`).
        #[arg(long, value_delimiter = ',', required = true)]
        width: Vec<usize>,
        /// Active latents per token: one number for every layer, or one per layer.
        #[arg(long, value_delimiter = ',', default_value = "32")]
        k: Vec<usize>,
        /// Training tokens (activations collected from the corpus).
        #[arg(long, default_value_t = 300_000)]
        tokens: usize,
        #[arg(long)]
        out: PathBuf,
        /// One text per line ("[chat] " lines are wrapped in the chat template); default: make corpus's.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Passes over the activations: one number for every layer, or one per layer.
        #[arg(long, value_delimiter = ',', default_value = "4")]
        epochs: Vec<usize>,
        #[arg(long, default_value_t = 1024)]
        batch: usize,
        #[arg(long, default_value_t = 4e-4)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Store the weights in f32 (default f16).
        #[arg(long)]
        f32: bool,
    },
    /// Measures an SAE on held-out text: FVU, L0, dead latents, next-token loss recovered.
    SaeEval {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        choice: SaeChoice,
        /// Held-out text, one text per line.
        #[arg(long)]
        contents: PathBuf,
    },
    /// Writes lens.json beside an SAE: each latent's top logit-lens tokens (what the app shows for a latent).
    SaeLens {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        sae: PathBuf,
        #[arg(long, default_value_t = 8)]
        top: usize,
    },
    /// Records the model's fingerprint in an SAE folder's config (for SAEs trained elsewhere): other models refuse
    /// the SAE from then on, unless --any-model. Also records the residual norm at its layer (the page's scale).
    SaeStamp {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        sae: PathBuf,
    },
    /// What a latent means: its logit-lens tokens and where it fires most in a corpus.
    SaeLatent {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        choice: SaeChoice,
        /// The latent's index in the SAE.
        #[arg(long)]
        latent: usize,
        /// Texts to search for the strongest activations (one per line).
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// How many lines of the corpus to search.
        #[arg(long, default_value_t = 400)]
        lines: usize,
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// The latents that encode an instruction: SAIF's discovery on the built-in discovery contents.
    Discover {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        choice: SaeChoice,
        #[command(flatten)]
        saif: SaifArgs,
        /// Latents to keep (default: the recorded best for this model and instruction).
        #[arg(long)]
        k: Option<usize>,
        /// Keep latents firing on at least this fraction of the positives.
        #[arg(long, default_value_t = 0.5)]
        tau: f32,
    },
    /// Steers (or prompts) the model on held-out contents and checks whether it follows the instruction.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        choice: SaeChoice,
        #[command(flatten)]
        saif: SaifArgs,
        /// none, prompt, diffmean, diffmean-project, random or saif.
        #[arg(long)]
        method: String,
        #[arg(long)]
        k: Option<usize>,
        /// Steering strength (default: the recorded best for this model, instruction and method).
        #[arg(long, allow_negative_numbers = true)]
        alpha: Option<f32>,
        /// One content per line (default: the built-in held-out contents).
        #[arg(long)]
        contents: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// The draw of the random baseline's latents.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Positions steered: all, prompt or generated.
        #[arg(long, default_value = "all")]
        scope: String,
    },
    /// Varies one setting (alpha, k, layer or placement) for several methods; writes JSON, CSV and an SVG chart.
    Sweep {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        choice: SaeChoice,
        #[command(flatten)]
        saif: SaifArgs,
        /// alpha, k, layer or placement.
        #[arg(long)]
        param: String,
        /// The values swept, e.g. 0.5,1,2,4 or 1,5,15,30 or after,before.
        #[arg(long, value_delimiter = ',', required = true, allow_hyphen_values = true)]
        values: Vec<String>,
        /// Methods compared at every value.
        #[arg(long, value_delimiter = ',', default_value = "saif,diffmean,random")]
        methods: Vec<String>,
        #[arg(long)]
        k: Option<usize>,
        #[arg(long, allow_negative_numbers = true)]
        alpha: Option<f32>,
        /// Difference-in-means' strength where alpha is not what is swept.
        #[arg(long, allow_negative_numbers = true)]
        diffmean_alpha: Option<f32>,
        /// The contents evaluated: heldout (default) or discovery (for tuning), or a file (one per line).
        #[arg(long, default_value = "heldout")]
        on: String,
        /// Use the first N of them.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder for sweep-<instruction>-<param>.{json,csv,svg}.
        #[arg(long)]
        out: PathBuf,
    },
    /// The results table: every method on every instruction with the recorded settings (JSON, CSV, markdown).
    Table {
        #[command(flatten)]
        model: ModelArgs,
        /// Instructions (default: all six).
        #[arg(long, value_delimiter = ',')]
        instructions: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "none,prompt,diffmean,diffmean-project,random,saif")]
        methods: Vec<String>,
        /// The contents: heldout (default) or a file (one per line).
        #[arg(long, default_value = "heldout")]
        on: String,
        /// Use the first N of them.
        #[arg(long)]
        limit: Option<usize>,
        /// Discovery contents the statistics are read on (default: all 240).
        #[arg(long)]
        discovery_contents: Option<usize>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Judges the answers stored in results files again with today's checkers and rewrites their accuracies in
    /// place (after a checker changes; the answers themselves, greedy and seeded, would not).
    Rejudge {
        /// Reports of `saif eval --json`, and the JSON of `saif sweep` and `saif table` (their CSV, chart and
        /// markdown beside them are rewritten too).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The keyword of `include-word` reports (default: the built-in one).
        #[arg(long)]
        keyword: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Generates from a prompt twice from the same seed: as it is, and steered with SAE latents.
    Steer {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        choice: SaeChoice,
        /// ID:STRENGTH[,ID:STRENGTH...]: each latent's coefficient on its decoder row.
        #[arg(long, allow_hyphen_values = true)]
        latent: String,
        /// Multiplies every strength.
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        mult: f32,
        /// Positions steered: all, prompt or generated.
        #[arg(long, default_value = "all")]
        scope: String,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template and stop at the end of the answer's turn.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
}

/// What a SAIF command works on: the instruction and how its prompts are built and read.
#[derive(Args)]
struct SaifArgs {
    /// translate-fr, translate-es, translate-de, summarize, include-word or uppercase.
    #[arg(long)]
    instruction: String,
    /// Where the instruction goes: after or before the content.
    #[arg(long, default_value = "after")]
    placement: String,
    /// How discovery ranks latents: delta (SAIF) or output (their effect on the instructed answer).
    #[arg(long, default_value = "delta")]
    rank: String,
    /// Where the SAE reads each prompt: last (token) or after-instruction (every token after it, averaged).
    #[arg(long, default_value = "last")]
    read_at: String,
    /// The word include-word asks for (default: the first built-in keyword).
    #[arg(long)]
    keyword: Option<String>,
    /// Discovery contents the statistics are read on (default: all 240).
    #[arg(long)]
    discovery_contents: Option<usize>,
    /// What multiplies each SAIF latent's decoder row before alpha: delta (its mean difference between positives
    /// and negatives) or mean (its mean activation on positives, the paper's).
    #[arg(long, default_value = "delta")]
    coefficient: String,
}

impl SaifArgs {
    fn placement(&self) -> Result<saif::data::Placement> {
        Ok(saif::data::Placement::parse(&self.placement)?)
    }

    fn rank(&self) -> Result<saif::discover::Rank> {
        Ok(saif::discover::Rank::parse(&self.rank)?)
    }

    fn read_at(&self) -> Result<saif::discover::ReadAt> {
        match self.read_at.as_str() {
            "last" => Ok(saif::discover::ReadAt::LastToken),
            "after-instruction" => Ok(saif::discover::ReadAt::AfterInstruction),
            other => bail!("--read-at {other}: last or after-instruction"),
        }
    }
}

fn parse_scope(s: &str) -> Result<saif_engine::Scope> {
    match s {
        "all" => Ok(saif_engine::Scope::All),
        "prompt" => Ok(saif_engine::Scope::Prompt),
        "generated" => Ok(saif_engine::Scope::Generated),
        other => bail!("--scope {other}: all, prompt or generated"),
    }
}

/// Which SAE an SAE command works on.
#[derive(Args)]
struct SaeChoice {
    /// An SAE folder (default: the model's shipped SAE).
    #[arg(long)]
    sae: Option<PathBuf>,
    /// The layer (default: the SAE's own; for shipped SAEs the last shipped layer).
    #[arg(long)]
    layer: Option<usize>,
}

#[derive(Args)]
struct ModelArgs {
    /// A GGUF file (default: the offline Gemma 3 270M in $SAIF_MODELS or ~/.cache/saif/models).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// CPU: round the activations to 8 bits and multiply in integers, as llama.cpp does, in prompts and decoding
    /// (faster, not exact; docs/benchmarks.md measures the departure from the exact products).
    #[arg(long)]
    int8: bool,
    /// Keep the KV cache in f16, as llama.cpp does (half the bytes for attention to read; not exact,
    /// docs/benchmarks.md measures the departure). On wgpu, with `shader-f16` where the adapter has it.
    #[arg(long)]
    f16_cache: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Cpu,
    Wgpu,
}

#[derive(Args)]
struct SamplingArgs {
    /// Always take the most likely token (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn sampling(&self) -> Result<Sampling> {
        match self.temperature {
            None if self.top_p.is_some() || self.top_k.is_some() => {
                bail!("--top-p and --top-k need --temperature")
            }
            None => Ok(Sampling::Greedy),
            Some(t) => Ok(Sampling::Random { temperature: t, top_k: self.top_k, top_p: self.top_p, seed: self.seed }),
        }
    }
}

fn default_model() -> PathBuf {
    let dir = std::env::var_os("SAIF_MODELS").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/saif/models")
    });
    dir.join("gemma-3-270m-q4_k_m.gguf")
}

impl ModelArgs {
    fn path(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model)
    }

    fn load(&self) -> Result<Engine> {
        Ok(self.load_with_gpu()?.0)
    }

    /// The engine, and with `--backend wgpu` the GPU it runs on (for other work on the same device).
    fn load_with_gpu(&self) -> Result<(Engine, Option<Rc<Gpu>>)> {
        let path = self.path();
        let file = File::open(&path).with_context(|| open_hint(&path))?;
        let reader = &mut BufReader::new(file);
        let gpu = match self.backend {
            Backend::Cpu => None,
            Backend::Wgpu => Some(Rc::new(block_on(Gpu::new())?)),
        };
        if self.int8 && gpu.is_some() {
            bail!("--int8 is a CPU mode; the GPU path computes exact products");
        }
        let options = LoadOptions { int8_activations: self.int8, f16_cache: self.f16_cache, ..Default::default() };
        let loaded = match &gpu {
            None => Engine::load_cpu(reader, &options),
            Some(gpu) => block_on(Engine::load_wgpu(reader, &options, Some(gpu.clone()))),
        };
        Ok((loaded.with_context(|| format!("cannot load {}", path.display()))?, gpu))
    }
}

fn open_hint(path: &Path) -> String {
    if path == default_model() {
        format!("cannot open {} (the offline default; run `make setup` to fetch it, or pass --model)", path.display())
    } else {
        format!("cannot open {}", path.display())
    }
}

fn print(json_mode: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json_mode {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

fn run(cli: Cli) -> Result<()> {
    sae::allow_other_models(cli.any_model);
    match cli.command {
        Command::Tokenize { model, text } => {
            let engine = model.load()?;
            let ids = engine.tokenizer.encode(&text)?;
            print(model.json, json!({ "ids": ids }), || {
                ids.iter()
                    .map(|&id| format!("{id}\t{:?}", engine.tokenizer.token_text(id).unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Logits { model, prompt, top, resid } => {
            let mut engine = model.load()?;
            let ids = engine.tokenizer.encode_prompt(&prompt)?;
            let hooks = resid.iter().fold(Hooks::none(), |h, &l| h.read(l, Positions::Last));
            engine.model.reset();
            let out = block_on(engine.model.forward(&ids, Segment::Prompt, &hooks, LogitsWanted::Last))?;
            let best = top_candidates(&out.logits, Some(top));
            let norms: BTreeMap<usize, f64> = out
                .captures
                .iter()
                .map(|c| (c.layer, c.values.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()))
                .collect();
            let value = json!({
                "input_ids": ids,
                "top": best.iter().map(|&(id, logit)| json!({
                    "id": id, "logit": logit, "token": engine.tokenizer.token_text(id),
                })).collect::<Vec<_>>(),
                "resid_post": norms.iter().map(|(l, n)| (l.to_string(), json!({ "norm": n })))
                    .collect::<serde_json::Map<_, _>>(),
            });
            print(model.json, value, || {
                let mut s = format!("input ids: {ids:?}\n");
                for (id, logit) in &best {
                    s +=
                        &format!("{id:>8} {logit:>10.4}  {:?}\n", engine.tokenizer.token_text(*id).unwrap_or_default());
                }
                for (l, n) in &norms {
                    s += &format!("resid_post[{l}] norm {n:.4}\n");
                }
                s.trim_end().to_string()
            });
        }
        Command::Generate { model, prompt, max_new_tokens, sampling, chat } => {
            let mut engine = model.load()?;
            let text = if chat { engine.chat.render(&prompt, None) } else { prompt };
            let ids = engine.tokenizer.encode_prompt(&text)?;
            let stop_tokens = if chat { engine.chat_stop_tokens() } else { engine.stop_tokens() };
            let options = GenerateOptions { max_new_tokens, sampling: sampling.sampling()?, stop_tokens };
            let generation =
                block_on(saif_engine::generate(engine.model.as_mut(), &ids, &options, &Hooks::none(), |_| true))?;
            let text = engine.tokenizer.decode(&generation.ids)?;
            print(model.json, json!({ "ids": generation.ids, "text": text }), || text.clone());
        }
        Command::Bench { model, prompt_tokens, decode_tokens, runs, no_hooks, profile, batch } => {
            let path = model.path();
            let mut engine = model.load()?;
            let settings = BenchSettings { prompt_tokens, decode_tokens, runs, with_hooks: !no_hooks, batch };
            let mut report = bench::run(&mut engine, &path, &settings)?;
            let capacity = engine.model.batch_capacity();
            if batch > capacity {
                eprintln!(
                    "note: {batch} sequences at once were not timed: {} runs at most {capacity} at once (wgpu on an \
                     adapter that is a CPU program runs one; SAIF_GPU_BATCH=1 makes it batch)",
                    engine.model.backend_name()
                );
            }
            if profile {
                report.profile = Some(bench::profile(&mut engine, prompt_tokens)?);
            }
            print(model.json, serde_json::to_value(&report)?, || report.to_text());
        }
        Command::BenchTrain { d, width, k, batch, steps, backend, profile, json } => {
            if k == 0 || k > width || steps == 0 || batch == 0 || d == 0 {
                bail!("--k must be between 1 and --width, and --steps, --batch and --d at least 1");
            }
            let gpu = match backend {
                Backend::Cpu => None,
                Backend::Wgpu => Some(block_on(Gpu::new())?),
            };
            let mut config = saif::train::TrainConfig::new(width, k);
            config.batch = batch;
            let timing = saif::train::time_steps(gpu.as_ref(), d, &config, steps, profile)?;
            let machine = bench::machine();
            let value = json!({
                "machine": format!("{}, {} logical cores", machine.cpu, machine.logical_cores),
                "d": d, "width": width, "k": k, "batch": batch,
                "timing": timing,
            });
            print(json, value, || {
                let mut s = format!(
                    "{}: {:.1} ms per step ({} x {d} activations, {width} latents, k {k}), {:.0} tokens/s\n",
                    timing.device, timing.ms_per_step, batch, timing.tokens_per_second
                );
                for (name, ms) in timing.kernels.iter().flatten() {
                    s += &format!("{ms:>10.2} ms  {name}\n");
                }
                s
            });
        }
        Command::TrainSae { model, layer, width, k, tokens, out, corpus, epochs, batch, lr, seed, f32 } => {
            // With --backend wgpu the activations are collected and the SAE trained on the GPU.
            let (mut engine, gpu) = model.load_with_gpu()?;
            let args = sae::TrainArgs {
                layers: layer,
                width,
                k,
                tokens,
                out,
                corpus: corpus.unwrap_or_else(sae::default_corpus),
                epochs,
                batch,
                lr,
                seed,
                store_f32: f32,
            };
            let value = sae::train_sae(&mut engine, gpu.as_deref(), &args)?;
            print(model.json, value.clone(), || serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        Command::SaeEval { model, choice: SaeChoice { sae, layer }, contents } => {
            let mut engine = model.load()?;
            let (eval, path) = sae::sae_eval(&mut engine, sae.as_deref(), layer, &contents)?;
            let mut value = serde_json::to_value(&eval)?;
            value["sae"] = json!(path.display().to_string());
            print(model.json, value, || {
                format!(
                    "{} at layer {}: FVU {:.3}, L0 {:.1}, dead {:.1}%, loss clean {:.3} / with the SAE {:.3} / layer zeroed {:.3}: {:.1}% recovered ({} tokens of {} texts)",
                    path.display(), eval.layer, eval.fvu, eval.l0, 100.0 * eval.dead_fraction, eval.ce_loss_clean,
                    eval.ce_loss_sae, eval.ce_loss_zero, 100.0 * eval.ce_recovered, eval.tokens, eval.texts
                )
            });
        }
        Command::SaeLens { model, sae, top } => {
            let path = model.path();
            let engine = model.load()?;
            let value = sae::write_lens(&engine, &path, &sae, top)?;
            print(model.json, value.clone(), || serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        Command::SaeStamp { model, sae } => {
            let mut engine = model.load()?;
            let value = sae::stamp(&mut engine, &sae)?;
            print(model.json, value.clone(), || serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        Command::SaeLatent { model, choice: SaeChoice { sae, layer }, latent, corpus, lines, top } => {
            let path = model.path();
            let mut engine = model.load()?;
            let value =
                sae::sae_latent(&mut engine, &path, sae.as_deref(), layer, latent, corpus.as_deref(), lines, top)?;
            print(model.json, value.clone(), || serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        Command::Discover { model, choice, saif, k, tau } => {
            let path = model.path();
            let mut engine = model.load()?;
            let args = method::DiscoverArgs {
                instruction: saif.instruction.clone(),
                discovery_contents: saif.discovery_contents,
                sae: choice.sae,
                layer: choice.layer,
                k,
                tau,
                placement: saif.placement()?,
                rank: saif.rank()?,
                read_at: saif.read_at()?,
                keyword: saif.keyword.clone(),
            };
            let value = method::discover_cmd(&mut engine, &path, &args)?;
            print(model.json, value.clone(), || {
                let mut s = format!(
                    "layer {}: {} latents of {} candidates\n",
                    value["layer"],
                    value["latents"].as_array().map_or(0, Vec::len),
                    value["candidates"]
                );
                for l in value["latents"].as_array().into_iter().flatten() {
                    s += &format!(
                        "{:>6}  freq {:.2}/{:.2}  mean {:.2}/{:.2}  delta {:.2}  {}\n",
                        l["id"],
                        l["freq_pos"].as_f64().unwrap_or(0.0),
                        l["freq_neg"].as_f64().unwrap_or(0.0),
                        l["mean_pos"].as_f64().unwrap_or(0.0),
                        l["mean_neg"].as_f64().unwrap_or(0.0),
                        l["delta"].as_f64().unwrap_or(0.0),
                        l["top_tokens"]
                    );
                }
                s.trim_end().to_string()
            });
        }
        Command::Eval { model, choice, saif, method: m, k, alpha, contents, max_new_tokens, seed, scope } => {
            let mut engine = model.load()?;
            let instruction = saif::data::instruction(&saif.instruction)?;
            let args = method::EvalArgs {
                instruction: saif.instruction.clone(),
                method: saif::evaluate::Method::parse(&m)?,
                sae: choice.sae,
                layer: choice.layer,
                k,
                alpha,
                contents,
                max_new_tokens,
                seed,
                placement: saif.placement()?,
                rank: saif.rank()?,
                read_at: saif.read_at()?,
                scope: parse_scope(&scope)?,
                keyword: saif.keyword.clone(),
                coefficient: saif::discover::Coefficient::parse(&saif.coefficient)?,
                discovery_contents: saif.discovery_contents,
            };
            let report = method::eval_cmd(&mut engine, &args)?;
            print(model.json, serde_json::to_value(&report)?, || method::eval_text(&report, instruction));
        }
        Command::Sweep {
            model,
            choice,
            saif,
            param,
            values,
            methods,
            k,
            alpha,
            diffmean_alpha,
            on,
            limit,
            max_new_tokens,
            seed,
            out,
        } => {
            let mut engine = model.load()?;
            let mut contents: Vec<String> = match on.as_str() {
                "heldout" => saif::data::heldout_contents().into_iter().map(String::from).collect(),
                "discovery" => saif::data::discovery_contents().into_iter().map(String::from).collect(),
                file => method::contents(Some(Path::new(file)))?,
            };
            contents.truncate(limit.unwrap_or(usize::MAX));
            let args = method::SweepArgs {
                instruction: saif.instruction.clone(),
                param: saif::sweep::Param::parse(&param)?,
                values,
                methods: methods.iter().map(|m| saif::evaluate::Method::parse(m)).collect::<Result<_, _>>()?,
                sae: choice.sae,
                layer: choice.layer,
                k,
                alpha,
                diffmean_alpha,
                contents,
                max_new_tokens,
                seed,
                placement: saif.placement()?,
                rank: saif.rank()?,
                read_at: saif.read_at()?,
                coefficient: saif::discover::Coefficient::parse(&saif.coefficient)?,
                keyword: saif.keyword.clone(),
                discovery_contents: saif.discovery_contents,
                out,
            };
            let value = method::sweep_cmd(&mut engine, &args)?;
            print(model.json, value.clone(), || {
                let mut s = String::new();
                for r in value["rows"].as_array().into_iter().flatten() {
                    s += &format!(
                        "{} = {:>6}  {:<16} loose {:>5.1}%  strict {:>5.1}%  perplexity {:>8.1}  repetition {:.2}\n",
                        r["param"].as_str().unwrap_or(""),
                        r["value"].as_str().unwrap_or(""),
                        r["method"].as_str().unwrap_or(""),
                        100.0 * r["loose"].as_f64().unwrap_or(0.0),
                        100.0 * r["strict"].as_f64().unwrap_or(0.0),
                        r["perplexity"].as_f64().unwrap_or(0.0),
                        r["repetition"].as_f64().unwrap_or(0.0)
                    );
                }
                s + &format!("files: {}", value["files"])
            });
        }
        Command::Table { model, instructions, methods, on, limit, discovery_contents, max_new_tokens, seed, out } => {
            let mut engine = model.load()?;
            let mut contents: Vec<String> = match on.as_str() {
                "heldout" => saif::data::heldout_contents().into_iter().map(String::from).collect(),
                file => method::contents(Some(Path::new(file)))?,
            };
            contents.truncate(limit.unwrap_or(usize::MAX));
            let instructions = if instructions.is_empty() {
                saif::data::instruction_ids().into_iter().map(String::from).collect()
            } else {
                instructions
            };
            let args = method::TableArgs {
                instructions,
                methods: methods.iter().map(|m| saif::evaluate::Method::parse(m)).collect::<Result<_, _>>()?,
                contents,
                discovery_contents,
                max_new_tokens,
                seed,
                out,
            };
            let value = method::table_cmd(&mut engine, &args)?;
            let rows: Vec<saif::sweep::SweepRow> = serde_json::from_value(value["rows"].clone())?;
            print(model.json, value, || method::markdown_table(&rows));
        }
        Command::Rejudge { files, keyword, json } => {
            let keyword = keyword.unwrap_or_else(|| saif::data::default_keyword().to_string());
            let judged = files.iter().map(|f| method::rejudge(f, &keyword)).collect::<Result<Vec<_>>>()?;
            print(json, json!({ "judged": judged }), || {
                judged
                    .iter()
                    .flat_map(|j| j["points"].as_array().cloned().unwrap_or_default())
                    .map(|p| {
                        format!(
                            "{}: {} verdicts changed, loose {} -> {}",
                            p["point"], p["changed"], p["loose_before"], p["loose"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Steer { model, choice, latent, mult, scope, prompt, chat, max_new_tokens, sampling } => {
            let mut engine = model.load()?;
            let args = method::SteerArgs {
                latents: method::parse_latents(&latent)?,
                sae: choice.sae,
                layer: choice.layer,
                multiplier: mult,
                scope: parse_scope(&scope)?,
                prompt,
                chat,
                max_new_tokens,
                sampling: sampling.sampling()?,
            };
            let value = method::steer_cmd(&mut engine, &args)?;
            print(model.json, value.clone(), || {
                format!("default: {}\nsteered: {}", value["default"]["text"], value["steered"]["text"])
            });
        }
        Command::Info { model } => {
            let engine = model.load()?;
            let config = engine.config();
            let metadata: serde_json::Map<_, _> = engine.metadata.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            let value = json!({ "config": config, "chat_template": engine.chat, "metadata": metadata });
            print(model.json, value, || {
                engine.metadata.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join("\n")
            });
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saif: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `MI_OPTION_PURGE_DELAY` is an option that holds the purge delay's default, and `keep_freed_memory` turns
    /// purging off (-1). Fails where a newer mimalloc moved the option.
    #[test]
    fn freed_memory_is_kept() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one of mimalloc's options.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(get(), DEFAULT_PURGE_DELAY);
        keep_freed_memory();
        assert_eq!(get(), -1);
    }
}

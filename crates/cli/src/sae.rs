//! The SAE commands of `saif`: train-sae, sae-eval, sae-latent.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use saif::corpus::{collect, read_lines};
use saif::eval::{evaluate, SaeEval};
use saif::lens::{top_firings, LogitLens};
use saif::train::{train_on, TrainConfig};
use saif::{defaults, residual_norm, Sae, StoreAs};
use saif_engine::gpu::Gpu;
use saif_engine::{block_on, Engine, ModelFingerprint};
use serde_json::{json, Value};

/// A one-line progress display on stderr, redrawn in place.
pub struct Progress {
    last: Instant,
    enabled: bool,
}

impl Progress {
    pub fn new() -> Self {
        Self { last: Instant::now(), enabled: true }
    }

    pub fn show(&mut self, done: usize, total: usize, what: &str) {
        if !self.enabled || (self.last.elapsed().as_millis() < 200 && done < total) {
            return;
        }
        self.last = Instant::now();
        let width = 30;
        let filled = (done * width / total.max(1)).min(width);
        eprint!(
            "\r[{}{}] {:>3}% {what}\x1b[K",
            "#".repeat(filled),
            " ".repeat(width - filled),
            done * 100 / total.max(1)
        );
        if done >= total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

pub fn default_corpus() -> PathBuf {
    let cache = std::env::var_os("SAIF_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/saif"));
    cache.join("corpus/train.txt")
}

/// Collected activations kept on disk (`~/.cache/saif/activations`), so that training again on the same model,
/// corpus, layers and token count (another width, another seed, a crash) skips the slowest step.
struct ActivationCache {
    files: Vec<PathBuf>,
}

impl ActivationCache {
    fn new(model_key: &str, lines: &[String], layers: &[usize], tokens: usize) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in lines.iter().flat_map(|l| l.bytes().chain([b'\n'])) {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let dir = default_corpus().parent().and_then(Path::parent).map(|c| c.join("activations")).unwrap_or_default();
        let name =
            |l: usize| format!("{model_key}-{h:016x}-{tokens}-{}-layer{l}.f32", saif::corpus::MAX_TOKENS_PER_TEXT);
        Self { files: layers.iter().map(|&l| dir.join(name(l))).collect() }
    }

    fn describe(&self) -> String {
        self.files.first().and_then(|f| f.parent()).map(|d| d.display().to_string()).unwrap_or_default()
    }

    fn load(&self, d: usize) -> Option<saif::corpus::Activations> {
        let mut rows = Vec::new();
        for f in &self.files {
            let bytes = std::fs::read(f).ok()?;
            rows.push(
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<f32>>(),
            );
        }
        let n = rows.first()?.len() / d;
        let layers = self.files.iter().map(|f| {
            let name = f.file_stem()?.to_str()?;
            name.rsplit("layer").next()?.parse().ok()
        });
        let layers: Option<Vec<usize>> = layers.collect();
        Some(saif::corpus::Activations { layers: layers?, d, rows, origin: vec![(0, 0); n] })
    }

    /// Best effort: a cache that cannot be written only costs time next run.
    fn save(&self, acts: &saif::corpus::Activations) {
        for (f, rows) in self.files.iter().zip(&acts.rows) {
            let _ = f.parent().map(std::fs::create_dir_all);
            let bytes: Vec<u8> = rows.iter().flat_map(|x| x.to_le_bytes()).collect();
            let tmp = f.with_extension("partial");
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, f);
            }
        }
    }
}

pub struct TrainArgs {
    pub layers: Vec<usize>,
    /// One per layer, or one for all.
    pub width: Vec<usize>,
    /// One per layer, or one for all.
    pub k: Vec<usize>,
    pub tokens: usize,
    pub out: PathBuf,
    pub corpus: PathBuf,
    /// One per layer, or one for all.
    pub epochs: Vec<usize>,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub store_f32: bool,
}

/// Collects activations with `engine` and trains on `gpu` when given (the engine's own device), else on the CPU.
pub fn train_sae(engine: &mut Engine, gpu: Option<&Gpu>, args: &TrainArgs) -> Result<Value> {
    let config = engine.config().clone();
    if args.layers.is_empty() {
        bail!("--layer names no layer");
    }
    for &l in &args.layers {
        if l >= config.n_layers {
            bail!("layer {l} does not exist: the model has layers 0..{}", config.n_layers - 1);
        }
    }
    let per_layer = |values: &[usize], flag: &str| -> Result<Vec<usize>> {
        match values.len() {
            1 => Ok(vec![values[0]; args.layers.len()]),
            n if n == args.layers.len() => Ok(values.to_vec()),
            n => bail!("--{flag} gives {n} values for {} layers: give one, or one per layer", args.layers.len()),
        }
    };
    let widths = per_layer(&args.width, "width")?;
    let epochs = per_layer(&args.epochs, "epochs")?;
    let ks = per_layer(&args.k, "k")?;
    if widths.iter().zip(&ks).any(|(&w, &k)| k == 0 || k > w) {
        bail!("--k must be between 1 and --width");
    }
    if epochs.contains(&0) {
        bail!("--epochs must be at least 1");
    }
    let lines = read_lines(&args.corpus).with_context(|| {
        format!("cannot read the corpus {} (make corpus writes the default one)", args.corpus.display())
    })?;
    let started = Instant::now();
    let cache = ActivationCache::new(&config.key, &lines, &args.layers, args.tokens);
    let acts = match cache.load(config.hidden) {
        Some(acts) => {
            eprintln!("activations from the cache {}", cache.describe());
            acts
        }
        None => {
            let mut bar = Progress::new();
            let acts = block_on(collect(engine, &lines, &args.layers, args.tokens, |rows, texts| {
                let rate = rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
                bar.show(
                    rows,
                    args.tokens,
                    &format!("activations: {rows} tokens from {texts} texts, {rate:.0} tokens/s"),
                );
            }))?;
            cache.save(&acts);
            acts
        }
    };
    let collect_seconds = started.elapsed().as_secs_f64();
    if acts.is_empty() {
        bail!("the corpus gave no tokens");
    }
    let machine = crate::bench::machine();
    let trained_on = gpu.map_or_else(|| "cpu".to_string(), |g| format!("wgpu {}", g.describe()));
    let mut reports = Vec::new();
    for (slot, &layer) in acts.layers.iter().enumerate() {
        let out = if args.layers.len() == 1 { args.out.clone() } else { args.out.join(format!("layer_{layer}")) };
        std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
        let slot_in_args = args.layers.iter().position(|&l| l == layer).unwrap_or(slot);
        let (width, epochs, k) = (widths[slot_in_args], epochs[slot_in_args], ks[slot_in_args]);
        let mut train_config = TrainConfig::new(width, k);
        train_config.epochs = epochs;
        train_config.batch = args.batch;
        train_config.lr = args.lr;
        train_config.seed = args.seed;
        let t0 = Instant::now();
        let mut bar = Progress::new();
        let checkpoint = out.join("checkpoint.safetensors");
        let (mut sae, report) = train_on(gpu, &acts.rows[slot], acts.d, &train_config, Some(&checkpoint), |s| {
            bar.show(
                s.step,
                s.steps,
                &format!("layer {layer}: step {}/{} fvu {:.3} dead {}", s.step, s.steps, s.fvu, s.dead),
            );
            true
        })?;
        let train_seconds = t0.elapsed().as_secs_f64();
        sae.info.layer = Some(layer);
        sae.info.model = Some(config.key.clone());
        sae.info.trained_on = Some(engine.fingerprint.clone());
        sae.info.extra = json!({
            "model_file": config.name,
            "training": {
                "tokens": report.tokens,
                "steps": report.steps,
                "epochs": epochs,
                "batch": args.batch,
                "lr": args.lr,
                "seed": args.seed,
                "width": width,
                "k": k,
                "corpus": args.corpus.display().to_string(),
                "skipped": "the first position of every text (attention sink)",
                "final_batch_fvu": report.final_batch_fvu,
                "resumed_from_step": report.resumed_from_step,
                "activation_seconds": collect_seconds,
                "training_seconds": train_seconds,
                "backend": engine.model.backend_name(),
                "trained_on": trained_on.clone(),
                "machine": format!("{}, {} logical cores", machine.cpu, machine.logical_cores),
                "trainer": "saif train-sae (TopK, AuxK, Adam; crates/saif/src/train/)",
            }
        });
        sae.save_dir(&out, if args.store_f32 { StoreAs::F32 } else { StoreAs::F16 })?;
        reports.push(json!({
            "layer": layer,
            "out": out.display().to_string(),
            "tokens": report.tokens,
            "steps": report.steps,
            "final_batch_fvu": report.final_batch_fvu,
            "activation_seconds": collect_seconds,
            "training_seconds": train_seconds,
            "trained_on": trained_on,
        }));
    }
    Ok(json!({ "saes": reports }))
}

/// The SAE to use: `--sae DIR`, or the model's shipped one (its last layer unless `layer` names another).
/// Set once from `--any-model`: SAEs that record another model are used anyway (their shape must still fit).
static ANY_MODEL: AtomicBool = AtomicBool::new(false);

pub fn allow_other_models(yes: bool) {
    ANY_MODEL.store(yes, Ordering::Relaxed);
}

/// Reads an SAE folder to use with `engine`'s model, refusing one that records another model unless `--any-model`.
pub fn load_for(engine: &Engine, dir: &Path) -> Result<Sae> {
    load_for_model(&engine.fingerprint, dir)
}

/// As `load_for`, for the model with this fingerprint.
pub fn load_for_model(model: &ModelFingerprint, dir: &Path) -> Result<Sae> {
    let sae = Sae::load_dir(dir).with_context(|| format!("cannot load the SAE in {}", dir.display()))?;
    // A width that does not fit is refused first, --any-model or not: no flag makes such an SAE usable.
    sae.check_fits(model.hidden, model.layers, 0)?;
    if !ANY_MODEL.load(Ordering::Relaxed) {
        sae.check_model(model)
            .with_context(|| format!("the SAE in {} (pass --any-model to use it anyway)", dir.display()))?;
    }
    Ok(sae)
}

/// Records `engine`'s model in an SAE folder's config (`config.json` or SAELens' `cfg.json`), for SAEs trained
/// elsewhere, so that other models refuse it from then on, and the residual norm at the SAE's layer, so that the
/// page attaches it without running the model. Only the config is rewritten.
pub fn stamp(engine: &mut Engine, dir: &Path) -> Result<Value> {
    let sae = Sae::load_dir(dir).with_context(|| format!("cannot load the SAE in {}", dir.display()))?;
    let config = engine.config();
    sae.check_fits(config.hidden, config.n_layers, sae.info.layer.unwrap_or(0))?;
    let path =
        ["config.json", "cfg.json"].iter().map(|f| dir.join(f)).find(|p| p.exists()).unwrap_or(dir.join("config.json"));
    let mut value: Value = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))?,
        Err(_) => json!({}),
    };
    value["model_fingerprint"] = json!(engine.fingerprint);
    let residual_norm = match sae.info.layer {
        Some(layer) => {
            let mean = block_on(residual_norm::measure(engine, layer))?;
            residual_norm::record(&mut value, layer, mean);
            Some(mean)
        }
        None => None,
    };
    std::fs::write(&path, serde_json::to_string_pretty(&value)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(json!({
        "config": path.display().to_string(),
        "model_fingerprint": engine.fingerprint,
        "residual_norm": residual_norm,
    }))
}

pub fn resolve_sae(engine: &Engine, sae: Option<&Path>, layer: Option<usize>) -> Result<(Sae, usize, PathBuf)> {
    let config = engine.config();
    let (path, shipped_layer) = match sae {
        Some(p) => (p.to_path_buf(), None),
        None => {
            let (l, p) = defaults::find(&config.key, layer).with_context(|| {
                let have: Vec<usize> = defaults::shipped(&config.key).into_iter().map(|x| x.0).collect();
                format!(
                    "no shipped SAE for {}{} (shipped layers: {have:?}); pass --sae DIR",
                    config.key,
                    layer.map(|l| format!(" at layer {l}")).unwrap_or_default()
                )
            })?;
            (p, Some(l))
        }
    };
    let sae = load_for(engine, &path)?;
    let layer = layer.or(shipped_layer).or(sae.info.layer).context("the SAE does not say its layer; pass --layer")?;
    sae.check_fits(config.hidden, config.n_layers, layer)?;
    Ok((sae, layer, path))
}

pub fn sae_eval(
    engine: &mut Engine,
    sae: Option<&Path>,
    layer: Option<usize>,
    contents: &Path,
) -> Result<(SaeEval, PathBuf)> {
    let (sae, layer, path) = resolve_sae(engine, sae, layer)?;
    let lines = read_lines(contents).with_context(|| format!("cannot read {}", contents.display()))?;
    let mut bar = Progress::new();
    let eval = block_on(evaluate(engine, &sae, layer, &lines, |done, total| bar.show(done, total, "evaluating")))?;
    Ok((eval, path))
}

/// One argument per flag of `saif sae latent`, as `main` parses them.
#[allow(clippy::too_many_arguments)]
pub fn sae_latent(
    engine: &mut Engine,
    gguf_path: &Path,
    sae: Option<&Path>,
    layer: Option<usize>,
    latent: usize,
    corpus: Option<&Path>,
    lines: usize,
    top: usize,
) -> Result<Value> {
    let (sae, layer, path) = resolve_sae(engine, sae, layer)?;
    if latent >= sae.info.d_sae {
        bail!("latent {latent} does not exist: the SAE has {} latents", sae.info.d_sae);
    }
    let lens = LogitLens::from_gguf(&mut BufReader::new(File::open(gguf_path)?))?;
    let tokens: Vec<Value> = lens.top_tokens(&sae, &[latent], top)?[0]
        .iter()
        .map(|&(id, logit)| json!({ "id": id, "token": engine.tokenizer.decode(&[id]).unwrap_or_default(), "logit": logit }))
        .collect();
    let firings = match corpus {
        Some(c) => {
            let text = read_lines(c).with_context(|| format!("cannot read {}", c.display()))?;
            let take = &text[..lines.min(text.len())];
            block_on(top_firings(engine, &sae, layer, latent, take, top))?
        }
        None => Vec::new(),
    };
    Ok(json!({
        "sae": path.display().to_string(),
        "layer": layer,
        "latent": latent,
        "logit_lens": tokens,
        "top_activations": firings,
    }))
}

/// Writes `lens.json` into the SAE folder: for every latent, its `top` logit-lens tokens as text.
pub fn write_lens(engine: &Engine, gguf_path: &Path, sae_dir: &Path, top: usize) -> Result<Value> {
    let sae = load_for(engine, sae_dir)?;
    let config = engine.config();
    sae.check_fits(config.hidden, config.n_layers, sae.info.layer.unwrap_or(0))?;
    let lens = LogitLens::from_gguf(&mut BufReader::new(File::open(gguf_path)?))?;
    let all: Vec<usize> = (0..sae.info.d_sae).collect();
    let tokens: Vec<Vec<String>> = lens
        .top_tokens(&sae, &all, top)?
        .iter()
        .map(|t| t.iter().map(|&(id, _)| engine.tokenizer.decode(&[id]).unwrap_or_default()).collect())
        .collect();
    let value =
        json!({ "about": "each latent's top tokens through the logit lens (saif sae-lens)", "top_tokens": tokens });
    let path = sae_dir.join("lens.json");
    std::fs::write(&path, serde_json::to_string(&value)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(json!({ "lens": path.display().to_string(), "latents": sae.info.d_sae }))
}

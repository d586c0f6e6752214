//! The SAIF commands of `saif`: discover, eval, steer (and sweep, in `sweep`). Each is a thin call into
//! `saif::{discover, evaluate, steer}` with the defaults the repository records (`saif::defaults::steering`).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use saif::data::{self, Instruction, Placement};
use saif::discover::{discover, Coefficient, DiscoverOptions, Discovery, Rank, ReadAt};
use saif::evaluate::{self, EvalOptions, EvalReport, Method};
use saif::lens::LogitLens;
use saif::progress::Progress as Step;
use saif::steer::{latent_vector, Steering};
use saif::{defaults, Sae};
use saif_engine::{block_on, generate_batch, Engine, GenerateOptions, Sampling, Scope, SequenceRequest};
use serde_json::{json, Value};

use crate::sae::{resolve_sae, Progress};

/// A progress bar on stderr for the SAIF tasks (never stops them).
pub fn bar() -> impl FnMut(Step) -> std::future::Ready<bool> {
    let mut bar = Progress::new();
    move |s: Step| {
        bar.show(s.done, s.total, &s.phase);
        std::future::ready(true)
    }
}

/// The steering settings for a model and instruction: the flags where given, else the recorded defaults, else
/// the model's last shipped SAE layer, alpha 1 and 15 latents.
pub struct Settings {
    pub layer: Option<usize>,
    pub alpha: f32,
    pub diffmean_alpha: f32,
    pub k: usize,
    /// Where the values came from, for the report.
    pub source: &'static str,
}

pub fn settings(
    engine: &Engine,
    instruction: &str,
    layer: Option<usize>,
    alpha: Option<f32>,
    k: Option<usize>,
) -> Settings {
    match defaults::steering(&engine.config().key, instruction) {
        Some(d) => Settings {
            layer: layer.or(Some(d.layer)),
            alpha: alpha.unwrap_or(d.alpha),
            diffmean_alpha: alpha.unwrap_or(d.diffmean_alpha),
            k: k.unwrap_or(d.k),
            source: "crates/saif/data/steering.json",
        },
        None => Settings {
            layer,
            alpha: alpha.unwrap_or(1.0),
            diffmean_alpha: alpha.unwrap_or(1.0),
            k: k.unwrap_or(15),
            source: "built-in fallback (no sweep recorded for this model)",
        },
    }
}

/// The SAE for a SAIF command: `--sae DIR` (with `--layer`, or the layer it says), or the shipped one at `layer`.
pub fn sae_for(engine: &Engine, sae: Option<&Path>, layer: Option<usize>) -> Result<(Sae, usize, PathBuf)> {
    let (sae, at, path) = resolve_sae(engine, sae, layer)?;
    if let Some(trained) = sae.info.layer.filter(|&l| l != at) {
        bail!("the SAE in {} was trained on layer {trained}, not layer {at}", path.display());
    }
    Ok((sae, at, path))
}

/// Each kept latent's logit-lens tokens: from the SAE folder's lens.json, or computed from the model file.
fn fill_top_tokens(engine: &Engine, gguf: &Path, sae: &Sae, sae_dir: &Path, discovery: &mut Discovery) -> Result<()> {
    let from_file = std::fs::read(sae_dir.join("lens.json"))
        .ok()
        .and_then(|b| saif::lens::read_lens_json(&b, sae.info.d_sae).map_err(|e| eprintln!("{e}; computing it")).ok());
    match from_file {
        Some(tokens) => discovery.latents.iter_mut().for_each(|l| l.top_tokens = tokens[l.id].clone()),
        None => {
            let lens = LogitLens::from_gguf(&mut BufReader::new(File::open(gguf)?))?;
            let ids: Vec<usize> = discovery.latents.iter().map(|l| l.id).collect();
            for (l, top) in discovery.latents.iter_mut().zip(lens.top_tokens(sae, &ids, 8)?) {
                l.top_tokens = top.iter().map(|&(id, _)| engine.tokenizer.decode(&[id]).unwrap_or_default()).collect();
            }
        }
    }
    Ok(())
}

pub struct DiscoverArgs {
    pub instruction: String,
    pub discovery_contents: Option<usize>,
    pub sae: Option<PathBuf>,
    pub layer: Option<usize>,
    pub k: Option<usize>,
    pub tau: f32,
    pub placement: Placement,
    pub rank: Rank,
    pub read_at: ReadAt,
    pub keyword: Option<String>,
}

pub fn discover_cmd(engine: &mut Engine, gguf: &Path, args: &DiscoverArgs) -> Result<Value> {
    let instruction = data::instruction(&args.instruction)?;
    let s = settings(engine, &instruction.id, args.layer, None, args.k);
    let (sae, layer, dir) = sae_for(engine, args.sae.as_deref(), s.layer)?;
    let options = DiscoverOptions {
        placement: args.placement,
        read_at: args.read_at,
        tau: args.tau,
        k: s.k,
        rank: args.rank,
        keyword: args.keyword.clone().unwrap_or_else(|| data::default_keyword().into()),
        contents: args.discovery_contents.unwrap_or(usize::MAX),
        ..DiscoverOptions::default()
    };
    let started = Instant::now();
    let mut discovery = block_on(discover(engine, &sae, layer, instruction, &options, bar()))?;
    fill_top_tokens(engine, gguf, &sae, &dir, &mut discovery)?;
    Ok(json!({
        "instruction": discovery.instruction,
        "layer": layer,
        "sae": dir.display().to_string(),
        "latents": discovery.latents,
        "candidates": discovery.candidates,
        "positives": discovery.positives,
        "negatives": discovery.negatives,
        "options": discovery.options,
        "diffmean_norm": saif::steer::norm(&discovery.diffmean.difference),
        "residual_norm": discovery.diffmean.residual_norm,
        "seconds": started.elapsed().as_secs_f64(),
        "settings_from": s.source,
    }))
}

pub struct EvalArgs {
    pub instruction: String,
    pub method: Method,
    pub sae: Option<PathBuf>,
    pub layer: Option<usize>,
    pub k: Option<usize>,
    pub alpha: Option<f32>,
    pub contents: Option<PathBuf>,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub placement: Placement,
    pub rank: Rank,
    pub read_at: ReadAt,
    pub scope: Scope,
    pub keyword: Option<String>,
    pub coefficient: Coefficient,
    pub discovery_contents: Option<usize>,
}

/// The held-out contents, or the lines of `--contents FILE`.
pub fn contents(file: Option<&Path>) -> Result<Vec<String>> {
    match file {
        None => Ok(data::heldout_contents().into_iter().map(String::from).collect()),
        Some(f) => {
            let lines = saif::corpus::read_lines(f).with_context(|| format!("cannot read {}", f.display()))?;
            if lines.is_empty() {
                bail!("{} holds no contents (one per line expected)", f.display());
            }
            Ok(lines)
        }
    }
}

pub fn eval_cmd(engine: &mut Engine, args: &EvalArgs) -> Result<EvalReport> {
    let instruction = data::instruction(&args.instruction)?;
    let contents = contents(args.contents.as_deref())?;
    let s = settings(engine, &instruction.id, args.layer, args.alpha, args.k);
    let alpha =
        if matches!(args.method, Method::Diffmean | Method::DiffmeanProject) { s.diffmean_alpha } else { s.alpha };
    let (sae, layer) = match (args.method.needs_sae() || args.sae.is_some(), args.method.steers(), s.layer) {
        (false, false, _) => (None, 0),
        (false, true, Some(layer)) => (None, layer),
        _ => {
            let (sae, layer, _) = sae_for(engine, args.sae.as_deref(), s.layer)?;
            (Some(sae), layer)
        }
    };
    let mut options = EvalOptions::new(args.method, layer, alpha, s.k);
    options.max_new_tokens = args.max_new_tokens;
    options.seed = args.seed;
    options.placement = args.placement;
    options.rank = args.rank;
    options.read_at = args.read_at;
    options.scope = args.scope;
    options.coefficient = args.coefficient;
    options.discovery_contents = args.discovery_contents.unwrap_or(usize::MAX);
    if let Some(k) = &args.keyword {
        options.keyword = k.clone();
    }
    Ok(block_on(evaluate::run(engine, instruction, &contents, sae.as_ref(), &options, bar()))?)
}

pub struct SteerArgs {
    pub latents: Vec<(usize, f32)>,
    pub sae: Option<PathBuf>,
    pub layer: Option<usize>,
    pub multiplier: f32,
    pub scope: Scope,
    pub prompt: String,
    pub chat: bool,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

/// Parses `ID:STRENGTH[,ID:STRENGTH...]`.
pub fn parse_latents(text: &str) -> Result<Vec<(usize, f32)>> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (id, strength) = pair.split_once(':').with_context(|| format!("\"{pair}\": ID:STRENGTH expected"))?;
            let id = id.trim().parse().with_context(|| format!("\"{id}\" is not a latent id"))?;
            let strength: f32 = strength.trim().parse().with_context(|| format!("\"{strength}\" is not a number"))?;
            Ok((id, strength))
        })
        .collect()
}

pub fn steer_cmd(engine: &mut Engine, args: &SteerArgs) -> Result<Value> {
    let (sae, layer, dir) = sae_for(engine, args.sae.as_deref(), args.layer)?;
    let vector = latent_vector(&sae, &args.latents, args.multiplier)?;
    let steering = Steering::Add { layer, vector, scope: args.scope };
    let text = if args.chat { engine.chat.render(&args.prompt, None) } else { args.prompt.clone() };
    let ids = engine.tokenizer.encode_prompt(&text)?;
    let stop_tokens = if args.chat { engine.chat_stop_tokens() } else { engine.stop_tokens() };
    let options = GenerateOptions { max_new_tokens: args.max_new_tokens, sampling: args.sampling, stop_tokens };
    // The default and the steered output as one batch of two, as the page generates them.
    let (none, steered_hooks) = (Steering::None.hooks(), steering.hooks());
    let requests = [
        SequenceRequest { prompt: &ids, hooks: &none, options: &options },
        SequenceRequest { prompt: &ids, hooks: &steered_hooks, options: &options },
    ];
    let generations = block_on(generate_batch(engine.model.as_mut(), &requests, |_, _| async { true }))?;
    let output = |g: &saif_engine::Generation| -> Result<Value> {
        Ok(json!({ "ids": g.ids, "text": engine.tokenizer.decode(&g.ids)? }))
    };
    let (default, steered) = (output(&generations[0])?, output(&generations[1])?);
    Ok(json!({
        "sae": dir.display().to_string(),
        "layer": layer,
        "latents": args.latents.iter().map(|(id, s)| json!({ "id": id, "strength": s })).collect::<Vec<_>>(),
        "multiplier": args.multiplier,
        "vector_norm": steering.norm(),
        "prompt_ids": ids,
        "default": default,
        "steered": steered,
    }))
}

/// The one-line summary of an evaluation for text output.
pub fn eval_text(r: &EvalReport, instruction: &Instruction) -> String {
    let mut s = format!(
        "{} on {} ({} contents): strict {:.1}% [{:.1}, {:.1}], loose {:.1}% [{:.1}, {:.1}]; perplexity {:.1}, repetition {:.2}",
        r.method.name(),
        instruction.id,
        r.n,
        100.0 * r.strict,
        100.0 * r.strict_ci[0],
        100.0 * r.strict_ci[1],
        100.0 * r.loose,
        100.0 * r.loose_ci[0],
        100.0 * r.loose_ci[1],
        r.fluency.perplexity,
        r.fluency.repetition
    );
    for sample in r.samples.iter().take(5) {
        s += &format!("\n  [{}] {:?}", if sample.loose { "ok" } else { "--" }, sample.output);
    }
    s
}

pub struct SweepArgs {
    pub instruction: String,
    pub param: saif::sweep::Param,
    pub values: Vec<String>,
    pub methods: Vec<Method>,
    pub sae: Option<PathBuf>,
    pub layer: Option<usize>,
    pub k: Option<usize>,
    pub alpha: Option<f32>,
    pub diffmean_alpha: Option<f32>,
    pub contents: Vec<String>,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub placement: Placement,
    pub rank: Rank,
    pub read_at: ReadAt,
    pub coefficient: Coefficient,
    pub keyword: Option<String>,
    pub discovery_contents: Option<usize>,
    pub out: PathBuf,
}

/// Runs a sweep and writes `sweep-<instruction>-<param>.{json,csv,svg}` into `--out`.
pub fn sweep_cmd(engine: &mut Engine, args: &SweepArgs) -> Result<Value> {
    let instruction = data::instruction(&args.instruction)?;
    let s = settings(engine, &instruction.id, args.layer, args.alpha, args.k);
    let layer = match s.layer {
        Some(l) => l,
        None => sae_for(engine, args.sae.as_deref(), None)?.1,
    };
    let mut base = EvalOptions::new(Method::Saif, layer, s.alpha, s.k);
    base.max_new_tokens = args.max_new_tokens;
    base.seed = args.seed;
    base.placement = args.placement;
    base.rank = args.rank;
    base.read_at = args.read_at;
    base.coefficient = args.coefficient;
    base.discovery_contents = args.discovery_contents.unwrap_or(usize::MAX);
    if let Some(k) = &args.keyword {
        base.keyword = k.clone();
    }
    let sweep = saif::sweep::Sweep {
        param: args.param,
        values: args.values.clone(),
        methods: args.methods.clone(),
        base,
        diffmean_alpha: args.diffmean_alpha.unwrap_or(s.diffmean_alpha),
    };
    let started = Instant::now();
    let sae_dir = args.sae.clone();
    let rows = {
        let config = engine.config().clone();
        let fingerprint = engine.fingerprint.clone();
        // `--sae DIR` for every layer (it must be trained on the one swept), else each layer's shipped SAE.
        let sae_at = move |layer: usize| -> std::result::Result<Sae, saif_engine::EngineError> {
            let path = match &sae_dir {
                Some(dir) => dir.clone(),
                None => defaults::find(&config.key, Some(layer)).map(|(_, p)| p).ok_or_else(|| {
                    saif_engine::EngineError::InvalidRequest(format!(
                        "no shipped SAE for {} at layer {layer}",
                        config.key
                    ))
                })?,
            };
            let sae = crate::sae::load_for_model(&fingerprint, &path)
                .map_err(|e| saif_engine::EngineError::InvalidRequest(format!("{e:#}")))?;
            if let Some(trained) = sae.info.layer.filter(|&l| l != layer) {
                return Err(saif_engine::EngineError::InvalidRequest(format!(
                    "the SAE in {} was trained on layer {trained}, not layer {layer}",
                    path.display()
                )));
            }
            Ok(sae)
        };
        block_on(saif::sweep::run(engine, instruction, &args.contents, &sweep, sae_at, bar()))?
    };
    let seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let stem = args.out.join(format!("sweep-{}-{}", instruction.id, args.param.name()));
    let title = format!("{} on {}: {}", instruction.id, engine.config().key, args.param.name());
    let files = [
        (
            stem.with_extension("json"),
            serde_json::to_string_pretty(&json!({ "rows": rows, "seconds": seconds, "title": title }))?,
        ),
        (stem.with_extension("csv"), saif::sweep::to_csv(&rows)),
        (stem.with_extension("svg"), saif::sweep::chart(&rows, &title)?),
    ];
    for (path, text) in &files {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(json!({
        "instruction": instruction.id,
        "param": args.param.name(),
        "rows": rows,
        "files": files.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>(),
        "seconds": seconds,
        "settings_from": s.source,
    }))
}

pub struct TableArgs {
    pub instructions: Vec<String>,
    pub methods: Vec<Method>,
    pub contents: Vec<String>,
    pub discovery_contents: Option<usize>,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub out: PathBuf,
}

/// The results table: every method on every instruction with the recorded settings, on the same contents. Writes
/// `table-<model>.{json,csv,md}` into `--out`.
pub fn table_cmd(engine: &mut Engine, args: &TableArgs) -> Result<Value> {
    let key = engine.config().key.clone();
    let started = Instant::now();
    let mut rows = Vec::new();
    for id in &args.instructions {
        let instruction = data::instruction(id)?;
        let s = settings(engine, &instruction.id, None, None, None);
        let (sae, layer, _) = sae_for(engine, None, s.layer)?;
        let mut base = EvalOptions::new(Method::Saif, layer, s.alpha, s.k);
        base.max_new_tokens = args.max_new_tokens;
        base.seed = args.seed;
        base.discovery_contents = args.discovery_contents.unwrap_or(usize::MAX);
        let discovery = block_on(discover(engine, &sae, layer, instruction, &base.discover_options(), bar()))?;
        for &method in &args.methods {
            let mut options = base.clone();
            options.method = method;
            if matches!(method, Method::Diffmean | Method::DiffmeanProject) {
                options.alpha = s.diffmean_alpha;
            }
            let stats = saif::evaluate::Statistics { discovery: Some(&discovery), diffmean: None, sae: Some(&sae) };
            let report =
                block_on(saif::evaluate::evaluate(engine, instruction, &args.contents, stats, &options, bar()))?;
            let value = if method.steers() { options.alpha.to_string() } else { "-".into() };
            rows.push(saif::sweep::SweepRow::from_report(&report, saif::sweep::Param::Alpha, &value, &options));
        }
    }
    let samples = table_excerpt(&rows);
    let seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let stem = args.out.join(format!("table-{key}"));
    let value = json!({ "model": key, "rows": rows, "samples": samples, "seconds": seconds, "contents": args.contents.len(),
        "discovery_contents": args.discovery_contents,
        "max_new_tokens": args.max_new_tokens });
    std::fs::write(stem.with_extension("json"), serde_json::to_string_pretty(&value)?)?;
    std::fs::write(stem.with_extension("csv"), saif::sweep::to_csv(&rows))?;
    std::fs::write(stem.with_extension("md"), markdown_table(&rows))?;
    Ok(value)
}

/// Judges the answers stored in one file again (`saif rejudge`) and rewrites it: a report of `saif eval --json`,
/// or a sweep's JSON (then its CSV and chart beside it too).
pub fn rejudge(file: &Path, keyword: &str) -> Result<Value> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut value: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let context = || format!("cannot judge {} again", file.display());
    let mut points = Vec::new();
    let mut point = |name: String, changed: usize, before: f64, after: f64| {
        points.push(json!({ "point": name, "changed": changed, "loose_before": before, "loose": after }));
    };
    if let Some(rows) = value.get("rows") {
        let mut rows: Vec<saif::sweep::SweepRow> = serde_json::from_value(rows.clone()).with_context(context)?;
        for r in &mut rows {
            let before = r.loose;
            let changed = r.judge_again(keyword).with_context(context)?;
            point(
                format!("{} {} {} = {}", file.display(), r.method.name(), r.param.name(), r.value),
                changed,
                before,
                r.loose,
            );
        }
        value["rows"] = serde_json::to_value(&rows)?;
        std::fs::write(file.with_extension("csv"), saif::sweep::to_csv(&rows))?;
        if let Some(title) = value.get("title").and_then(Value::as_str) {
            std::fs::write(file.with_extension("svg"), saif::sweep::chart(&rows, title)?)?;
        }
        if value.get("samples").is_some() {
            // A results table (`saif table`): its excerpt of answers and its markdown too.
            value["samples"] = table_excerpt(&rows);
            std::fs::write(file.with_extension("md"), markdown_table(&rows))?;
        }
    } else {
        let mut report: saif::evaluate::EvalReport = serde_json::from_value(value.clone())
            .with_context(|| format!("{} is neither a report of saif eval --json nor a sweep", file.display()))?;
        let before = report.loose;
        let changed = report.judge_again(keyword).with_context(context)?;
        point(format!("{} {}", file.display(), report.method.name()), changed, before, report.loose);
        // Keeps what the file carries beyond the report's fields.
        if let (Some(old), Value::Object(mut new)) = (value.as_object(), serde_json::to_value(&report)?) {
            for (k, v) in old {
                new.entry(k.clone()).or_insert_with(|| v.clone());
            }
            value = Value::Object(new);
        }
    }
    // Written in the layout it was read in: one line (saif eval --json) or indented (sweeps, tables).
    let written =
        if text.trim_end().contains('\n') { serde_json::to_string_pretty(&value)? } else { value.to_string() };
    std::fs::write(file, written + "\n").with_context(|| format!("cannot write {}", file.display()))?;
    Ok(json!({ "file": file, "points": points }))
}

/// A results table's excerpt of answers: the first four of each row.
fn table_excerpt(rows: &[saif::sweep::SweepRow]) -> Value {
    rows.iter()
        .map(|r| json!({ "instruction": r.instruction, "method": r.method.name(), "samples": &r.samples[..r.samples.len().min(4)] }))
        .collect()
}

/// The rows as a markdown table: accuracies with their intervals, and fluency.
pub fn markdown_table(rows: &[saif::sweep::SweepRow]) -> String {
    let pct = |p: f64, ci: [f64; 2]| format!("{:.0}% [{:.0}, {:.0}]", 100.0 * p, 100.0 * ci[0], 100.0 * ci[1]);
    let mut out = String::from(
        "| instruction | method | layer | α | k | n | loose (95% CI) | strict (95% CI) | perplexity | repetition |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let steers = r.method.steers();
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.2} |\n",
            r.instruction,
            r.method.name(),
            if steers { r.layer.to_string() } else { String::new() },
            if steers { r.value.clone() } else { String::new() },
            if r.method.needs_sae() { r.k.to_string() } else { String::new() },
            r.n,
            pct(r.loose, r.loose_ci),
            pct(r.strict, r.strict_ci),
            r.perplexity,
            r.repetition
        );
    }
    out
}

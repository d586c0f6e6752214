//! Sweeps: one setting varied (alpha, k, layer or placement) with everything else fixed, for several methods on the
//! same contents. The paper's findings are sweeps: does the last layer steer best, do ~15 latents beat one, does
//! the instruction after the content give better latents? Each point is an evaluation (`evaluate`) with its
//! intervals, so a reader sees whether a difference is more than noise.
//!
//! Discoveries are shared where they can be: one per (layer, placement), with the largest k swept, whose best
//! latents serve every smaller k.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::future::Future;

use saif_engine::{Engine, EngineError};
use serde::{Deserialize, Serialize};

use crate::data::{Instruction, Placement};
use crate::discover::{diffmean, discover, Discovery};
use crate::evaluate::{evaluate, EvalOptions, EvalReport, Method, Sample, Statistics};
use crate::progress::Progress;
use crate::sae::Sae;
use crate::steer::DiffMean;

/// The setting a sweep varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Param {
    Alpha,
    K,
    Layer,
    Placement,
}

impl Param {
    pub fn parse(s: &str) -> Result<Self, EngineError> {
        match s {
            "alpha" => Ok(Param::Alpha),
            "k" => Ok(Param::K),
            "layer" => Ok(Param::Layer),
            "placement" => Ok(Param::Placement),
            other => Err(EngineError::InvalidRequest(format!("sweep \"{other}\": alpha, k, layer or placement"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Param::Alpha => "alpha",
            Param::K => "k",
            Param::Layer => "layer",
            Param::Placement => "placement",
        }
    }
}

/// One point of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    pub instruction: String,
    pub param: Param,
    /// The swept value as written ("2.5", "15", "29", "after").
    pub value: String,
    pub method: Method,
    pub layer: usize,
    pub alpha: f32,
    pub k: usize,
    pub placement: Placement,
    pub n: usize,
    pub strict: f64,
    pub loose: f64,
    pub strict_ci: [f64; 2],
    pub loose_ci: [f64; 2],
    pub perplexity: f64,
    pub repetition: f64,
    pub steering_norm: f64,
    /// Every answer with its verdicts, so that the point can be judged again (`saif rejudge`). Sweeps written
    /// before they kept their answers have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
}

impl SweepRow {
    pub fn from_report(r: &EvalReport, param: Param, value: &str, options: &EvalOptions) -> Self {
        Self {
            instruction: r.instruction.clone(),
            param,
            value: value.to_string(),
            method: r.method,
            layer: options.layer,
            alpha: options.alpha,
            k: options.k,
            placement: options.placement,
            n: r.n,
            strict: r.strict,
            loose: r.loose,
            strict_ci: r.strict_ci,
            loose_ci: r.loose_ci,
            perplexity: r.fluency.perplexity,
            repetition: r.fluency.repetition,
            steering_norm: r.steering_norm,
            samples: r.samples.clone(),
        }
    }

    /// Judges the point's answers again with today's checkers (`evaluate::judge_again`) and sets its accuracies
    /// from the new verdicts. Returns how many answers changed verdict.
    pub fn judge_again(&mut self, keyword: &str) -> Result<usize, EngineError> {
        if self.samples.len() != self.n || self.n == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "the {} point {} = {} holds {} answers for n = {}: it was written before sweeps kept their answers; run it again",
                self.method.name(),
                self.param.name(),
                self.value,
                self.samples.len(),
                self.n
            )));
        }
        let changed = crate::evaluate::judge_again(&self.instruction, &mut self.samples, keyword)?;
        (self.strict, self.loose, self.strict_ci, self.loose_ci) = crate::evaluate::accuracies(&self.samples);
        Ok(changed)
    }
}

/// What a sweep runs: `param` over `values`, for each of `methods`, from `base` settings. Difference-in-means
/// methods take their strength from `diffmean_alpha` unless alpha is what is swept.
pub struct Sweep {
    pub param: Param,
    pub values: Vec<String>,
    pub methods: Vec<Method>,
    pub base: EvalOptions,
    pub diffmean_alpha: f32,
}

impl Sweep {
    /// The settings of one point.
    fn options(&self, method: Method, value: &str) -> Result<EvalOptions, EngineError> {
        let bad = || EngineError::InvalidRequest(format!("{} = \"{value}\" is not a valid value", self.param.name()));
        let mut o = self.base.clone();
        o.method = method;
        if matches!(method, Method::Diffmean | Method::DiffmeanProject) {
            o.alpha = self.diffmean_alpha;
        }
        match self.param {
            Param::Alpha => o.alpha = value.parse().map_err(|_| bad())?,
            Param::K => o.k = value.parse().ok().filter(|&k| k > 0).ok_or_else(bad)?,
            Param::Layer => o.layer = value.parse().map_err(|_| bad())?,
            Param::Placement => o.placement = Placement::parse(value)?,
        }
        Ok(o)
    }
}

/// Runs `sweep` for `instruction` on `contents`. `sae_at(layer)` gives the SAE of a layer (for SAE methods).
pub async fn run<F, Fut>(
    engine: &mut Engine,
    instruction: &Instruction,
    contents: &[String],
    sweep: &Sweep,
    mut sae_at: impl FnMut(usize) -> Result<Sae, EngineError>,
    mut progress: F,
) -> Result<Vec<SweepRow>, EngineError>
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = bool>,
{
    if sweep.values.is_empty() || sweep.methods.is_empty() {
        return Err(EngineError::InvalidRequest("a sweep needs values and methods".into()));
    }
    // Every point's settings first, so a bad value fails before any work.
    let mut points = Vec::new();
    for value in &sweep.values {
        for &method in &sweep.methods {
            points.push((value.clone(), method, sweep.options(method, value)?));
        }
    }
    let largest_k = points.iter().map(|p| p.2.k).max().unwrap_or(1);
    let mut saes: HashMap<usize, Sae> = HashMap::new();
    let mut discoveries: HashMap<(usize, Placement), Discovery> = HashMap::new();
    let mut means: HashMap<(usize, Placement), DiffMean> = HashMap::new();
    let mut rows = Vec::new();
    for (value, method, options) in points {
        let key = (options.layer, options.placement);
        let mut discovery = None;
        if method.needs_sae() {
            if let Entry::Vacant(room) = saes.entry(options.layer) {
                room.insert(sae_at(options.layer)?);
            }
            if let Entry::Vacant(room) = discoveries.entry(key) {
                let mut o = options.discover_options();
                o.k = largest_k.min(saes[&options.layer].info.d_sae);
                let d = discover(engine, &saes[&options.layer], options.layer, instruction, &o, &mut progress).await?;
                room.insert(d);
            }
            let mut d = discoveries[&key].clone();
            d.latents.truncate(options.k);
            discovery = Some(d);
        }
        if matches!(method, Method::Diffmean | Method::DiffmeanProject) && !means.contains_key(&key) {
            let dm = match discoveries.get(&key) {
                Some(d) => d.diffmean.clone(),
                None => {
                    diffmean(engine, options.layer, instruction, &options.discover_options(), &mut progress).await?
                }
            };
            means.insert(key, dm);
        }
        let stats =
            Statistics { discovery: discovery.as_ref(), diffmean: means.get(&key), sae: saes.get(&options.layer) };
        let report = evaluate(engine, instruction, contents, stats, &options, &mut progress).await?;
        rows.push(SweepRow::from_report(&report, sweep.param, &value, &options));
    }
    Ok(rows)
}

/// The rows as CSV, one line per point.
pub fn to_csv(rows: &[SweepRow]) -> String {
    let mut out = String::from(
        "instruction,param,value,method,layer,alpha,k,placement,n,strict,strict_lo,strict_hi,loose,loose_lo,loose_hi,perplexity,repetition,steering_norm\n",
    );
    for r in rows {
        out += &format!(
            "{},{},{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.3},{:.4},{:.3}\n",
            r.instruction,
            r.param.name(),
            r.value,
            r.method.name(),
            r.layer,
            r.alpha,
            r.k,
            r.placement.name(),
            r.n,
            r.strict,
            r.strict_ci[0],
            r.strict_ci[1],
            r.loose,
            r.loose_ci[0],
            r.loose_ci[1],
            r.perplexity,
            r.repetition,
            r.steering_norm
        );
    }
    out
}

/// The chart of a sweep: loose accuracy (with its interval) against the swept value, one line per method.
pub fn chart(rows: &[SweepRow], title: &str) -> Result<String, EngineError> {
    let Some(first) = rows.first() else {
        return Err(EngineError::InvalidRequest("nothing to draw".into()));
    };
    let mut values: Vec<String> = Vec::new();
    for r in rows {
        if !values.contains(&r.value) {
            values.push(r.value.clone());
        }
    }
    let mut methods: Vec<Method> = Vec::new();
    for r in rows {
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    let series = methods
        .iter()
        .map(|&m| crate::chart::Series {
            name: m.name().to_string(),
            points: rows
                .iter()
                .filter(|r| r.method == m)
                .map(|r| crate::chart::Point {
                    x: values.iter().position(|v| *v == r.value).unwrap_or(0),
                    y: r.loose,
                    low: r.loose_ci[0],
                    high: r.loose_ci[1],
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    crate::chart::accuracy_chart(title, first.param.name(), &values, &series)
}

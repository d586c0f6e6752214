//! SAIF in the page: discovery of an instruction's latents on the SAE in use, and the evaluation of methods on
//! held-out contents over several strengths: `saif discover` and `saif eval`/`saif sweep` on the visitor's device.
//! The last discovery is held, so that an evaluation right after it (the same settings) does not repeat it.

use std::rc::Rc;
use std::time::Duration;

use saif::data;
use saif::discover::{discover as saif_discover, DiscoverOptions, Discovery};
use saif::evaluate::{evaluate as saif_evaluate, EvalOptions, Method, Statistics};
use saif::sweep::{Param, SweepRow};
use saif_engine::{Engine, Scope};

use super::saes::LoadedSae;
use super::{now_ms, working, Failure, STATE};
use crate::protocol::{DiscoverRequest, DiscoveryView, EvaluateRequest, EvaluationView, SampleView};

/// A discovery kept for the evaluation that follows it.
pub struct Held {
    request: DiscoverRequest,
    layer: usize,
    discovery: Discovery,
}

fn options(r: &DiscoverRequest) -> Result<(&'static data::Instruction, DiscoverOptions), Failure> {
    let instruction = data::instruction(&r.instruction)?;
    let options = DiscoverOptions {
        placement: r.placement,
        tau: r.tau,
        k: r.k,
        rank: r.rank,
        contents: r.contents.max(1),
        ..DiscoverOptions::default()
    };
    Ok((instruction, options))
}

/// The discovery of `request` on the SAE in use: the held one when it matches, else a new one.
async fn discovery(
    id: u32,
    engine: &mut Engine,
    sae: &LoadedSae,
    request: &DiscoverRequest,
) -> Result<Rc<Held>, Failure> {
    if let Some(held) = STATE.with(|s| s.borrow().discovery.clone()) {
        if held.request == *request && held.layer == sae.layer {
            return Ok(held);
        }
    }
    let (instruction, options) = options(request)?;
    let discovery = saif_discover(engine, &sae.sae, sae.layer, instruction, &options, working(id)).await?;
    let held = Rc::new(Held { request: request.clone(), layer: sae.layer, discovery });
    STATE.with(|s| s.borrow_mut().discovery = Some(held.clone()));
    Ok(held)
}

pub async fn discover(
    id: u32,
    engine: &mut Engine,
    sae: Rc<LoadedSae>,
    request: DiscoverRequest,
) -> Result<DiscoveryView, Failure> {
    let held = discovery(id, engine, &sae, &request).await?;
    let d = &held.discovery;
    let mut latents = d.latents.clone();
    for l in &mut latents {
        l.top_tokens = super::latents::lens_tokens(&sae, super::current_lens(), l.id as u32).unwrap_or_default();
    }
    Ok(DiscoveryView {
        instruction: d.instruction.clone(),
        layer: d.layer,
        positives: d.positives,
        candidates: d.candidates,
        latents,
        diffmean_norm: saif::steer::norm(&d.diffmean.difference) as f32,
        residual_norm: d.diffmean.residual_norm,
    })
}

pub async fn evaluate(
    id: u32,
    engine: &mut Engine,
    sae: Rc<LoadedSae>,
    request: EvaluateRequest,
) -> Result<EvaluationView, Failure> {
    let started = now_ms();
    let instruction = data::instruction(&request.discovery.instruction)?;
    if request.methods.is_empty() {
        return Err("choose at least one method".into());
    }
    let contents: Vec<String> =
        data::heldout_contents().into_iter().take(request.contents.max(1)).map(String::from).collect();
    let held = discovery(id, engine, &sae, &request.discovery).await?;
    let (mut rows, mut samples) = (Vec::new(), Vec::new());
    // Every (method, strength) point: the unsteered ones once, the steering ones at each of their strengths.
    let mut points: Vec<(Method, Option<f32>)> = Vec::new();
    for &m in &request.methods {
        match m {
            Method::None | Method::Prompt => points.push((m, None)),
            Method::Diffmean | Method::DiffmeanProject => {
                points.extend(request.diffmean_alphas.iter().map(|&a| (m, Some(a))))
            }
            Method::Saif | Method::Random => points.extend(request.alphas.iter().map(|&a| (m, Some(a)))),
        }
    }
    for (method, alpha) in points {
        let mut options = EvalOptions::new(method, sae.layer, alpha.unwrap_or(0.0), request.discovery.k);
        options.placement = request.discovery.placement;
        options.rank = request.discovery.rank;
        options.max_new_tokens = request.max_new_tokens.max(1);
        options.scope = Scope::All;
        let stats = Statistics { discovery: Some(&held.discovery), diffmean: None, sae: Some(&sae.sae) };
        let report = saif_evaluate(engine, instruction, &contents, stats, &options, working(id)).await?;
        let value = alpha.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        rows.push(SweepRow::from_report(&report, Param::Alpha, &value, &options));
        samples.extend(report.samples.iter().take(3).map(|s| SampleView {
            method,
            alpha,
            content: s.content.clone(),
            output: s.output.clone(),
            loose: s.loose,
        }));
        // A breath between points, for the page.
        gloo::timers::future::sleep(Duration::from_millis(0)).await;
    }
    Ok(EvaluationView {
        instruction: instruction.id.clone(),
        layer: sae.layer,
        rows,
        samples,
        seconds: (now_ms() - started) / 1000.0,
    })
}

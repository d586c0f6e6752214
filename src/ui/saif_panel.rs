//! SAIF on the visitor's device: pick an instruction and where it goes, discover the latents that encode it (with
//! progress), see them ranked with their statistics and top tokens, and apply the top k as steering with one click.
//! Then evaluate on held-out contents against the baselines (none, prompt, difference-in-means, random latents):
//! a table with 95% intervals and fluency, a chart of accuracy against strength, and the results as JSON and CSV.

use leptos::prelude::*;
use wasm_bindgen::JsCast;

use super::client::WorkerClient;
use super::state::{AppState, Work};
use super::steer::SteerControl;
use super::WorkProgress;
use crate::protocol::{DiscoverRequest, EvaluateRequest, Method, Placement, Rank, Request, Response, SweepRow};

/// Offers `bytes` to the visitor as a file download.
pub fn download(name: &str, mime: &str, bytes: &[u8]) {
    let array = js_sys::Uint8Array::from(bytes);
    let parts = js_sys::Array::of1(&array);
    let options = web_sys::BlobPropertyBag::new();
    options.set_type(mime);
    let Ok(blob) = web_sys::Blob::new_with_u8_array_sequence_and_options(&parts, &options) else { return };
    let Ok(url) = web_sys::Url::create_object_url_with_blob(&blob) else { return };
    let document = web_sys::window().and_then(|w| w.document());
    if let Some(a) =
        document.and_then(|d| d.create_element("a").ok()).and_then(|a| a.dyn_into::<web_sys::HtmlAnchorElement>().ok())
    {
        a.set_href(&url);
        a.set_download(name);
        a.click();
    }
    let _ = web_sys::Url::revoke_object_url(&url);
}

/// The form of the SAIF panel.
#[derive(Clone, Copy)]
struct Form {
    instruction: RwSignal<String>,
    placement: RwSignal<Placement>,
    k: RwSignal<usize>,
    tau: RwSignal<f32>,
    rank: RwSignal<Rank>,
    contents: RwSignal<usize>,
    eval_contents: RwSignal<usize>,
    alphas: RwSignal<String>,
    diffmean_alphas: RwSignal<String>,
    methods: RwSignal<Vec<Method>>,
    max_new_tokens: RwSignal<usize>,
}

impl Form {
    fn discovery(&self) -> DiscoverRequest {
        DiscoverRequest {
            instruction: self.instruction.get_untracked(),
            placement: self.placement.get_untracked(),
            k: self.k.get_untracked().max(1),
            tau: self.tau.get_untracked(),
            rank: self.rank.get_untracked(),
            contents: self.contents.get_untracked().max(1),
        }
    }
}

fn numbers(text: &str) -> Vec<f32> {
    text.split(',').filter_map(|v| v.trim().parse::<f32>().ok()).filter(|v| v.is_finite()).collect()
}

fn on_work(state: AppState) -> impl Fn(Response) + 'static {
    move |r| {
        if let Response::Working { phase, done, total } = r {
            state.work.set(Some(Work { phase, done, total }));
        }
    }
}

#[component]
pub fn SaifPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    let form = Form {
        instruction: RwSignal::new("translate-fr".to_string()),
        placement: RwSignal::new(Placement::After),
        k: RwSignal::new(15),
        tau: RwSignal::new(0.5),
        rank: RwSignal::new(Rank::Delta),
        contents: RwSignal::new(48),
        eval_contents: RwSignal::new(8),
        alphas: RwSignal::new("1, 2".to_string()),
        diffmean_alphas: RwSignal::new("1".to_string()),
        methods: RwSignal::new(vec![Method::None, Method::Prompt, Method::Diffmean, Method::Random, Method::Saif]),
        max_new_tokens: RwSignal::new(24),
    };
    // The k and strengths the sweeps recorded for this model and instruction (crates/saif/data/steering.json). They
    // were tuned at one layer, so the fields take them only while the SAE of that layer is loaded.
    let recorded = Memo::new(move |_| {
        let key = state.model.with(|m| m.as_ref().map(|m| m.key.clone()))?;
        saif::defaults::steering(&key, &form.instruction.get())
    });
    let recorded_layer_loaded = Memo::new(move |_| {
        let layer = state.sae.with(|s| s.as_ref().map(|s| s.layer));
        recorded.get().is_some_and(|d| Some(d.layer) == layer)
    });
    Effect::new(move |_| {
        if let Some(d) = recorded.get().filter(|_| recorded_layer_loaded.get()) {
            form.k.set(d.k);
            form.alphas.set(d.alpha.to_string());
            form.diffmean_alphas.set(d.diffmean_alpha.to_string());
        }
    });
    let discover = move |_| {
        state.error.set(None);
        state.work.set(None);
        let call = client.call(Request::Discover(form.discovery()), vec![], on_work(state));
        leptos::task::spawn_local(async move {
            let answer = call.await;
            state.work.set(None);
            match answer {
                Ok(Response::Discovered(d)) => state.discovery.set(Some(d)),
                Ok(_) => {}
                Err(e) => state.fail(e),
            }
        });
    };
    let evaluate = move |_| {
        state.error.set(None);
        state.work.set(None);
        let request = EvaluateRequest {
            discovery: form.discovery(),
            methods: form.methods.get_untracked(),
            alphas: numbers(&form.alphas.get_untracked()),
            diffmean_alphas: numbers(&form.diffmean_alphas.get_untracked()),
            contents: form.eval_contents.get_untracked().max(1),
            max_new_tokens: form.max_new_tokens.get_untracked().max(1),
        };
        let call = client.call(Request::Evaluate(request), vec![], on_work(state));
        leptos::task::spawn_local(async move {
            let answer = call.await;
            state.work.set(None);
            match answer {
                Ok(Response::Evaluated(e)) => state.evaluation.set(Some(e)),
                Ok(_) => {}
                Err(e) => state.fail(e),
            }
        });
    };
    let apply = move |_| {
        let Some(d) = state.discovery.get_untracked() else { return };
        let alpha = numbers(&form.alphas.get_untracked()).first().copied().unwrap_or(1.0);
        state.steering.update(|s| {
            s.latents.clear();
            for l in &d.latents {
                s.put(l.id as u32, alpha * l.delta, l.top_tokens.clone());
            }
            s.multiplier = 1.0;
        });
    };
    let number = |ev: &leptos::ev::Event| {
        event_target_value(ev).trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)
    };
    view! {
        <Show when=move || state.sae.get().is_some()>
            <section class="panel" id="saif-panel">
                <h2>"SAIF: the latents of an instruction"</h2>
                <p class="hint">
                    "Each discovery content is read with the instruction (in many wordings and languages) and without it; "
                    "the latents that fire on at least τ of the prompts with it, ranked by how much more they fire there, are the instruction's."
                </p>
                <div class="row">
                    <label>"Instruction "
                        <select id="saif-instruction" on:change=move |ev| form.instruction.set(event_target_value(&ev))>
                            {saif::data::instructions().iter().map(|i| {
                                let id = i.id.clone();
                                let selected = id == form.instruction.get_untracked();
                                view! { <option value=id selected=selected>{i.label.clone()}</option> }
                            }).collect_view()}
                        </select>
                    </label>
                    <label>"Instruction goes "
                        <select id="saif-placement" on:change=move |ev| form.placement.set(if event_target_value(&ev) == "before" { Placement::Before } else { Placement::After })>
                            <option value="after" selected=true>"after the content"</option>
                            <option value="before">"before the content"</option>
                        </select>
                    </label>
                    <label>"Rank by "
                        <select id="saif-rank" on:change=move |ev| form.rank.set(if event_target_value(&ev) == "output" { Rank::Output } else { Rank::Delta })>
                            <option value="delta" selected=true>"activation difference (SAIF)"</option>
                            <option value="output">"effect on the answer (Arad et al.)"</option>
                        </select>
                    </label>
                </div>
                <div class="row">
                    <label>"k " <input type="number" min="1" class="narrow" id="saif-k" prop:value=move || form.k.get().to_string()
                        on:change=move |ev| if let Some(v) = number(&ev) { form.k.set(v.max(1.0) as usize) }/></label>
                    <label>"τ " <input type="number" min="0" max="1" step="0.05" class="narrow" prop:value=move || form.tau.get().to_string()
                        on:change=move |ev| if let Some(v) = number(&ev) { form.tau.set(v.min(1.0) as f32) }/></label>
                    <label>"Contents " <input type="number" min="1" max="240" class="narrow" id="saif-contents" prop:value=move || form.contents.get().to_string()
                        on:change=move |ev| if let Some(v) = number(&ev) { form.contents.set(v.clamp(1.0, 240.0) as usize) }/></label>
                    <button id="saif-discover" on:click=discover prop:disabled=move || state.is_busy()>"Discover"</button>
                </div>
                <WorkProgress/>
                <div id="saif-results">
                    {move || state.discovery.get().map(|d| view! {
                        <p class="hint">{format!(
                            "Layer {}: {} latents fire on at least τ of the {} prompts with the instruction; the best {} (difference-in-means vector norm {:.1}, residual norm {:.1}):",
                            d.layer, d.candidates, d.positives, d.latents.len(), d.diffmean_norm, d.residual_norm
                        )}</p>
                        <table class="latents">
                            <tr><th>"latent"</th><th>"fires with / without"</th><th>"mean with / without"</th><th>"Δ"</th><th>"promotes"</th><th>"steer"</th></tr>
                            {d.latents.iter().map(|l| {
                                let index = l.id as u32;
                                view! {
                                    <tr class="latent-row" data-latent=index>
                                        <td><button class="link latent-index" on:click=move |_| state.chosen_latent.set(Some(index))>{format!("#{index}")}</button></td>
                                        <td>{format!("{:.0}% / {:.0}%", 100.0 * l.freq_pos, 100.0 * l.freq_neg)}</td>
                                        <td>{format!("{:.3} / {:.3}", l.mean_pos, l.mean_neg)}</td>
                                        <td>{format!("{:.3}", l.delta)}</td>
                                        <td class="lens">{l.top_tokens.iter().take(5).map(|t| format!("{t:?}")).collect::<Vec<_>>().join(" ")}</td>
                                        <td><SteerControl index=index tokens=l.top_tokens.clone() suggested=l.delta/></td>
                                    </tr>
                                }
                            }).collect_view()}
                        </table>
                        <button id="saif-apply" on:click=apply>{format!("Steer with these {} latents (strength = α × Δ)", d.latents.len())}</button>
                    })}
                </div>
                <h3>"Evaluate against the baselines"</h3>
                <p class="hint">"On held-out contents with no instruction in the prompt (prompting gives it in words). Checked by deterministic checkers; loose forgives a first or last line and markdown."</p>
                <p class="hint">"What the project measured on SmolLM2 (docs/results.md): translate-fr steers best with the layer-25 SAE (the one the page starts on) at α = 3, 72% French on 40 held-out contents (much of it garbled), against 52% for difference-in-means at α = 1 and 100% for prompting; the last layer reaches 40%."</p>
                <div class="row">
                    {[Method::None, Method::Prompt, Method::Diffmean, Method::DiffmeanProject, Method::Random, Method::Saif].into_iter().map(|m| view! {
                        <label>
                            <input type="checkbox" class="saif-method" value=m.name() prop:checked=move || form.methods.get().contains(&m)
                                on:change=move |ev| {
                                    let on = event_target_checked(&ev);
                                    form.methods.update(|ms| { ms.retain(|x| *x != m); if on { ms.push(m) } });
                                }/>
                            {format!(" {}", m.name())}
                        </label>
                    }).collect_view()}
                </div>
                {move || recorded.get().map(|d| view! {
                    <p class="hint" id="saif-recorded">{format!(
                        "Recorded for this model and instruction (docs/results.md): layer {}, k = {}, SAIF α = {}, difference-in-means α = {}{}.",
                        d.layer, d.k, d.alpha, d.diffmean_alpha,
                        if recorded_layer_loaded.get() { "" } else { "; load that layer's SAE to use them" }
                    )}</p>
                })}
                <div class="row">
                    <label>"α (SAIF, random) " <input type="text" class="narrow" id="saif-alphas" prop:value=move || form.alphas.get()
                        on:change=move |ev| form.alphas.set(event_target_value(&ev))/></label>
                    <label>"α (diffmean) " <input type="text" class="narrow" prop:value=move || form.diffmean_alphas.get()
                        on:change=move |ev| form.diffmean_alphas.set(event_target_value(&ev))/></label>
                    <label>"Held-out contents " <input type="number" min="1" max="120" class="narrow" id="saif-eval-contents" prop:value=move || form.eval_contents.get().to_string()
                        on:change=move |ev| if let Some(v) = number(&ev) { form.eval_contents.set(v.clamp(1.0, 120.0) as usize) }/></label>
                    <label>"Tokens " <input type="number" min="1" max="256" class="narrow" id="saif-eval-tokens" prop:value=move || form.max_new_tokens.get().to_string()
                        on:change=move |ev| if let Some(v) = number(&ev) { form.max_new_tokens.set(v.clamp(1.0, 256.0) as usize) }/></label>
                    <button id="saif-eval" on:click=evaluate prop:disabled=move || state.is_busy()>"Evaluate"</button>
                </div>
                <EvaluationResults/>
            </section>
        </Show>
    }
}

fn percent_with_interval(p: f64, ci: [f64; 2]) -> String {
    format!("{:.0}% [{:.0}, {:.0}]", 100.0 * p, 100.0 * ci[0], 100.0 * ci[1])
}

#[component]
fn EvaluationResults() -> impl IntoView {
    let state = expect_context::<AppState>();
    view! {
        {move || state.evaluation.get().map(|e| {
            let json = serde_json::to_string_pretty(&e).unwrap_or_default();
            let csv = saif::sweep::to_csv(&e.rows);
            let charts = charts(&e.rows, &e.instruction);
            let name = format!("saif-{}-layer{}", e.instruction, e.layer);
            let (json_name, csv_name) = (format!("{name}.json"), format!("{name}.csv"));
            view! {
                <table class="results" id="eval-table">
                    <tr><th>"method"</th><th>"α"</th><th>"loose"</th><th>"strict"</th><th>"perplexity"</th><th>"repetition"</th></tr>
                    {e.rows.iter().map(|r| view! {
                        <tr data-method=r.method.name()>
                            <td>{r.method.name()}</td>
                            <td>{if r.value == "-" { String::new() } else { r.value.clone() }}</td>
                            <td>{percent_with_interval(r.loose, r.loose_ci)}</td>
                            <td>{percent_with_interval(r.strict, r.strict_ci)}</td>
                            <td>{format!("{:.1}", r.perplexity)}</td>
                            <td>{format!("{:.2}", r.repetition)}</td>
                        </tr>
                    }).collect_view()}
                </table>
                <p class="hint">{format!("{} contents each, {:.0} s on this device. Brackets: 95% Wilson intervals.", e.rows.first().map_or(0, |r| r.n), e.seconds)}</p>
                <div class="charts">
                    {charts.into_iter().map(|svg| view! { <figure class="chart" inner_html=svg></figure> }).collect_view()}
                </div>
                <details>
                    <summary>"Some outputs"</summary>
                    <table class="samples">
                        {e.samples.iter().map(|s| view! {
                            <tr>
                                <td>{format!("{}{}", s.method.name(), s.alpha.map(|a| format!(" α={a}")).unwrap_or_default())}</td>
                                <td class="sample-output">{s.output.clone()}</td>
                                <td>{if s.loose { "✓" } else { "✗" }}</td>
                            </tr>
                        }).collect_view()}
                    </table>
                </details>
                <div class="row">
                    <button class="secondary" on:click=move |_| download(&json_name, "application/json", json.as_bytes())>"Results as JSON"</button>
                    <button class="secondary" on:click=move |_| download(&csv_name, "text/csv", csv.as_bytes())>"Results as CSV"</button>
                </div>
            }
        })}
    }
}

/// Charts of loose accuracy against strength: SAIF and random latents share a scale, difference-in-means has its
/// own. The unsteered methods are drawn as flat lines for reference.
fn charts(rows: &[SweepRow], instruction: &str) -> Vec<String> {
    let flat: Vec<&SweepRow> = rows.iter().filter(|r| r.value == "-").collect();
    let groups: [(&str, &[Method]); 2] = [
        ("SAIF and random latents", &[Method::Saif, Method::Random]),
        ("difference-in-means", &[Method::Diffmean, Method::DiffmeanProject]),
    ];
    let mut out = Vec::new();
    for (title, methods) in groups {
        let mut chart: Vec<SweepRow> = rows.iter().filter(|r| methods.contains(&r.method)).cloned().collect();
        if chart.is_empty() {
            continue;
        }
        let values: Vec<String> = {
            let mut v: Vec<String> = Vec::new();
            for r in &chart {
                if !v.contains(&r.value) {
                    v.push(r.value.clone());
                }
            }
            v
        };
        for f in &flat {
            for v in &values {
                let mut r = (*f).clone();
                r.value = v.clone();
                chart.push(r);
            }
        }
        if let Ok(svg) = saif::sweep::chart(&chart, &format!("{instruction}: {title}")) {
            out.push(svg);
        }
    }
    out
}

//! The SAE's latents: which SAE (the shipped ones of every layer, Gemma Scope 2 presets, or files from disk), what
//! it reads in the prompt (every token coloured by a chosen latent or by its strongest one, and the latents at the
//! last token), search by id or by the tokens a latent promotes, and a card per latent (its top tokens, its
//! activation on each prompt token, their histogram). Every latent listed can steer.

use leptos::prelude::*;

use super::client::WorkerClient;
use super::prompt_panel::visible;
use super::state::AppState;
use super::steer::SteerControl;
use crate::catalog;
use crate::link::SaeChoice;
use crate::protocol::{LatentReading, LatentView, Request, Response, SaeSource};

/// Asks the worker for another SAE. One that records another model than the loaded one is used only once the
/// visitor says so.
pub fn use_sae(
    state: AppState,
    client: WorkerClient,
    source: SaeSource,
    files: Vec<web_sys::File>,
    choice: Option<SaeChoice>,
) {
    request_sae(state, client, source, files, choice, Asked::ByVisitor)
}

/// Puts the model's default shipped SAE in use, once the model is loaded. The model works without it, so a failure
/// is a notice, not an error.
pub fn use_default_sae(state: AppState, client: WorkerClient, layer: usize) {
    request_sae(state, client, SaeSource::Shipped { layer }, vec![], None, Asked::ByDefault)
}

/// Who asked for an SAE: the visitor (a failure is an error; one for another model is used if they say so), or
/// the page itself, for a model just loaded (failures are notices).
#[derive(Clone, Copy, PartialEq)]
enum Asked {
    ByVisitor,
    ByDefault,
    ByVisitorForAnyModel,
}

fn request_sae(
    state: AppState,
    client: WorkerClient,
    source: SaeSource,
    files: Vec<web_sys::File>,
    choice: Option<SaeChoice>,
    asked: Asked,
) {
    if asked != Asked::ByDefault {
        state.error.set(None);
    }
    let any_model = asked == Asked::ByVisitorForAnyModel;
    let call = client.call(Request::UseSae { source: source.clone(), any_model }, files.clone(), |_| {});
    let notice = move |text: String| state.notices.update(|n| n.push(text));
    leptos::task::spawn_local(async move {
        match call.await {
            Ok(Response::SaeForAnotherModel { message }) if asked == Asked::ByDefault => notice(format!(
                "The SAE shipped for this model was not loaded: {message}. Pick its layer under Latents to use it anyway."
            )),
            Ok(Response::SaeForAnotherModel { message }) => {
                let question =
                    format!("{message}.\n\nSteering and latents may mean nothing on this model. Use it anyway?");
                let yes = web_sys::window().and_then(|w| w.confirm_with_message(&question).ok()).unwrap_or(false);
                if yes {
                    request_sae(state, client, source, files, choice, Asked::ByVisitorForAnyModel);
                } else {
                    state.fail(format!("That SAE was not used: {message}."));
                }
            }
            Ok(Response::SaeLoaded(summary)) => {
                state.sae.set(Some(summary));
                state.sae_choice.set(choice);
                state.reading.set(None);
                state.search.set(None);
                state.discovery.set(None);
                state.evaluation.set(None);
            }
            Ok(_) => {}
            Err(e) if asked == Asked::ByDefault => {
                notice(format!("The SAE shipped for this model could not be loaded ({e}); no latents."))
            }
            Err(e) => state.fail(format!("That SAE cannot be used: {e}")),
        }
    });
}

fn read(state: AppState, client: WorkerClient) {
    state.error.set(None);
    let request = Request::ReadLatents { text: state.text.get_untracked(), chat: state.chat.get_untracked(), top: 12 };
    let call = client.call(request, vec![], |_| {});
    leptos::task::spawn_local(async move {
        match call.await {
            Ok(Response::Latents(reading)) => state.reading.set(Some(reading)),
            Ok(_) => {}
            Err(e) => state.fail(e),
        }
    });
}

#[component]
pub fn LatentsPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    view! {
        <Show when=move || state.model.get().is_some()>
            <section class="panel" id="latents-panel">
                <h2>"SAE latents"</h2>
                <SaeChooser/>
                <Show when=move || state.loading_sae()>
                    <p class="hint" id="sae-loading">"Loading the SAE… (the model can generate meanwhile)"</p>
                </Show>
                <Show when=move || state.sae.get().is_some()>
                    <p class="hint">{move || state.sae.get().map(|s| format!(
                        "{} latents, {}, on resid_post of layer {} ({}).", s.width, s.activation, s.layer, s.source
                    ))}</p>
                    <div class="row">
                        <button id="read-latents" on:click=move |_| read(state, client) prop:disabled=move || state.is_busy()>
                            "Read the prompt's latents"
                        </button>
                    </div>
                    <Reading/>
                    <Search/>
                    <LatentCard/>
                </Show>
            </section>
        </Show>
    }
}

#[component]
fn SaeChooser() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    let files = NodeRef::<leptos::html::Input>::new();
    let layer_text = RwSignal::new(String::new());
    let on_choice = move |ev: leptos::ev::Event| {
        let value = event_target_value(&ev);
        if let Some(layer) = value.strip_prefix("layer:").and_then(|l| l.parse::<usize>().ok()) {
            use_sae(state, client, SaeSource::Shipped { layer }, vec![], Some(SaeChoice::Layer(layer)));
        } else if let Some(p) = value.strip_prefix("preset:").and_then(catalog::sae_preset) {
            let source = SaeSource::Folder { url: p.url(), layer: p.layer, label: p.label.to_string() };
            use_sae(state, client, source, vec![], Some(SaeChoice::Preset(p.id)));
        }
    };
    let on_files = move |_| {
        let Some(input) = files.get() else { return };
        let Some(list) = input.files() else { return };
        let picked: Vec<web_sys::File> = (0..list.length()).filter_map(|i| list.get(i)).collect();
        if picked.is_empty() {
            return;
        }
        let layer = layer_text.get_untracked().trim().parse::<usize>().ok();
        let label = format!("from your disk: {}", picked.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "));
        use_sae(state, client, SaeSource::Files { layer, label }, picked, None);
        input.set_value("");
    };
    let presets = move || {
        let key = state.model.get().map(|m| m.key).unwrap_or_default();
        catalog::SAE_PRESETS.iter().filter(|p| p.model_key == key).collect::<Vec<_>>()
    };
    let selected = move || match state.sae_choice.get() {
        Some(SaeChoice::Layer(l)) => format!("layer:{l}"),
        Some(SaeChoice::Preset(p)) => format!("preset:{p}"),
        None => state.sae.get().map(|s| format!("layer:{}", s.layer)).unwrap_or_default(),
    };
    view! {
        <div class="row">
            <label for="sae-select">"SAE: "</label>
            <select id="sae-select" on:change=on_choice prop:disabled=move || state.is_busy() || state.loading_sae()>
                <option value="" disabled=true selected=move || state.sae.get().is_none()>"none"</option>
                {move || state.model.get().map(|m| m.shipped_layers).unwrap_or_default().into_iter().map(|l| {
                    let value = format!("layer:{l}");
                    let v = value.clone();
                    view! { <option value=value selected=move || selected() == v>{format!("shipped, layer {l}")}</option> }
                }).collect_view()}
                {move || presets().into_iter().map(|p| {
                    let value = format!("preset:{}", p.id);
                    let v = value.clone();
                    view! { <option value=value selected=move || selected() == v>{p.label}</option> }
                }).collect_view()}
            </select>
        </div>
        <details class="sae-files">
            <summary>"Use SAE files from your disk"</summary>
            <p class="hint">"Gemma Scope 2 (params.safetensors and config.json) or SAELens (sae_weights.safetensors and cfg.json); lens.json too where you have it. An SAE that does not fit this model is refused."</p>
            <div class="row">
                <label>"Layer it reads "
                    <input type="number" min="0" class="narrow" id="sae-files-layer" placeholder="from config"
                        prop:value=move || layer_text.get() on:change=move |ev| layer_text.set(event_target_value(&ev))/>
                </label>
                <input type="file" multiple=true id="sae-files" node_ref=files on:change=on_files
                    prop:disabled=move || state.is_busy() || state.loading_sae()/>
            </div>
        </details>
    }
}

/// A colour for an activation as a share of the largest shown.
fn heat(share: f32) -> String {
    let a = share.clamp(0.0, 1.0);
    format!("background-color: rgba(43, 89, 195, {:.2})", 0.08 + 0.72 * a)
}

#[component]
fn Reading() -> impl IntoView {
    let state = expect_context::<AppState>();
    view! {
        {move || state.reading.get().map(|reading| {
            let chosen = state.chosen_latent.get();
            // Per token: the chosen latent's activation, or the token's strongest latent.
            let values: Vec<(Option<u32>, f32)> = reading.per_token.iter().map(|latents| match chosen {
                Some(j) => (Some(j), latents.iter().find(|l| l.0 == j).map_or(0.0, |l| l.1)),
                None => latents.first().map_or((None, 0.0), |&(j, a)| (Some(j), a)),
            }).collect();
            // Position 0 is the attention sink, far larger than the rest: scale by the others.
            let max = values.iter().skip(1).map(|v| v.1).fold(1e-6f32, f32::max);
            let last_token = reading.tokens.last().map(|t| t.text.clone()).unwrap_or_default();
            let reading_for_table = reading.clone();
            view! {
                <p class="hint">{match chosen {
                    Some(j) => format!("Each token coloured by latent #{j}'s activation (click a token to colour by each token's strongest latent):"),
                    None => "Each token coloured by its strongest latent (hover for which; click to choose it):".to_string(),
                }}</p>
                <div class="tokens" id="token-view">
                    {reading.tokens.iter().zip(values).enumerate().map(|(i, (t, (latent, value)))| {
                        let title = match latent {
                            Some(j) => format!("token {i} {:?}: latent #{j} at {value:.3}", t.text),
                            None => format!("token {i} {:?}: no latent", t.text),
                        };
                        view! {
                            <button class="token heat" style=heat(value / max) title=title
                                on:click=move |_| state.chosen_latent.set(if chosen.is_some() { None } else { latent })>
                                <span class="token-text">{visible(&t.text)}</span>
                            </button>
                        }
                    }).collect_view()}
                </div>
                <LastTokenTable reading=reading_for_table last_token=last_token/>
            }
        })}
    }
}

#[component]
fn LastTokenTable(reading: LatentReading, last_token: String) -> impl IntoView {
    let max = reading.last.first().map_or(1.0, |l| l.value).max(1e-6);
    view! {
        <p class="hint">{format!("Layer {}, the strongest latents at the last token {:?}:", reading.sae.layer, last_token)}</p>
        <table class="latents" id="latent-table">
            <tr><th>"latent"</th><th>"activation"</th><th>"promotes"</th><th>"steer"</th></tr>
            {reading.last.into_iter().map(|l| view! { <LatentRow latent=l max=max/> }).collect_view()}
        </table>
    }
}

/// One row of a latent table: its index (opens its card), its value as a bar, its tokens and its steering control.
#[component]
fn LatentRow(latent: LatentView, max: f32) -> impl IntoView {
    let state = expect_context::<AppState>();
    let index = latent.index;
    view! {
        <tr class="latent-row" data-latent=index>
            <td><button class="link latent-index" on:click=move |_| state.chosen_latent.set(Some(index))
                title="Show this latent's card">{format!("#{index}")}</button></td>
            <td>
                <span class="bar" style:width=format!("{:.0}px", (60.0 * latent.value.abs() / max).min(60.0))></span>
                {format!(" {:.3}", latent.value)}
            </td>
            <td class="lens">{latent.tokens.iter().take(6).map(|t| format!("{t:?}")).collect::<Vec<_>>().join(" ")}</td>
            <td><SteerControl index=index tokens=latent.tokens.clone()/></td>
        </tr>
    }
}

#[component]
fn Search() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    let query = RwSignal::new(String::new());
    let run = move || {
        let q = query.get_untracked();
        if q.trim().is_empty() {
            state.search.set(None);
            return;
        }
        let call = client.call(Request::SearchLatents { query: q, top: 20 }, vec![], |_| {});
        leptos::task::spawn_local(async move {
            match call.await {
                Ok(Response::Found(results)) => state.search.set(Some(results)),
                Ok(_) => {}
                Err(e) => state.fail(e),
            }
        });
    };
    view! {
        <form class="row" on:submit=move |ev| { ev.prevent_default(); run(); }>
            <label for="latent-search">"Search latents: "</label>
            <input type="search" id="latent-search" placeholder="a number, or a token: French,  les"
                prop:value=move || query.get() on:input=move |ev| query.set(event_target_value(&ev))/>
            <button type="submit" class="secondary">"Search"</button>
        </form>
        <div id="latent-results">
            {move || state.search.get().map(|r| {
                let max = r.latents.iter().map(|l| l.value.abs()).fold(1e-6f32, f32::max);
                view! {
                    <p class="hint">{format!("{} latents for {:?} ({}):", r.latents.len(), r.query, r.matched)}</p>
                    <table class="latents">
                        <tr><th>"latent"</th><th>"score"</th><th>"promotes"</th><th>"steer"</th></tr>
                        {r.latents.into_iter().map(|l| view! { <LatentRow latent=l max=max/> }).collect_view()}
                    </table>
                }
            })}
        </div>
    }
}

/// The chosen latent's card: its top tokens, its activation on each prompt token (from the last reading), and a
/// histogram of those activations.
#[component]
fn LatentCard() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    let tokens = RwSignal::new(None::<(u32, Vec<String>)>);
    // Fetch the chosen latent's top tokens.
    Effect::new(move |_| {
        let Some(j) = state.chosen_latent.get() else { return };
        if tokens.get_untracked().is_some_and(|t| t.0 == j) {
            return;
        }
        let call = client.call(Request::Lens { latent: j }, vec![], |_| {});
        leptos::task::spawn_local(async move {
            match call.await {
                Ok(Response::Lens { latent, tokens: t }) => tokens.set(Some((latent, t))),
                Ok(_) => {}
                Err(e) => state.fail(e),
            }
        });
    });
    view! {
        {move || state.chosen_latent.get().map(|j| {
            let top = tokens.get().filter(|t| t.0 == j).map(|t| t.1).unwrap_or_default();
            let reading = state.reading.get();
            let per_token: Vec<(String, f32)> = reading.as_ref().map(|r| {
                r.tokens.iter().zip(&r.per_token).map(|(t, l)| (t.text.clone(), l.iter().find(|x| x.0 == j).map_or(0.0, |x| x.1))).collect()
            }).unwrap_or_default();
            let histogram = histogram(&per_token.iter().skip(1).map(|x| x.1).collect::<Vec<_>>(), 8);
            let top_for_control = top.clone();
            view! {
                <div class="card" id="latent-card">
                    <div class="row">
                        <h3>{format!("Latent #{j}")}</h3>
                        <SteerControl index=j tokens=top_for_control/>
                        <button class="dismiss" on:click=move |_| state.chosen_latent.set(None)>"Close"</button>
                    </div>
                    <p><strong>"Promotes: "</strong><span class="lens">{top.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(" ")}</span></p>
                    <Show when=move || reading.is_some() fallback=|| view! { <p class="hint">"Read the prompt's latents to see this latent on each token."</p> }>
                        <p><strong>"On the prompt's tokens (the first, an attention sink, left out of the histogram):"</strong></p>
                        <table class="per-token">
                            {per_token.clone().into_iter().map(|(t, a)| view! {
                                <tr><td class="token-text">{visible(&t)}</td><td>{format!("{a:.3}")}</td></tr>
                            }).collect_view()}
                        </table>
                        <HistogramView bins=histogram.clone()/>
                    </Show>
                </div>
            }
        })}
    }
}

/// Counts of values in `bins` equal bins from 0 to the largest value, with each bin's upper edge.
fn histogram(values: &[f32], bins: usize) -> Vec<(f32, usize)> {
    let max = values.iter().copied().fold(0f32, f32::max);
    if max <= 0.0 {
        return vec![(0.0, values.len())];
    }
    let mut counts = vec![0usize; bins];
    for &v in values {
        let b = ((v / max) * bins as f32).floor() as usize;
        counts[b.min(bins - 1)] += 1;
    }
    counts.into_iter().enumerate().map(|(i, c)| ((i + 1) as f32 * max / bins as f32, c)).collect()
}

#[component]
fn HistogramView(bins: Vec<(f32, usize)>) -> impl IntoView {
    let most = bins.iter().map(|b| b.1).max().unwrap_or(1).max(1);
    view! {
        <div class="histogram" role="img" aria-label="histogram of the latent's activations on the prompt">
            {bins.into_iter().map(|(edge, count)| view! {
                <div class="bin" title=format!("{count} tokens up to {edge:.3}")>
                    <div class="fill" style:height=format!("{:.0}%", 100.0 * count as f32 / most as f32)></div>
                    <span>{count}</span>
                </div>
            }).collect_view()}
        </div>
    }
}

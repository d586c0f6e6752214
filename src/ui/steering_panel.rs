//! The active steering set: each latent with its strength (a toggle, a slider and the number), a global
//! multiplier, and the positions steered; the layer is the SAE's. The residual stream's typical norm at that layer
//! is shown beside the vector's, so that a visitor can pick a sensible range. The set travels in the link, and
//! exports as safetensors.

use leptos::prelude::*;

use super::client::WorkerClient;
use super::state::AppState;
use super::steer::{input_f32, strength_range};
use crate::protocol::{Request, Response, Scope, SteeringSpec};

#[component]
pub fn SteeringPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    let export = move |_| {
        let set = state.steering.get_untracked();
        let spec = SteeringSpec { latents: set.active(), multiplier: set.multiplier, scope: set.scope };
        leptos::task::spawn_local(async move {
            match client.call(Request::SteeringVector(spec), vec![], |_| {}).await {
                Ok(Response::Vector { layer, values }) => super::saif_panel::download(
                    &format!("steering-layer{layer}.safetensors"),
                    "application/octet-stream",
                    &steering_safetensors(layer, &values),
                ),
                Ok(_) => {}
                Err(e) => state.fail(e),
            }
        });
    };
    view! {
        <Show when=move || state.sae.get().is_some()>
            <section class="panel" id="steering-panel">
                <h2>"Steering"</h2>
                <p class="hint">{move || state.sae.get().map(|s| format!(
                    "Adds multiplier × Σ strength × decoder row to the residual stream after layer {} (its norm there is about {:.1}; a strength of 1 adds about {:.1}).",
                    s.layer, s.residual_norm, s.decoder_norm
                ))}</p>
                <ul id="steering-list" class="steering-list">
                    {move || {
                        let set = state.steering.get();
                        if set.latents.is_empty() {
                            return view! { <li class="hint">"No latent steers: turn one on below, in the latents panel or in SAIF's list."</li> }.into_any();
                        }
                        let range = strength_range(&state);
                        set.latents.into_iter().map(|l| {
                            let index = l.index;
                            let update = move |f: &dyn Fn(&mut super::state::SteeredLatent)| state.steering.update(|s| {
                                if let Some(x) = s.latents.iter_mut().find(|x| x.index == index) { f(x) }
                            });
                            view! {
                                <li class="steered" data-latent=index>
                                    <label>
                                        <input type="checkbox" prop:checked=l.on on:change=move |ev| {
                                            let on = event_target_checked(&ev);
                                            update(&|x| x.on = on);
                                        }/>
                                        <span class="latent-index">{format!("#{index}")}</span>
                                    </label>
                                    <input type="range" aria-label=format!("strength of latent {index}")
                                        min=(-range).to_string() max=range.to_string() step=(range / 200.0).to_string()
                                        prop:value=l.strength.to_string()
                                        on:input=move |ev| if let Some(v) = input_f32(&ev) { update(&|x| x.strength = v) }/>
                                    <input type="number" class="narrow" step="any" aria-label=format!("strength of latent {index}, exact")
                                        prop:value=l.strength.to_string()
                                        on:change=move |ev| if let Some(v) = input_f32(&ev) { update(&|x| x.strength = v) }/>
                                    <span class="lens">{l.tokens.iter().take(4).map(|t| format!("{t:?}")).collect::<Vec<_>>().join(" ")}</span>
                                    <button class="secondary small" aria-label=format!("remove latent {index}") on:click=move |_| {
                                        state.steering.update(|s| s.latents.retain(|x| x.index != index));
                                    }>"×"</button>
                                </li>
                            }
                        }).collect_view().into_any()
                    }}
                </ul>
                <div class="row">
                    <label>"Multiplier "
                        <input type="range" min="0" max="10" step="0.1" id="steer-multiplier"
                            prop:value=move || state.steering.get().multiplier.to_string()
                            on:input=move |ev| if let Some(v) = input_f32(&ev) { state.steering.update(|s| s.multiplier = v) }/>
                        <span class="strength">{move || format!("{:.1}", state.steering.get().multiplier)}</span>
                    </label>
                    <label>"Positions "
                        <select id="steer-scope" on:change=move |ev| {
                            let scope = match event_target_value(&ev).as_str() {
                                "prompt" => Scope::Prompt,
                                "generated" => Scope::Generated,
                                _ => Scope::All,
                            };
                            state.steering.update(|s| s.scope = scope);
                        }>
                            {[(Scope::All, "all", "prompt and generation"), (Scope::Prompt, "prompt", "the prompt only"), (Scope::Generated, "generated", "generated tokens only")]
                                .into_iter().map(|(scope, value, label)| view! {
                                    <option value=value selected=move || state.steering.get().scope == scope>{label}</option>
                                }).collect_view()}
                        </select>
                    </label>
                    <button class="secondary" on:click=move |_| state.steering.update(|s| s.latents.clear())
                        prop:disabled=move || state.steering.get().latents.is_empty()>"Clear"</button>
                    <button class="secondary" id="export-vector" on:click=export
                        prop:disabled=move || state.steering.get().active().is_empty()>"Export the vector (safetensors)"</button>
                </div>
            </section>
        </Show>
    }
}

/// A safetensors file holding the steering vector (`steering`, f32, [hidden]) and its layer in the metadata.
fn steering_safetensors(layer: usize, values: &[f32]) -> Vec<u8> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![values.len()], &bytes)
        .expect("the length matches the shape");
    let metadata = std::collections::HashMap::from([
        ("layer".to_string(), layer.to_string()),
        ("hook".to_string(), "resid_post".to_string()),
        ("made_by".to_string(), "SAIF in the browser".to_string()),
    ]);
    safetensors::serialize([("steering", view)], Some(metadata)).unwrap_or_default()
}

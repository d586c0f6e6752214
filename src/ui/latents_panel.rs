//! The SAE latents most active at the prompt's last token, with the tokens each one's decoder direction promotes:
//! the first look at which latents encode an instruction.

use leptos::prelude::*;

use super::client::WorkerClient;
use super::state::AppState;
use crate::protocol::Request;

#[component]
pub fn LatentsPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    let has_sae = move || state.model.with(|m| m.as_ref().is_some_and(|m| m.sae.is_some()));
    // The SAE in use: the one of the last reading, else the one loaded with the model.
    let current = move || state.latents.get().map(|l| l.sae).or_else(|| state.model.get().and_then(|m| m.sae));
    let chosen = state.sae_layer;
    let read = move |_| {
        state.error.set(None);
        let request = Request::Latents {
            text: state.text.get_untracked(),
            chat: state.chat.get_untracked(),
            top: 12,
            layer: chosen.get_untracked(),
        };
        let id = client.send(request, None);
        state.reading_latents.set(Some(id));
    };
    let layers = move || current().map(|s| s.shipped_layers).unwrap_or_default();
    view! {
        <Show when=has_sae>
            <section class="panel" id="latents-panel">
                <h2>"SAE latents"</h2>
                <p class="hint">{move || current().map(|s| format!(
                    "{} latents, {}, on resid_post of layer {} ({}).", s.width, s.activation, s.layer, s.source
                ))}</p>
                <Show when=move || { layers().len() > 1 }>
                    <label>"SAE of layer "
                        <select id="sae-layer" on:change=move |ev| chosen.set(event_target_value(&ev).parse().ok())>
                            {move || {
                                let selected = chosen.get().or_else(|| current().map(|s| s.layer));
                                layers().into_iter().map(|l| view! {
                                    <option value=l.to_string() selected=Some(l) == selected>{l.to_string()}</option>
                                }).collect_view()
                            }}
                        </select>
                    </label>
                    " "
                </Show>
                <button id="read-latents" on:click=read prop:disabled=move || state.is_busy()>
                    "Show the latents at the prompt's last token"
                </button>
                {move || state.latents.get().map(|list| {
                    let max = list.latents.first().map_or(1.0, |l| l.activation).max(1e-6);
                    view! {
                        <p class="hint">{format!("Layer {}, at the token {:?}:", list.sae.layer, list.token)}</p>
                        <table class="latents" id="latent-table">
                            <tr><th>"latent"</th><th>"activation"</th><th>"promotes"</th></tr>
                            {list.latents.into_iter().map(|l| view! {
                                <tr>
                                    <td class="latent-index">{l.index}</td>
                                    <td>
                                        <span class="bar" style:width=format!("{:.0}px", 80.0 * l.activation / max)></span>
                                        {format!(" {:.2}", l.activation)}
                                    </td>
                                    <td class="lens">{l.tokens.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(" ")}</td>
                                </tr>
                            }).collect_view()}
                        </table>
                    }
                })}
            </section>
        </Show>
    }
}

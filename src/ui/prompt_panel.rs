//! The prompt: its tokens as the loaded model's tokenizer sees them, and generation from it, streamed, with the
//! sampling settings (greedy, or temperature, top-k, top-p and a seed: the same seed gives the same text). With
//! latents steering, the default and the steered output are generated side by side from the same seed.

use gloo::timers::callback::Timeout;
use leptos::prelude::*;

use super::client::WorkerClient;
use super::state::{AppState, Outputs};
use crate::protocol::{GenerateRequest, Output, Request, Response, SteeringSpec};

/// Sends the prompt for generation and streams both outputs into the state.
fn generate(state: AppState, client: WorkerClient) {
    state.error.set(None);
    let set = state.steering.get_untracked();
    let steering = (!set.active().is_empty() && state.sae.get_untracked().is_some()).then(|| SteeringSpec {
        latents: set.active(),
        multiplier: set.multiplier,
        scope: set.scope,
    });
    state.outputs.set(Outputs { steered: steering.as_ref().map(|_| String::new()), ..Outputs::default() });
    let request = GenerateRequest {
        prompt: state.text.get_untracked(),
        chat: state.chat.get_untracked(),
        max_new_tokens: state.max_new_tokens.get_untracked().clamp(1, 1024),
        sampling: state.sampling.get_untracked().sampling(),
        steering,
    };
    let call = client.call(Request::Generate(request), vec![], move |r| {
        if let Response::Text { output, text, .. } = r {
            state.outputs.update(|o| match output {
                Output::Default => o.default = text,
                Output::Steered => o.steered = Some(text),
            });
        }
    });
    leptos::task::spawn_local(async move {
        match call.await {
            Ok(Response::Generated(summary)) => state.outputs.update(|o| {
                o.default = summary.default.text.clone();
                o.steered = summary.steered.as_ref().map(|s| s.text.clone());
                o.summary = Some(summary);
            }),
            Ok(_) => {}
            Err(e) => state.fail(e),
        }
    });
}

#[component]
pub fn PromptPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();

    // Re-tokenize when the text, the template or the model changes, once typing pauses for 120 ms; answers to
    // older text are dropped.
    let pending = StoredValue::new_local(None::<Timeout>);
    let latest = StoredValue::new(0u32);
    Effect::new(move |_| {
        let text = state.text.get();
        let add_bos = state.add_bos.get();
        let chat = state.chat.get();
        if state.model.with(|m| m.is_some()) {
            let timeout = Timeout::new(120, move || {
                let ticket = latest.get_value() + 1;
                latest.set_value(ticket);
                let call = client.call(Request::Tokenize { text, add_bos, chat }, vec![], |_| {});
                leptos::task::spawn_local(async move {
                    let answer = call.await;
                    if latest.get_value() == ticket {
                        state.tokens.set(match answer {
                            Ok(Response::Tokens(list)) => Some(list),
                            _ => None,
                        });
                    }
                });
            });
            // Replacing the pending timeout drops (cancels) the previous one.
            pending.set_value(Some(timeout));
        }
    });

    let number = |ev: &leptos::ev::Event| event_target_value(ev).trim().parse::<f64>().ok().filter(|v| v.is_finite());
    let generating = move || state.outputs.with(|o| o.summary.is_none()) && state.busy.get() > 0;

    view! {
        <Show when=move || state.model.get().is_some()>
            <section class="panel" id="prompt-panel">
                <h2>"Prompt"</h2>
                <label for="prompt" class="visually-hidden">"Prompt"</label>
                <textarea id="prompt" rows="3" spellcheck="false"
                    prop:value=move || state.text.get()
                    on:input=move |ev| state.text.set(event_target_value(&ev))></textarea>
                <div class="row">
                    <label>
                        <input type="checkbox" id="chat" prop:checked=move || state.chat.get()
                            on:change=move |ev| state.chat.set(event_target_checked(&ev))/>
                        " Chat template"
                    </label>
                    <label>" New tokens "
                        <input type="number" id="max-new-tokens" min="1" max="1024" class="narrow"
                            prop:value=move || state.max_new_tokens.get().to_string()
                            on:change=move |ev| if let Some(v) = number(&ev) { state.max_new_tokens.set(v.clamp(1.0, 1024.0) as usize) }/>
                    </label>
                    <label>
                        <input type="checkbox" id="greedy" prop:checked=move || state.sampling.get().greedy
                            on:change=move |ev| state.sampling.update(|s| s.greedy = event_target_checked(&ev))/>
                        " Greedy"
                    </label>
                    <label>"Seed "
                        <input type="number" id="seed" min="0" class="narrow" prop:value=move || state.sampling.get().seed.to_string()
                            on:change=move |ev| if let Some(v) = number(&ev) { state.sampling.update(|s| s.seed = v.max(0.0) as u64) }/>
                    </label>
                </div>
                <Show when=move || !state.sampling.get().greedy>
                    <div class="row">
                        <label>"Temperature "
                            <input type="number" id="temperature" step="0.1" min="0.01" max="10" class="narrow" prop:value=move || state.sampling.get().temperature.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev).filter(|v| *v > 0.0) { state.sampling.update(|s| s.temperature = v as f32) }/>
                        </label>
                        <label>"Top-k "
                            <input type="number" min="0" class="narrow" prop:value=move || state.sampling.get().top_k.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev) { state.sampling.update(|s| s.top_k = v.max(0.0) as usize) }/>
                        </label>
                        <label>"Top-p "
                            <input type="number" id="top-p" step="0.05" min="0.01" max="1" class="narrow" prop:value=move || state.sampling.get().top_p.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev).filter(|v| *v > 0.0 && *v <= 1.0) { state.sampling.update(|s| s.top_p = v as f32) }/>
                        </label>
                    </div>
                </Show>
                <div class="row">
                    <button id="generate" on:click=move |_| generate(state, client) prop:disabled=move || state.is_busy()>
                        {move || if state.steering.get().active().is_empty() { "Generate" } else { "Generate, default and steered" }}
                    </button>
                    <button id="stop" class="secondary" on:click=move |_| client.send(Request::Stop) prop:disabled=move || !generating()>"Stop"</button>
                    {move || state.outputs.get().summary.map(|g| view! {
                        <span class="hint" id="generation-stats">{format!(
                            "{} tokens ({}); first token after {:.0} ms",
                            g.default.ids.len(), g.default.stop.replace('_', " "), g.time_to_first_token_ms
                        )}</span>
                    })}
                </div>
                <div class="outputs" class:two=move || state.outputs.get().steered.is_some()>
                    <figure>
                        <figcaption>{move || output_caption("Default", state.outputs.get().summary.map(|s| s.default.tokens_per_s))}</figcaption>
                        <pre class="output" id="output-default" aria-live="polite" data-ids=move || {
                            state.outputs.get().summary.map(|g| format!("{:?}", g.default.ids)).unwrap_or_default()
                        }>{move || state.outputs.get().default}</pre>
                    </figure>
                    <Show when=move || state.outputs.get().steered.is_some()>
                        <figure>
                            <figcaption>{move || output_caption("Steered", state.outputs.get().summary.and_then(|s| s.steered).map(|s| s.tokens_per_s))}</figcaption>
                            <pre class="output steered" id="output-steered" aria-live="polite" data-ids=move || {
                                state.outputs.get().summary.and_then(|g| g.steered).map(|s| format!("{:?}", s.ids)).unwrap_or_default()
                            }>{move || state.outputs.get().steered.unwrap_or_default()}</pre>
                        </figure>
                    </Show>
                </div>
                <details>
                    <summary>{move || match state.tokens.get() {
                        Some(list) => format!("The prompt as the model sees it: {} tokens", list.tokens.len()),
                        None => "The prompt as the model sees it".to_string(),
                    }}</summary>
                    <label class="row">
                        <input type="checkbox" prop:checked=move || state.add_bos.get()
                            on:change=move |ev| state.add_bos.set(event_target_checked(&ev))/>
                        " Start with BOS when the model asks for it (as a prompt is fed)"
                    </label>
                    {move || state.tokens.get().map(|list| {
                        let ids = list.tokens.iter().map(|t| t.id.to_string()).collect::<Vec<_>>().join(", ");
                        view! {
                            <div class="tokens">
                                {list.tokens.into_iter().map(|t| view! {
                                    <span class="token" class:special=t.special title=format!("id {}", t.id)>
                                        <span class="token-text">{visible(&t.text)}</span>
                                        <span class="token-id">{t.id}</span>
                                    </span>
                                }).collect_view()}
                            </div>
                            <p class="ids">"ids: " <code id="token-ids">{format!("[{ids}]")}</code></p>
                        }
                    })}
                </details>
            </section>
        </Show>
    }
}

fn output_caption(which: &str, tokens_per_s: Option<f64>) -> String {
    match tokens_per_s {
        Some(speed) if speed > 0.0 => format!("{which} ({speed:.1} tokens/s)"),
        _ => which.to_string(),
    }
}

/// Makes whitespace visible inside a token chip.
pub fn visible(text: &str) -> String {
    text.replace(' ', "·").replace('\n', "↵").replace('\t', "→")
}

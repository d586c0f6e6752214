//! The prompt: its tokens as the loaded model's tokenizer sees them, and generation from it, streamed, with the
//! sampling settings (greedy, or temperature, top-k, top-p and a seed: the same seed gives the same text).

use gloo::timers::callback::Timeout;
use leptos::prelude::*;

use super::client::WorkerClient;
use super::state::{AppState, SamplingForm};
use crate::protocol::{GenerateRequest, Request, Sampling};

impl SamplingForm {
    pub fn sampling(&self) -> Sampling {
        if self.greedy {
            Sampling::Greedy
        } else {
            Sampling::Random {
                temperature: self.temperature,
                top_k: (self.top_k > 0).then_some(self.top_k),
                top_p: (self.top_p < 1.0).then_some(self.top_p),
                seed: self.seed,
            }
        }
    }
}

#[component]
pub fn PromptPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();

    // Re-tokenize when the text, the template or the model changes, once typing pauses for 120 ms.
    let pending = StoredValue::new_local(None::<Timeout>);
    Effect::new(move |_| {
        let text = state.text.get();
        let add_bos = state.add_bos.get();
        let chat = state.chat.get();
        if state.model.with(|m| m.is_some()) {
            let timeout = Timeout::new(120, move || {
                let id = client.send(Request::Tokenize { text, add_bos, chat }, None);
                state.latest_tokenize.set(id);
            });
            // Replacing the pending timeout drops (cancels) the previous one.
            pending.set_value(Some(timeout));
        }
    });

    let generate = move |_| {
        state.error.set(None);
        state.output.set(String::new());
        state.generation.set(None);
        let request = GenerateRequest {
            prompt: state.text.get_untracked(),
            chat: state.chat.get_untracked(),
            max_new_tokens: state.max_new_tokens.get_untracked().clamp(1, 1024),
            sampling: state.sampling.get_untracked().sampling(),
        };
        let id = client.send(Request::Generate(request), None);
        state.generating.set(Some(id));
    };
    let stop = move |_| {
        client.send(Request::Stop, None);
    };
    let number = |ev: &leptos::ev::Event| event_target_value(ev).trim().parse::<f64>().ok();

    view! {
        <Show when=move || state.model.get().is_some()>
            <section class="panel" id="prompt-panel">
                <h2>"Prompt"</h2>
                <textarea id="prompt" rows="3" spellcheck="false"
                    prop:value=move || state.text.get()
                    on:input=move |ev| state.text.set(event_target_value(&ev))></textarea>
                <div class="row">
                    <label>
                        <input type="checkbox" id="chat" prop:checked=move || state.chat.get()
                            on:change=move |ev| state.chat.set(event_target_checked(&ev))/>
                        " Use the model's chat template"
                    </label>
                    <label>" New tokens "
                        <input type="number" id="max-new-tokens" min="1" max="1024" class="narrow"
                            prop:value=move || state.max_new_tokens.get().to_string()
                            on:change=move |ev| if let Some(v) = number(&ev) { state.max_new_tokens.set(v as usize) }/>
                    </label>
                    <label>
                        <input type="checkbox" id="greedy" prop:checked=move || state.sampling.get().greedy
                            on:change=move |ev| state.sampling.update(|s| s.greedy = event_target_checked(&ev))/>
                        " Greedy"
                    </label>
                </div>
                <Show when=move || !state.sampling.get().greedy>
                    <div class="row">
                        <label>"Temperature "
                            <input type="number" step="0.1" min="0.01" class="narrow" prop:value=move || state.sampling.get().temperature.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev) { state.sampling.update(|s| s.temperature = v as f32) }/>
                        </label>
                        <label>"Top-k "
                            <input type="number" min="0" class="narrow" prop:value=move || state.sampling.get().top_k.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev) { state.sampling.update(|s| s.top_k = v as usize) }/>
                        </label>
                        <label>"Top-p "
                            <input type="number" step="0.05" min="0.01" max="1" class="narrow" prop:value=move || state.sampling.get().top_p.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev) { state.sampling.update(|s| s.top_p = v as f32) }/>
                        </label>
                        <label>"Seed "
                            <input type="number" min="0" class="narrow" prop:value=move || state.sampling.get().seed.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev) { state.sampling.update(|s| s.seed = v as u64) }/>
                        </label>
                    </div>
                </Show>
                <div class="row">
                    <button id="generate" on:click=generate prop:disabled=move || state.is_busy()>"Generate"</button>
                    <button id="stop" class="secondary" on:click=stop prop:disabled=move || state.generating.get().is_none()>"Stop"</button>
                    {move || state.generation.get().map(|g| view! {
                        <span class="hint" id="generation-stats">{format!(
                            "{} tokens ({}); first token after {:.0} ms, then {:.1} tokens/s",
                            g.ids.len(), g.stop.replace('_', " "), g.time_to_first_token_ms, g.decode_tokens_per_s
                        )}</span>
                    })}
                </div>
                <pre class="output" id="output" data-ids=move || {
                    state.generation.get().map(|g| format!("{:?}", g.ids)).unwrap_or_default()
                }>{move || state.output.get()}</pre>
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

/// Makes whitespace visible inside a token chip.
fn visible(text: &str) -> String {
    text.replace(' ', "·").replace('\n', "↵").replace('\t', "→")
}

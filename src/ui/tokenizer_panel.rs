//! Tokenize what the visitor types, with the loaded model's own tokenizer: each token with its id.

use gloo::timers::callback::Timeout;
use leptos::prelude::*;

use super::client::WorkerClient;
use super::state::AppState;
use crate::protocol::Request;

#[component]
pub fn TokenizerPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();

    // Re-tokenize when the text, the BOS choice or the model changes, once typing pauses for 120 ms.
    let pending = StoredValue::new_local(None::<Timeout>);
    Effect::new(move |_| {
        let text = state.text.get();
        let add_bos = state.add_bos.get();
        if state.model.with(|m| m.is_some()) {
            let timeout = Timeout::new(120, move || {
                let id = client.send(Request::Tokenize { text, add_bos }, None);
                state.latest_tokenize.set(id);
            });
            // Replacing the pending timeout drops (cancels) the previous one.
            pending.set_value(Some(timeout));
        }
    });

    view! {
        <Show when=move || state.model.get().is_some()>
            <section class="panel" id="tokenizer">
                <h2>"Tokenizer"</h2>
                <textarea id="tokenizer-input" rows="3" spellcheck="false"
                    prop:value=move || state.text.get()
                    on:input=move |ev| state.text.set(event_target_value(&ev))></textarea>
                <label class="row">
                    <input type="checkbox" prop:checked=move || state.add_bos.get()
                        on:change=move |ev| state.add_bos.set(event_target_checked(&ev))/>
                    " Start with BOS when the model asks for it (as a prompt is fed)"
                </label>
                {move || state.tokens.get().map(|list| {
                    let ids = list.tokens.iter().map(|t| t.id.to_string()).collect::<Vec<_>>().join(", ");
                    view! {
                        <p class="count" id="token-count">{format!("{} tokens", list.tokens.len())}</p>
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
            </section>
        </Show>
    }
}

/// Makes whitespace visible inside a token chip.
fn visible(text: &str) -> String {
    text.replace(' ', "·").replace('\n', "↵").replace('\t', "→")
}

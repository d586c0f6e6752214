//! Choosing and loading a model (offline default, any URL, or a local file) with a progress bar, and the card
//! that describes the loaded model.

use leptos::prelude::*;

use super::client::WorkerClient;
use super::state::AppState;
use crate::catalog::{self, MODELS};
use crate::link::{ModelChoice, SaeChoice};
use crate::protocol::{human_bytes, BackendChoice, Expected, Request, Response, SaeSource};

/// Asks the worker to load the chosen model; once loaded, the SAE the link asks for is put in use.
pub fn load_choice(state: AppState, client: WorkerClient) {
    let (url, name, expected) = match state.choice.get_untracked() {
        ModelChoice::Catalog(id) => {
            let m = catalog::find(id).expect("catalog ids are checked when read");
            let expected = Expected { bytes: Some(m.bytes), sha256: m.sha256.map(String::from) };
            (m.url.to_string(), m.label.to_string(), expected)
        }
        ModelChoice::Url(url) => {
            let name = url.rsplit('/').next().unwrap_or(&url).to_string();
            (url, name, Expected::default())
        }
    };
    state.confirm_model.set(None);
    let backend = state.backend.get_untracked();
    load(state, client, Request::LoadUrl { url, name, backend, expected }, vec![]);
}

fn load(state: AppState, client: WorkerClient, request: Request, files: Vec<web_sys::File>) {
    state.error.set(None);
    state.loading.set(Some(None));
    let call = client.call(request, files, move |r| {
        if let Response::Progress(p) = r {
            state.loading.set(Some(Some(p)));
        }
    });
    leptos::task::spawn_local(async move {
        let answer = call.await;
        state.loading.set(None);
        match answer {
            Ok(Response::Loaded(summary)) => {
                let default_layer = summary.default_sae_layer;
                let key = summary.key.clone();
                let previous = state.model.get_untracked().map(|m| m.key);
                if previous.is_some_and(|p| p != key) {
                    state.forget_other_models_latents();
                }
                state.model_loaded(summary);
                // The SAE comes after the model, so that Generate does not wait for it: the link's SAE, or the
                // model's default one.
                let use_default = move || {
                    if let Some(layer) = default_layer {
                        super::latents_panel::use_default_sae(state, client, layer);
                    }
                };
                match state.sae_choice.get_untracked() {
                    Some(SaeChoice::Layer(l)) => {
                        let choice = Some(SaeChoice::Layer(l));
                        super::latents_panel::use_sae(state, client, SaeSource::Shipped { layer: l }, vec![], choice);
                    }
                    Some(SaeChoice::Preset(id)) => match catalog::sae_preset(id).filter(|p| p.model_key == key) {
                        Some(p) => {
                            let source = SaeSource::Folder { url: p.url(), layer: p.layer, label: p.label.to_string() };
                            super::latents_panel::use_sae(state, client, source, vec![], Some(SaeChoice::Preset(id)));
                        }
                        None => {
                            state.notices.update(|n| {
                                n.push(format!(
                                    "The link's SAE preset {id} is not for this model; the shipped SAE is used."
                                ))
                            });
                            use_default();
                        }
                    },
                    None => use_default(),
                }
            }
            Ok(_) => {}
            Err(e) => state.fail(e),
        }
    });
}

/// A link that names a model outside the catalog: nothing is downloaded until the visitor agrees.
#[component]
pub fn ConfirmModel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    view! {
        {move || state.confirm_model.get().map(|url| view! {
            <div class="notice confirm" role="dialog" aria-labelledby="confirm-title" id="confirm-model">
                <div>
                    <strong id="confirm-title">"This link asks to download a model that is not in this page's catalog:"</strong>
                    <p><code class="url">{url.clone()}</code></p>
                    <p class="hint">"Nothing has been downloaded. Load it only if you trust where it comes from."</p>
                    <div class="row">
                        <button id="confirm-load" on:click=move |_| load_choice(state, client)
                            prop:disabled=move || !state.worker_ready.get()>"Download and load it"</button>
                        <button class="secondary" id="confirm-default" on:click=move |_| {
                            state.choice.set(ModelChoice::Catalog(catalog::DEFAULT_MODEL));
                            load_choice(state, client);
                        } prop:disabled=move || !state.worker_ready.get()>"Load the default model instead"</button>
                    </div>
                </div>
            </div>
        })}
    }
}

#[component]
pub fn ModelPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    let custom_url = RwSignal::new(match state.choice.get_untracked() {
        ModelChoice::Url(u) => u,
        ModelChoice::Catalog(_) => String::new(),
    });
    let file_input = NodeRef::<leptos::html::Input>::new();
    let busy = move || state.is_busy() || !state.worker_ready.get();
    let clear_cache = move |_| {
        let call = client.call(Request::ClearCache, vec![], |_| {});
        leptos::task::spawn_local(async move {
            match call.await {
                Ok(Response::CacheCleared { entries }) => {
                    state.cache.set(None);
                    state.notices.update(|n| n.push(format!("Removed {entries} cached download(s).")));
                }
                Ok(_) => {}
                Err(e) => state.fail(e),
            }
        });
    };

    let on_select = move |ev: leptos::ev::Event| {
        let value = event_target_value(&ev);
        if let Some(m) = catalog::find(&value) {
            state.choice.set(ModelChoice::Catalog(m.id));
        } else {
            state.choice.set(ModelChoice::Url(custom_url.get_untracked()));
        }
    };
    let on_file = move |_| {
        let Some(input) = file_input.get() else {
            return;
        };
        let Some(file) = input.files().and_then(|f| f.get(0)) else {
            return;
        };
        let backend = state.backend.get_untracked();
        load(state, client, Request::LoadFile { name: file.name(), backend }, vec![file]);
        input.set_value("");
    };

    view! {
        <section class="panel">
            <h2>"Model"</h2>
            <div class="row">
                <label for="model-select">"Model: "</label>
                <select id="model-select" on:change=on_select prop:disabled=busy>
                    {MODELS.iter().map(|m| {
                        let id = m.id;
                        view! {
                            <option value=id selected=move || state.choice.get() == ModelChoice::Catalog(id)>
                                {m.label}" — "{human_bytes(m.bytes)}
                            </option>
                        }
                    }).collect_view()}
                    <option value="url" selected=move || matches!(state.choice.get(), ModelChoice::Url(_))>
                        "Another GGUF file by URL…"
                    </option>
                </select>
                <button id="load-button" on:click=move |_| load_choice(state, client) prop:disabled=busy>"Load"</button>
            </div>
            <div class="row">
                <label for="backend-select">"Run on: "</label>
                <select id="backend-select" prop:disabled=busy on:change=move |ev| {
                    if let Some(b) = BackendChoice::from_id(&event_target_value(&ev)) {
                        state.backend.set(b);
                    }
                }>
                    {BackendChoice::ALL.into_iter().map(|b| view! {
                        <option value=b.id() selected=move || state.backend.get() == b>{b.label()}</option>
                    }).collect_view()}
                </select>
                <span class="hint">" (applies to the next load)"</span>
            </div>
            <Show when=move || matches!(state.choice.get(), ModelChoice::Url(_))>
                <div class="row">
                    <input type="url" class="wide" placeholder="https://huggingface.co/…/resolve/main/model.gguf"
                        prop:value=move || custom_url.get()
                        on:change=move |ev| {
                            let url = event_target_value(&ev);
                            custom_url.set(url.clone());
                            state.choice.set(ModelChoice::Url(url));
                        }/>
                </div>
            </Show>
            <p class="hint">
                {move || match state.choice.get() {
                    ModelChoice::Catalog(id) => catalog::find(id).map(|m| m.note).unwrap_or_default().to_string(),
                    ModelChoice::Url(_) => "Any Gemma 3, Gemma 2 or Llama-architecture GGUF a browser may fetch (CORS).".to_string(),
                }}
            </p>
            <div class="row">
                <label>"Or a GGUF file from your disk: "
                    <input type="file" accept=".gguf" node_ref=file_input on:change=on_file prop:disabled=busy/>
                </label>
                <button class="secondary" on:click=clear_cache prop:disabled=busy>
                    "Forget cached downloads"
                </button>
            </div>
            <LoadProgress/>
        </section>
    }
}

#[component]
fn LoadProgress() -> impl IntoView {
    let state = expect_context::<AppState>();
    let progress = move || state.loading.get();
    view! {
        <Show when=move || progress().is_some()>
            {move || {
                let p = progress().flatten();
                let (label, value, max) = match &p {
                    None => ("Starting…".to_string(), None, 1.0),
                    Some(p) => {
                        let what = p.stage.label();
                        let text = match (p.total, p.stage.counts_bytes()) {
                            (Some(t), true) => format!("{what}: {} of {} ({}%)", human_bytes(p.done), human_bytes(t), p.done * 100 / t.max(1)),
                            (None, true) => format!("{what}: {}", human_bytes(p.done)),
                            (Some(t), false) => format!("{what}: {} of {}", p.done, t),
                            (None, false) => format!("{what}…"),
                        };
                        (text, p.total.map(|_| p.done as f64), p.total.unwrap_or(1) as f64)
                    }
                };
                view! {
                    <div class="progress" id="load-progress">
                        {match value {
                            Some(v) => view! { <progress max=max value=v></progress> }.into_any(),
                            None => view! { <progress></progress> }.into_any(),
                        }}
                        <span>{label}</span>
                    </div>
                }
            }}
        </Show>
    }
}

#[component]
pub fn ModelCard() -> impl IntoView {
    let state = expect_context::<AppState>();
    view! {
        <Show when=move || state.model.get().is_some()>
            {move || state.model.get().map(|m| {
                let types = m.tensor_types.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", ");
                let source = if m.from_cache { "from the browser cache" } else { "downloaded" };
                let rows = vec![
                    ("Architecture", m.architecture.clone()),
                    ("Layers", m.layers.to_string()),
                    ("Hidden size", m.hidden.to_string()),
                    ("Attention heads (key/value)", format!("{} ({}) × {}", m.heads, m.kv_heads, m.head_dim)),
                    ("MLP width", m.ffn_hidden.to_string()),
                    ("Vocabulary", format!("{} ({})", m.vocab_size, m.tokenizer)),
                    ("Context", format!("{} tokens", m.context_length)),
                    ("Runs on", m.backend.clone()),
                    ("SAE", match state.sae.get() {
                        Some(s) => format!("layer {}, {} latents, {}", s.layer, s.width, s.activation),
                        None if state.loading_sae() => "loading…".to_string(),
                        None if m.shipped_layers.is_empty() => "none found for this model".to_string(),
                        None => "none in use".to_string(),
                    }),
                    ("Prompted as", if m.instruction_tuned { "a chat (instruction-tuned)".to_string() } else { "plain text (pretrained)".to_string() }),
                    ("Tensors", types),
                    ("File", format!("{} ({source}), loaded in {:.1} s", human_bytes(m.file_bytes), m.load_ms / 1000.0)),
                    ("Load steps", m.load_steps.iter()
                        .map(|(stage, ms)| format!("{} {:.2} s", stage.label(), ms / 1000.0))
                        .collect::<Vec<_>>().join(" · ")),
                ];
                view! {
                    <section class="panel" id="model-card">
                        <h2>{m.name.clone()}</h2>
                        <table class="facts">
                            {rows.into_iter().map(|(k, v)| view! { <tr><th>{k}</th><td>{v}</td></tr> }).collect_view()}
                        </table>
                        <details>
                            <summary>{format!("All {} metadata entries", m.metadata.len())}</summary>
                            <table class="metadata">
                                {m.metadata.iter().map(|(k, v)| view! {
                                    <tr><th>{k.clone()}</th><td>{v.clone()}</td></tr>
                                }).collect_view()}
                            </table>
                        </details>
                    </section>
                }
            })}
        </Show>
    }
}

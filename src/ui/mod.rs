//! The page (Leptos, client-side rendered). `state` holds the signals, `client` talks to the engine's worker,
//! and each panel is a component of its own.

mod bench_panel;
mod client;
mod latents_panel;
mod model_panel;
mod prompt_panel;
mod state;

use leptos::prelude::*;

use crate::link;
use client::WorkerClient;
use state::AppState;

pub fn start() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}

#[component]
fn App() -> impl IntoView {
    let query = web_sys::window().and_then(|w| w.location().search().ok()).unwrap_or_default();
    let (link_state, notices) = link::parse(&query);
    let state = AppState::new(link_state, notices);
    let client = WorkerClient::new(state);
    provide_context(state);
    provide_context(client);

    // Load the link's model each time a worker comes up (at the start, and after a restart).
    Effect::new(move |was_ready: Option<bool>| {
        let ready = state.worker_ready.get();
        if ready && was_ready != Some(true) {
            model_panel::load_choice(state, client);
        }
        ready
    });
    // Keep the address bar's link in step with the page, without adding history entries.
    Effect::new(move |_| {
        let query = link::to_query(&link::LinkState {
            model: state.choice.get(),
            text: state.text.get(),
            backend: state.backend.get(),
            chat: state.chat.get(),
        });
        if let Some(window) = web_sys::window() {
            if let Ok(history) = window.history() {
                let _ = history.replace_state_with_url(&wasm_bindgen::JsValue::NULL, "", Some(&query));
            }
        }
    });

    view! {
        <header>
            <h1>"SAIF in the browser"</h1>
            <p class="tagline">
                "Find the sparse-autoencoder latents that encode an instruction, and steer a language model with them, "
                "on your own GPU. Companion to "
                <a href="https://arxiv.org/abs/2502.11356">"He et al. 2025, arXiv 2502.11356"</a> "."
            </p>
        </header>
        <main>
            <Notices/>
            <ErrorBanner/>
            <model_panel::ModelPanel/>
            <prompt_panel::PromptPanel/>
            <latents_panel::LatentsPanel/>
            <model_panel::ModelCard/>
            <bench_panel::BenchPanel/>
        </main>
        <footer>
            "The model runs in this tab; nothing you type leaves your machine. Downloads are kept in the browser's "
            "cache for the next visit."
        </footer>
    }
}

#[component]
fn ErrorBanner() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    view! {
        <Show when=move || state.error.get().is_some()>
            <div class="error" role="alert">
                <strong>"Something went wrong: "</strong>
                <span class="error-message">{move || state.error.get().unwrap_or_default()}</span>
                <Show when=move || state.gpu_lost.get()>
                    <button id="reload-on-cpu" on:click=move |_| {
                        state.error.set(None);
                        state.gpu_lost.set(false);
                        state.backend.set(crate::protocol::BackendChoice::Cpu);
                        model_panel::load_choice(state, client);
                    }>"Load the model again on the CPU"</button>
                </Show>
                <Show when=move || matches!(state.status.get(), state::Status::Stopped)>
                    <button on:click=move |_| {
                        state.error.set(None);
                        state.model.set(None);
                        state.status.set(state::Status::Idle);
                        client.restart();
                    }>"Restart the engine"</button>
                </Show>
                <button class="dismiss" on:click=move |_| state.error.set(None)>"Dismiss"</button>
            </div>
        </Show>
    }
}

#[component]
fn Notices() -> impl IntoView {
    let state = expect_context::<AppState>();
    view! {
        <Show when=move || !state.notices.get().is_empty()>
            <div class="notice">
                <ul>{move || state.notices.get().into_iter().map(|n| view! { <li>{n}</li> }).collect_view()}</ul>
                <button class="dismiss" on:click=move |_| state.notices.set(vec![])>"Dismiss"</button>
            </div>
        </Show>
    }
}

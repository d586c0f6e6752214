//! The page (Leptos, client-side rendered). `state` holds the signals, `client` talks to the engine's worker, and
//! each panel is a component of its own: the model, the prompt and its generations, the steering set, the SAE's
//! latents (reading, search, card), SAIF (discovery and evaluation), the cache and the benchmark.

mod bench_panel;
mod cache_panel;
mod client;
mod frames;
mod latents_panel;
mod model_panel;
mod prompt_panel;
mod saif_panel;
mod state;
mod steer;
mod steering_panel;

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
    frames::watch(state);
    install_debug_hooks(state, client);

    // Load the link's model each time a worker comes up (at the start, and after a restart), unless it is a URL
    // outside the catalog: that waits for the visitor's consent (model_panel::ConfirmModel).
    Effect::new(move |was_ready: Option<bool>| {
        let ready = state.worker_ready.get();
        if ready && was_ready != Some(true) && state.confirm_model.get_untracked().is_none() {
            model_panel::load_choice(state, client);
        }
        ready
    });
    // Keep the address bar's link in step with the page, without adding history entries.
    Effect::new(move |_| {
        let query = link::to_query(&state.link());
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
                "on your own GPU or CPU. Companion to "
                <a href="https://arxiv.org/abs/2502.11356">"He et al. 2025, arXiv 2502.11356"</a> "."
            </p>
        </header>
        <main>
            <Notices/>
            <ErrorBanner/>
            <model_panel::ConfirmModel/>
            <model_panel::ModelPanel/>
            <div class="columns">
                <prompt_panel::PromptPanel/>
                <steering_panel::SteeringPanel/>
            </div>
            <latents_panel::LatentsPanel/>
            <saif_panel::SaifPanel/>
            <model_panel::ModelCard/>
            <cache_panel::CachePanel/>
            <bench_panel::BenchPanel/>
        </main>
        <footer>
            "The model runs in this tab; nothing you type leaves your machine. Downloads are kept in the browser's "
            "cache for the next visit, with their size and checksum."
        </footer>
    }
}

/// `window.saifDebug.loseGpu()`: destroys the worker's WebGPU device, as a driver reset would, so that the
/// recovery can be tried (the end-to-end tests do).
fn install_debug_hooks(state: AppState, client: WorkerClient) {
    use wasm_bindgen::prelude::*;
    let lose = Closure::<dyn Fn()>::new(move || {
        let call = client.call(crate::protocol::Request::LoseGpu, vec![], |_| {});
        leptos::task::spawn_local(async move {
            if let Err(e) = call.await {
                state.fail(e);
            }
        });
    });
    let hooks = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&hooks, &"loseGpu".into(), lose.as_ref());
    lose.forget();
    if let Some(window) = web_sys::window() {
        let _ = js_sys::Reflect::set(&window, &"saifDebug".into(), &hooks);
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
                <Show when=move || state.engine_stopped.get()>
                    <button on:click=move |_| {
                        state.error.set(None);
                        state.model.set(None);
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
            <div class="notice" role="status">
                <ul>{move || state.notices.get().into_iter().map(|n| view! { <li>{n}</li> }).collect_view()}</ul>
                <button class="dismiss" on:click=move |_| state.notices.set(vec![])>"Dismiss"</button>
            </div>
        </Show>
    }
}

/// A long task's progress bar with its Stop button (discovery, evaluation).
#[component]
pub fn WorkProgress() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    view! {
        {move || state.work.get().map(|w| view! {
            <div class="progress" id="work-progress">
                <progress max=w.total.max(1) value=w.done></progress>
                <span>{format!("{} ({} of {})", w.phase, w.done, w.total)}</span>
                <button class="secondary" on:click=move |_| client.send(crate::protocol::Request::Stop)>"Stop"</button>
            </div>
        })}
    }
}

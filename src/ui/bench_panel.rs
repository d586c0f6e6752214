//! The benchmark page: prefill and decode speed, time to first token, GPU memory and dispatches per token of the
//! loaded model on this browser and machine, and what active hooks cost (saif_engine::bench, as `saif bench`).

use leptos::prelude::*;

use super::client::WorkerClient;
use super::state::AppState;
use crate::protocol::{human_bytes, BenchSettings, Request, Response};

#[component]
pub fn BenchPanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    let settings =
        RwSignal::new(BenchSettings { prompt_tokens: 64, decode_tokens: 32, runs: 3, with_hooks: true, batch: 2 });
    let running = RwSignal::new(false);
    let run = move |_| {
        state.error.set(None);
        running.set(true);
        let call = client.call(Request::Bench(settings.get_untracked()), vec![], |_| {});
        leptos::task::spawn_local(async move {
            let answer = call.await;
            running.set(false);
            match answer {
                Ok(Response::Benchmarked(r)) => state.bench.set(Some(r)),
                Ok(_) => {}
                Err(e) => state.fail(e),
            }
        });
    };
    let number = |ev: &leptos::ev::Event| event_target_value(ev).trim().parse::<usize>().ok().filter(|&v| v > 0);
    let browser = StoredValue::new(web_sys::window().and_then(|w| w.navigator().user_agent().ok()).unwrap_or_default());

    view! {
        <Show when=move || state.model.get().is_some()>
            <section class="panel" id="bench-panel">
                <details>
                    <summary><h2 class="inline">"Benchmark"</h2></summary>
                    <div class="row">
                        <label>"Prompt tokens "
                            <input type="number" min="1" class="narrow" prop:value=move || settings.get().prompt_tokens.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev) { settings.update(|s| s.prompt_tokens = v) }/>
                        </label>
                        <label>"Decoded tokens "
                            <input type="number" min="1" class="narrow" prop:value=move || settings.get().decode_tokens.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev) { settings.update(|s| s.decode_tokens = v) }/>
                        </label>
                        <label>"Runs "
                            <input type="number" min="1" class="narrow" prop:value=move || settings.get().runs.to_string()
                                on:change=move |ev| if let Some(v) = number(&ev) { settings.update(|s| s.runs = v) }/>
                        </label>
                        <button id="run-bench" on:click=run prop:disabled=move || state.is_busy()>
                            {move || if running.get() { "Measuring…" } else { "Run" }}
                        </button>
                    </div>
                    {move || state.bench.get().map(|r| {
                        let mut rows = vec![
                            ("Backend", r.backend.clone()),
                            ("Prefill", format!("{:.1} tokens/s ({} tokens)", r.prefill_tokens_per_s, r.prompt_tokens)),
                            ("Time to first token", format!("{:.0} ms", r.time_to_first_token_ms)),
                            ("Decode", format!("{:.1} tokens/s ({} tokens)", r.decode_tokens_per_s, r.decode_tokens)),
                        ];
                        if let (Some(speed), Some(overhead)) = (r.decode_tokens_per_s_with_hooks, r.hooks_overhead_percent) {
                            rows.push(("Decode with steering and an SAE read", format!("{speed:.1} tokens/s ({overhead:+.1}% time)")));
                        }
                        if let Some(bytes) = r.gpu_memory_bytes {
                            rows.push(("GPU memory held", human_bytes(bytes)));
                        }
                        if let Some(d) = r.dispatches_per_token {
                            rows.push(("Dispatches per token", d.to_string()));
                        }
                        if let (Some(batch), Some(speed)) = (r.batch, r.batched_decode_tokens_per_s) {
                            rows.push(("Batched decode", format!("{speed:.1} tokens/s in all, {batch} sequences at once")));
                        }
                        rows.push(("Longest frame of the page while busy", format!("{:.0} ms", state.longest_frame_ms.get())));
                        rows.push(("Browser", browser.get_value()));
                        rows.push(("Runs", format!("median of {}", r.runs)));
                        view! {
                            <table class="facts" id="bench-results">
                                {rows.into_iter().map(|(k, v)| view! { <tr><th>{k}</th><td>{v}</td></tr> }).collect_view()}
                            </table>
                        }
                    })}
                </details>
            </section>
        </Show>
    }
}

//! What the browser's cache holds (each file with its size and checksum), and deleting any of it.

use leptos::prelude::*;

use super::client::WorkerClient;
use super::state::AppState;
use crate::protocol::{human_bytes, Request, Response};

fn refresh(state: AppState, client: WorkerClient, request: Request) {
    let call = client.call(request, vec![], |_| {});
    leptos::task::spawn_local(async move {
        match call.await {
            Ok(Response::Cache { files }) => state.cache.set(Some(files)),
            Ok(_) => {}
            Err(e) => state.fail(e),
        }
    });
}

#[component]
pub fn CachePanel() -> impl IntoView {
    let state = expect_context::<AppState>();
    let client = expect_context::<WorkerClient>();
    view! {
        <section class="panel" id="cache-panel">
            <details on:toggle=move |_| refresh(state, client, Request::ListCache)>
                <summary><h2 class="inline">"Downloads kept in this browser"</h2></summary>
                {move || state.cache.get().map(|files| {
                    let total: u64 = files.iter().map(|f| f.bytes).sum();
                    view! {
                        <p class="hint">{format!("{} files, {} in all. Each is checked against its size and sha256 when read; a damaged one is downloaded again.", files.len(), human_bytes(total))}</p>
                        <table class="cache" id="cache-list">
                            {files.into_iter().map(|f| {
                                let url = f.url.clone();
                                let name = f.url.rsplit('/').next().unwrap_or(&f.url).to_string();
                                view! {
                                    <tr>
                                        <td title=f.url.clone()>{name}</td>
                                        <td>{human_bytes(f.bytes)}</td>
                                        <td class="hash" title="sha256">{f.sha256.map(|h| format!("{}…", &h[..h.len().min(12)])).unwrap_or_else(|| "no checksum".into())}</td>
                                        <td><button class="secondary small" on:click=move |_| refresh(state, client, Request::DeleteCached { url: url.clone() })>"Delete"</button></td>
                                    </tr>
                                }
                            }).collect_view()}
                        </table>
                    }
                })}
            </details>
        </section>
    }
}

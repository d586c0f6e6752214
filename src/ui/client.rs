//! The page's side of the worker protocol: spawns the engine's worker and turns each request into a future of its
//! final response (`call`), with the responses streamed along the way handed to a callback. Replies are matched
//! to their requests by id here, so a panel only awaits its own call. Calls that use the model count as busy
//! (`AppState::busy`), and calls that put an SAE in use as loading one (`AppState::sae_loading`), both derived
//! from the calls in flight. If the worker dies (out of memory, a crash), every call in flight fails with the
//! reason, and the page can start a new worker.

use std::collections::HashMap;

use futures_channel::oneshot;
use leptos::prelude::*;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{ErrorEvent, File, MessageEvent, Worker};

use super::state::AppState;
use crate::protocol::{Envelope, Request, Response};
use crate::worker::threads::cross_origin_isolated;

/// The loader trunk writes for the worker binary (`data-loader-shim` in index.html).
const WORKER_SCRIPT: &str = "./saif-worker_loader.js";
/// The threaded build's loader, a module worker (scripts/worker-threads.sh), for cross-origin isolated pages.
const THREADED_WORKER_SCRIPT: &str = "./saif-worker-threads_loader.js";

/// A call waiting for its final response.
struct Pending {
    on_stream: Box<dyn Fn(Response)>,
    done: oneshot::Sender<Response>,
    /// The count of calls in flight this one is among (`AppState::busy`, `AppState::sae_loading`).
    counted: Option<RwSignal<u32>>,
}

#[derive(Clone, Copy)]
pub struct WorkerClient {
    worker: StoredValue<Option<Worker>, LocalStorage>,
    next_id: StoredValue<u32>,
    pending: StoredValue<HashMap<u32, Pending>, LocalStorage>,
    /// Whether the running worker is the threaded build (a failure before it is ready falls back to the plain one).
    threaded: StoredValue<bool>,
    state: AppState,
}

/// Starts the engine's worker: the threaded build where the page is cross-origin isolated, else the plain one.
fn spawn_worker(threaded: bool) -> Result<Worker, JsValue> {
    if threaded {
        let options = web_sys::WorkerOptions::new();
        options.set_type(web_sys::WorkerType::Module);
        Worker::new_with_options(THREADED_WORKER_SCRIPT, &options)
    } else {
        Worker::new(WORKER_SCRIPT)
    }
}

/// Whether a request occupies the model (the controls that need it wait); tokenizing and the cache do not, and
/// neither does putting an SAE in use (the worker reads it while the model generates, and attaches it after).
fn uses_model(request: &Request) -> bool {
    !matches!(
        request,
        Request::UseSae { .. }
            | Request::Tokenize { .. }
            | Request::ListCache
            | Request::DeleteCached { .. }
            | Request::ClearCache
            | Request::SearchLatents { .. }
            | Request::Lens { .. }
            | Request::SteeringVector(_)
            | Request::LoseGpu
            | Request::Stop
    )
}

impl WorkerClient {
    pub fn new(state: AppState) -> Self {
        let client = Self {
            worker: StoredValue::new_local(None),
            next_id: StoredValue::new(1),
            pending: StoredValue::new_local(HashMap::new()),
            threaded: StoredValue::new(false),
            state,
        };
        client.restart();
        client
    }

    /// Starts a fresh worker (dropping the old one, and with it any model it held).
    pub fn restart(&self) {
        self.start(cross_origin_isolated());
    }

    fn start(&self, threaded: bool) {
        if let Some(old) = self.worker.get_value() {
            old.terminate();
        }
        self.fail_all("the engine was restarted");
        self.state.worker_ready.set(false);
        self.threaded.set_value(threaded);
        match spawn_worker(threaded) {
            Ok(worker) => {
                let client = *self;
                let onmessage = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
                    match serde_wasm_bindgen::from_value::<Envelope<Response>>(event.data()) {
                        Ok(envelope) => client.receive(envelope),
                        Err(e) => client.state.fail(format!("the engine sent a message the page cannot read: {e}")),
                    }
                });
                let onerror = Closure::<dyn FnMut(ErrorEvent)>::new(move |event: ErrorEvent| {
                    event.prevent_default();
                    // A threaded worker that never got ready (a browser without module workers or shared
                    // memory in workers): the plain one instead, on one thread.
                    if client.threaded.get_value() && !client.state.worker_ready.get_untracked() {
                        let text = format!(
                            "The engine's threaded build could not start ({}); it runs on one thread.",
                            event.message()
                        );
                        client.state.notices.update(|n| n.push(text));
                        client.start(false);
                        return;
                    }
                    let why = format!(
                        "The engine stopped ({}). It may have run out of memory; restart it to go on.",
                        event.message()
                    );
                    client.state.worker_ready.set(false);
                    client.state.engine_stopped.set(true);
                    client.fail_all(&why);
                    client.state.fail(why);
                });
                worker.set_onmessage(Some(onmessage.as_ref().unchecked_ref()));
                worker.set_onerror(Some(onerror.as_ref().unchecked_ref()));
                onmessage.forget();
                onerror.forget();
                self.state.engine_stopped.set(false);
                self.worker.set_value(Some(worker));
            }
            Err(e) => {
                self.state.engine_stopped.set(true);
                self.state.fail(format!("This browser could not start the engine's worker: {e:?}"));
            }
        }
    }

    /// Ends every call in flight with `why`.
    fn fail_all(&self, why: &str) {
        let pending: Vec<Pending> =
            self.pending.try_update_value(|p| p.drain().map(|(_, v)| v).collect()).unwrap_or_default();
        for p in pending {
            if let Some(count) = p.counted {
                count.update(|n| *n = n.saturating_sub(1));
            }
            let _ = p.done.send(Response::Error { message: why.to_string(), gpu_lost: false });
        }
    }

    fn receive(&self, Envelope { id, body }: Envelope<Response>) {
        if id == 0 {
            match body {
                Response::Ready => self.state.worker_ready.set(true),
                Response::Error { message, .. } => self.state.fail(message),
                Response::Notice { text } => self.state.notices.update(|n| n.push(text)),
                _ => {}
            }
            return;
        }
        if let Response::Notice { text } = &body {
            self.state.notices.update(|n| n.push(text.clone()));
        }
        if body.is_final() {
            let Some(p) = self.pending.try_update_value(|p| p.remove(&id)).flatten() else { return };
            if let Some(count) = p.counted {
                count.update(|n| *n = n.saturating_sub(1));
            }
            let _ = p.done.send(body);
        } else {
            self.pending.with_value(|p| {
                if let Some(p) = p.get(&id) {
                    (p.on_stream)(body)
                }
            });
        }
    }

    /// Sends `request` (with `files` beside it) and returns its final response: the result, or `Err` with a
    /// message for a person. Streamed responses go to `on_stream`.
    pub fn call(
        &self,
        request: Request,
        files: Vec<File>,
        on_stream: impl Fn(Response) + 'static,
    ) -> impl std::future::Future<Output = Result<Response, String>> {
        let id = self.next_id.get_value();
        self.next_id.set_value(id + 1);
        let (done, answer) = oneshot::channel();
        let counted = self.counted_among(&request);
        let sent = self.post(id, &request, &files);
        let state = self.state;
        if sent.is_ok() {
            if let Some(count) = counted {
                count.update(|n| *n += 1);
            }
            self.pending.update_value(|p| {
                p.insert(id, Pending { on_stream: Box::new(on_stream), done, counted });
            });
        }
        async move {
            sent?;
            match answer.await {
                Ok(Response::Error { message, gpu_lost }) => {
                    if gpu_lost {
                        state.gpu_lost.set(true);
                    }
                    Err(message)
                }
                Ok(response) => Ok(response),
                Err(_) => Err("the engine went away before answering".to_string()),
            }
        }
    }

    /// Which count of calls in flight `request` is among, if any.
    fn counted_among(&self, request: &Request) -> Option<RwSignal<u32>> {
        if matches!(request, Request::UseSae { .. }) {
            Some(self.state.sae_loading)
        } else {
            uses_model(request).then_some(self.state.busy)
        }
    }

    /// Sends a request whose answer nobody waits for (Stop).
    pub fn send(&self, request: Request) {
        let _ = self.post(0, &request, &[]);
    }

    fn post(&self, id: u32, request: &Request, files: &[File]) -> Result<(), String> {
        let body = serde_wasm_bindgen::to_value(&Envelope { id, body: request })
            .map_err(|e| format!("could not encode a request for the engine: {e}"))?;
        let message = js_sys::Object::new();
        let _ = js_sys::Reflect::set(&message, &"request".into(), &body);
        if !files.is_empty() {
            let list = js_sys::Array::new();
            files.iter().for_each(|f| {
                list.push(f);
            });
            let _ = js_sys::Reflect::set(&message, &"files".into(), &list);
        }
        let worker = self.worker.get_value().ok_or("the engine is not running; restart it")?;
        worker.post_message(&message).map_err(|e| format!("could not reach the engine: {e:?}"))
    }
}

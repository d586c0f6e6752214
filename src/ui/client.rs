//! The page's side of the worker protocol: spawns the engine's worker, sends requests, and turns responses into
//! changes of the page's state. If the worker dies (out of memory, a crash), the page says so and can start a
//! new one; nothing else on the page is lost.

use leptos::prelude::*;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{ErrorEvent, File, MessageEvent, Worker};

use super::state::{AppState, Status};
use crate::protocol::{Envelope, Request, Response};

/// The loader trunk writes for the worker binary (`data-loader-shim` in index.html).
const WORKER_SCRIPT: &str = "./saif-worker_loader.js";

#[derive(Clone, Copy)]
pub struct WorkerClient {
    worker: StoredValue<Option<Worker>, LocalStorage>,
    next_id: StoredValue<u32>,
    state: AppState,
}

impl WorkerClient {
    pub fn new(state: AppState) -> Self {
        let client = Self { worker: StoredValue::new_local(None), next_id: StoredValue::new(1), state };
        client.restart();
        client
    }

    /// Starts a fresh worker (dropping the old one, and with it any model it held).
    pub fn restart(&self) {
        if let Some(old) = self.worker.get_value() {
            old.terminate();
        }
        self.state.worker_ready.set(false);
        match Worker::new(WORKER_SCRIPT) {
            Ok(worker) => {
                let state = self.state;
                let onmessage = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
                    match serde_wasm_bindgen::from_value::<Envelope<Response>>(event.data()) {
                        Ok(envelope) => state.receive(envelope),
                        Err(e) => state.fail(format!("the engine sent a message the page cannot read: {e}")),
                    }
                });
                let onerror = Closure::<dyn FnMut(ErrorEvent)>::new(move |event: ErrorEvent| {
                    event.prevent_default();
                    state.worker_ready.set(false);
                    state.status.set(Status::Stopped);
                    state.fail(format!(
                        "The engine stopped ({}). It may have run out of memory; restart it to go on.",
                        event.message()
                    ));
                });
                worker.set_onmessage(Some(onmessage.as_ref().unchecked_ref()));
                worker.set_onerror(Some(onerror.as_ref().unchecked_ref()));
                onmessage.forget();
                onerror.forget();
                self.worker.set_value(Some(worker));
            }
            Err(e) => {
                self.state.status.set(Status::Stopped);
                self.state.fail(format!("This browser could not start the engine's worker: {e:?}"));
            }
        }
    }

    /// Sends a request; returns its id. `file` travels beside it for `LoadFile`.
    pub fn send(&self, request: Request, file: Option<&File>) -> u32 {
        let id = self.next_id.get_value();
        self.next_id.set_value(id + 1);
        let Ok(request) = serde_wasm_bindgen::to_value(&Envelope { id, body: request }) else {
            self.state.fail("could not encode a request for the engine".into());
            return id;
        };
        let message = js_sys::Object::new();
        let _ = js_sys::Reflect::set(&message, &"request".into(), &request);
        if let Some(file) = file {
            let _ = js_sys::Reflect::set(&message, &"file".into(), file);
        }
        match self.worker.get_value() {
            Some(worker) => {
                if let Err(e) = worker.post_message(&message) {
                    self.state.fail(format!("could not reach the engine: {e:?}"));
                }
            }
            None => self.state.fail("the engine is not running; restart it".into()),
        }
        id
    }
}

//! The page's state: signals the components read, changed by the visitor and by the worker's responses.

use leptos::prelude::*;

use crate::link::{LinkState, ModelChoice};
use crate::protocol::{Envelope, ModelSummary, Progress, Response, TokenList};

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Nothing loading; a model may or may not be loaded.
    Idle,
    /// Request `id` is loading a model.
    Loading { id: u32, progress: Option<Progress> },
    /// The worker died; it must be restarted.
    Stopped,
}

#[derive(Clone, Copy)]
pub struct AppState {
    pub status: RwSignal<Status>,
    pub worker_ready: RwSignal<bool>,
    pub model: RwSignal<Option<ModelSummary>>,
    /// The last error, shown until dismissed or replaced.
    pub error: RwSignal<Option<String>>,
    /// Notes about parts of the link that were ignored.
    pub notices: RwSignal<Vec<String>>,
    pub choice: RwSignal<ModelChoice>,
    pub text: RwSignal<String>,
    pub add_bos: RwSignal<bool>,
    pub tokens: RwSignal<Option<TokenList>>,
    /// The id of the newest tokenization request: older answers are dropped.
    pub latest_tokenize: RwSignal<u32>,
}

impl AppState {
    pub fn new(link: LinkState, notices: Vec<String>) -> Self {
        Self {
            status: RwSignal::new(Status::Idle),
            worker_ready: RwSignal::new(false),
            model: RwSignal::new(None),
            error: RwSignal::new(None),
            notices: RwSignal::new(notices),
            choice: RwSignal::new(link.model),
            text: RwSignal::new(link.text),
            add_bos: RwSignal::new(true),
            tokens: RwSignal::new(None),
            latest_tokenize: RwSignal::new(0),
        }
    }

    pub fn fail(&self, message: String) {
        self.error.set(Some(message));
    }

    pub fn is_loading(&self) -> bool {
        matches!(self.status.get(), Status::Loading { .. })
    }

    /// Applies one response from the worker.
    pub fn receive(&self, Envelope { id, body }: Envelope<Response>) {
        let loading_id = match self.status.get_untracked() {
            Status::Loading { id, .. } => Some(id),
            _ => None,
        };
        match body {
            Response::Ready => self.worker_ready.set(true),
            Response::Progress(progress) => {
                if loading_id == Some(id) {
                    self.status.set(Status::Loading { id, progress: Some(progress) });
                }
            }
            Response::Loaded(summary) => {
                if loading_id == Some(id) {
                    self.status.set(Status::Idle);
                }
                self.error.set(None);
                self.model.set(Some(summary));
            }
            Response::Tokens(tokens) => {
                if id == self.latest_tokenize.get_untracked() {
                    self.tokens.set(Some(tokens));
                }
            }
            Response::CacheCleared { entries } => {
                self.notices.update(|n| n.push(format!("Removed {entries} cached download(s).")));
            }
            Response::Error { message } => {
                if loading_id == Some(id) {
                    self.status.set(Status::Idle);
                }
                if id == self.latest_tokenize.get_untracked() {
                    self.tokens.set(None);
                }
                self.fail(message);
            }
        }
    }
}

//! The page's state: signals the components read, changed by the visitor and by the worker's responses.

use leptos::prelude::*;

use crate::link::{LinkState, ModelChoice};
use crate::protocol::{
    BackendChoice, BenchResult, Envelope, GenerationSummary, LatentList, ModelSummary, Progress, Response, TokenList,
};

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Nothing loading; a model may or may not be loaded.
    Idle,
    /// Request `id` is loading a model.
    Loading { id: u32, progress: Option<Progress> },
    /// The worker died; it must be restarted.
    Stopped,
}

/// The sampling settings as the form holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingForm {
    pub greedy: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingForm {
    fn default() -> Self {
        Self { greedy: true, temperature: 0.8, top_k: 40, top_p: 0.95, seed: 1 }
    }
}

#[derive(Clone, Copy)]
pub struct AppState {
    pub status: RwSignal<Status>,
    pub worker_ready: RwSignal<bool>,
    pub model: RwSignal<Option<ModelSummary>>,
    /// The last error, shown until dismissed or replaced.
    pub error: RwSignal<Option<String>>,
    /// The GPU failed: the model must be loaded again (the page offers the CPU).
    pub gpu_lost: RwSignal<bool>,
    /// Notes about parts of the link that were ignored, and other things worth knowing.
    pub notices: RwSignal<Vec<String>>,
    pub choice: RwSignal<ModelChoice>,
    pub backend: RwSignal<BackendChoice>,
    /// The prompt.
    pub text: RwSignal<String>,
    pub chat: RwSignal<bool>,
    pub add_bos: RwSignal<bool>,
    pub tokens: RwSignal<Option<TokenList>>,
    /// The id of the newest tokenization request: older answers are dropped.
    pub latest_tokenize: RwSignal<u32>,
    pub max_new_tokens: RwSignal<usize>,
    pub sampling: RwSignal<SamplingForm>,
    /// The generation under way (its request id).
    pub generating: RwSignal<Option<u32>>,
    /// The text generated so far.
    pub output: RwSignal<String>,
    pub generation: RwSignal<Option<GenerationSummary>>,
    /// The benchmark under way (its request id).
    pub benchmarking: RwSignal<Option<u32>>,
    pub bench: RwSignal<Option<BenchResult>>,
    /// The latent request under way, and the last answer.
    pub reading_latents: RwSignal<Option<u32>>,
    pub latents: RwSignal<Option<LatentList>>,
    /// The shipped SAE layer picked in the latents panel; `None` keeps the one in use.
    pub sae_layer: RwSignal<Option<usize>>,
}

impl AppState {
    pub fn new(link: LinkState, notices: Vec<String>) -> Self {
        Self {
            status: RwSignal::new(Status::Idle),
            worker_ready: RwSignal::new(false),
            model: RwSignal::new(None),
            error: RwSignal::new(None),
            gpu_lost: RwSignal::new(false),
            notices: RwSignal::new(notices),
            choice: RwSignal::new(link.model),
            backend: RwSignal::new(link.backend),
            text: RwSignal::new(link.text),
            chat: RwSignal::new(link.chat),
            add_bos: RwSignal::new(true),
            tokens: RwSignal::new(None),
            latest_tokenize: RwSignal::new(0),
            max_new_tokens: RwSignal::new(48),
            sampling: RwSignal::new(SamplingForm::default()),
            generating: RwSignal::new(None),
            output: RwSignal::new(String::new()),
            generation: RwSignal::new(None),
            benchmarking: RwSignal::new(None),
            bench: RwSignal::new(None),
            reading_latents: RwSignal::new(None),
            latents: RwSignal::new(None),
            sae_layer: RwSignal::new(None),
        }
    }

    pub fn fail(&self, message: String) {
        self.error.set(Some(message));
    }

    pub fn is_loading(&self) -> bool {
        matches!(self.status.get(), Status::Loading { .. })
    }

    /// Whether the model is busy (loading, generating, benchmarking): the controls that need it wait.
    pub fn is_busy(&self) -> bool {
        self.is_loading()
            || self.generating.get().is_some()
            || self.benchmarking.get().is_some()
            || self.reading_latents.get().is_some()
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
                self.gpu_lost.set(false);
                for note in summary.backend_note.iter().chain(&summary.sae_note) {
                    self.notices.update(|n| n.push(note.clone()));
                }
                // A new model: the last model's latents and SAE choice no longer apply.
                self.latents.set(None);
                self.sae_layer.set(None);
                self.model.set(Some(summary));
            }
            Response::Tokens(tokens) => {
                if id == self.latest_tokenize.get_untracked() {
                    self.tokens.set(Some(tokens));
                }
            }
            Response::Text { text, .. } => {
                if self.generating.get_untracked() == Some(id) {
                    self.output.set(text);
                }
            }
            Response::Generated(summary) => {
                if self.generating.get_untracked() == Some(id) {
                    self.generating.set(None);
                    self.output.set(summary.text.clone());
                    self.generation.set(Some(summary));
                }
            }
            Response::Latents(list) => {
                if self.reading_latents.get_untracked() == Some(id) {
                    self.reading_latents.set(None);
                    self.latents.set(Some(list));
                }
            }
            Response::Benchmarked(result) => {
                if self.benchmarking.get_untracked() == Some(id) {
                    self.benchmarking.set(None);
                    self.bench.set(Some(result));
                }
            }
            Response::CacheCleared { entries } => {
                self.notices.update(|n| n.push(format!("Removed {entries} cached download(s).")));
            }
            Response::Error { message, gpu_lost } => {
                if loading_id == Some(id) {
                    self.status.set(Status::Idle);
                }
                if id == self.latest_tokenize.get_untracked() {
                    self.tokens.set(None);
                }
                if self.generating.get_untracked() == Some(id) {
                    self.generating.set(None);
                }
                if self.benchmarking.get_untracked() == Some(id) {
                    self.benchmarking.set(None);
                }
                if self.reading_latents.get_untracked() == Some(id) {
                    self.reading_latents.set(None);
                }
                if gpu_lost {
                    self.gpu_lost.set(true);
                }
                self.fail(message);
            }
        }
    }
}

//! The page's state: signals the components read and the visitor's and the worker's answers change. Requests are
//! not tracked here: each panel awaits its own call (`client::WorkerClient::call`), and `busy` counts the calls in
//! flight that hold the model.

use leptos::prelude::*;

use crate::link::{LinkState, ModelChoice, SaeChoice};
use crate::protocol::{
    BackendChoice, BenchResult, CachedFile, DiscoveryView, EvaluationView, GenerationSummary, LatentReading,
    ModelSummary, Progress, SaeSummary, Sampling, Scope, SearchResults, TokenList,
};

/// The sampling settings as the form holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingForm {
    pub greedy: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingForm {
    pub fn sampling(&self) -> Sampling {
        if self.greedy {
            Sampling::Greedy
        } else {
            Sampling::Random {
                temperature: self.temperature,
                top_k: (self.top_k > 0).then_some(self.top_k),
                top_p: (self.top_p < 1.0).then_some(self.top_p),
                seed: self.seed,
            }
        }
    }
}

/// One latent of the steering set.
#[derive(Debug, Clone, PartialEq)]
pub struct SteeredLatent {
    pub index: u32,
    /// The coefficient on its decoder row.
    pub strength: f32,
    /// Off: kept in the list, not applied.
    pub on: bool,
    /// Its top tokens, where known.
    pub tokens: Vec<String>,
}

/// The latents that steer, with a global multiplier and the positions they act on (the layer is the SAE's).
#[derive(Debug, Clone, PartialEq)]
pub struct SteeringSet {
    pub latents: Vec<SteeredLatent>,
    pub multiplier: f32,
    pub scope: Scope,
}

impl SteeringSet {
    /// The latents that apply, with their strengths.
    pub fn active(&self) -> Vec<(u32, f32)> {
        self.latents.iter().filter(|l| l.on && l.strength != 0.0).map(|l| (l.index, l.strength)).collect()
    }

    pub fn get(&self, index: u32) -> Option<&SteeredLatent> {
        self.latents.iter().find(|l| l.index == index)
    }

    /// Adds `index` at `strength` (or turns it on at that strength).
    pub fn put(&mut self, index: u32, strength: f32, tokens: Vec<String>) {
        match self.latents.iter_mut().find(|l| l.index == index) {
            Some(l) => {
                l.strength = strength;
                l.on = true;
            }
            None => self.latents.push(SteeredLatent { index, strength, on: true, tokens }),
        }
    }
}

/// The two outputs of a generation as they stream in, and its summary once done.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outputs {
    pub default: String,
    pub steered: Option<String>,
    pub summary: Option<GenerationSummary>,
}

/// A long task's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Work {
    pub phase: String,
    pub done: usize,
    pub total: usize,
}

#[derive(Clone, Copy)]
pub struct AppState {
    pub worker_ready: RwSignal<bool>,
    /// The worker died: it must be restarted.
    pub engine_stopped: RwSignal<bool>,
    /// Calls in flight that hold the model.
    pub busy: RwSignal<u32>,
    /// How many calls that put an SAE in use are in flight.
    pub sae_loading: RwSignal<u32>,
    /// A load under way, with its progress once known.
    pub loading: RwSignal<Option<Option<Progress>>>,
    pub model: RwSignal<Option<ModelSummary>>,
    pub sae: RwSignal<Option<SaeSummary>>,
    /// The last error, shown until dismissed or replaced.
    pub error: RwSignal<Option<String>>,
    /// The GPU failed: the model must be loaded again (the page offers the CPU).
    pub gpu_lost: RwSignal<bool>,
    /// Notes about parts of the link that were ignored, and other things worth knowing.
    pub notices: RwSignal<Vec<String>>,
    pub choice: RwSignal<ModelChoice>,
    /// A model URL from a link, waiting for the visitor's consent before anything is downloaded.
    pub confirm_model: RwSignal<Option<String>>,
    pub sae_choice: RwSignal<Option<SaeChoice>>,
    pub backend: RwSignal<BackendChoice>,
    /// The prompt.
    pub text: RwSignal<String>,
    pub chat: RwSignal<bool>,
    pub add_bos: RwSignal<bool>,
    pub tokens: RwSignal<Option<TokenList>>,
    pub max_new_tokens: RwSignal<usize>,
    pub sampling: RwSignal<SamplingForm>,
    pub steering: RwSignal<SteeringSet>,
    pub outputs: RwSignal<Outputs>,
    pub reading: RwSignal<Option<LatentReading>>,
    /// The latent the prompt's tokens are coloured by and whose card is open (`None`: each token's strongest).
    pub chosen_latent: RwSignal<Option<u32>>,
    pub search: RwSignal<Option<SearchResults>>,
    pub discovery: RwSignal<Option<DiscoveryView>>,
    pub evaluation: RwSignal<Option<EvaluationView>>,
    pub work: RwSignal<Option<Work>>,
    pub bench: RwSignal<Option<BenchResult>>,
    pub cache: RwSignal<Option<Vec<CachedFile>>>,
    /// The longest gap between animation frames seen during the last long task, in ms (the page's own
    /// responsiveness, shown in the benchmark panel).
    pub longest_frame_ms: RwSignal<f64>,
}

impl AppState {
    pub fn new(link: LinkState, notices: Vec<String>) -> Self {
        let steering = SteeringSet {
            latents: link
                .steer
                .iter()
                .map(|&(index, strength)| SteeredLatent { index, strength, on: true, tokens: Vec::new() })
                .collect(),
            multiplier: link.multiplier,
            scope: link.scope,
        };
        let sampling = SamplingForm {
            greedy: link.greedy,
            temperature: link.temperature,
            top_k: 40,
            top_p: 0.95,
            seed: link.seed,
        };
        Self {
            worker_ready: RwSignal::new(false),
            engine_stopped: RwSignal::new(false),
            busy: RwSignal::new(0),
            sae_loading: RwSignal::new(0),
            loading: RwSignal::new(None),
            model: RwSignal::new(None),
            sae: RwSignal::new(None),
            error: RwSignal::new(None),
            gpu_lost: RwSignal::new(false),
            notices: RwSignal::new(notices),
            confirm_model: RwSignal::new(match &link.model {
                ModelChoice::Url(u) => Some(u.clone()),
                ModelChoice::Catalog(_) => None,
            }),
            choice: RwSignal::new(link.model),
            sae_choice: RwSignal::new(link.sae),
            backend: RwSignal::new(link.backend),
            text: RwSignal::new(link.text),
            chat: RwSignal::new(link.chat),
            add_bos: RwSignal::new(true),
            tokens: RwSignal::new(None),
            max_new_tokens: RwSignal::new(48),
            sampling: RwSignal::new(sampling),
            steering: RwSignal::new(steering),
            outputs: RwSignal::new(Outputs::default()),
            reading: RwSignal::new(None),
            chosen_latent: RwSignal::new(None),
            search: RwSignal::new(None),
            discovery: RwSignal::new(None),
            evaluation: RwSignal::new(None),
            work: RwSignal::new(None),
            bench: RwSignal::new(None),
            cache: RwSignal::new(None),
            longest_frame_ms: RwSignal::new(0.0),
        }
    }

    pub fn fail(&self, message: String) {
        self.error.set(Some(message));
    }

    /// Whether an SAE is being put in use.
    pub fn loading_sae(&self) -> bool {
        self.sae_loading.get() > 0
    }

    /// Whether the model is busy (loading, or a call holds it): the controls that need it wait.
    pub fn is_busy(&self) -> bool {
        self.loading.get().is_some() || self.busy.get() > 0
    }

    /// The experiment as a link.
    pub fn link(&self) -> LinkState {
        let steering = self.steering.get();
        let sampling = self.sampling.get();
        LinkState {
            model: self.choice.get(),
            sae: self.sae_choice.get(),
            steer: steering.active(),
            multiplier: steering.multiplier,
            scope: steering.scope,
            text: self.text.get(),
            chat: self.chat.get(),
            seed: sampling.seed,
            temperature: sampling.temperature,
            greedy: sampling.greedy,
            backend: self.backend.get(),
        }
    }

    /// A new model: what belonged to the last one goes.
    /// Another model replaces the loaded one: an SAE layer and latent ids chosen for the old model name other
    /// things in the new one, so its default SAE is used and the steering set is emptied.
    pub fn forget_other_models_latents(&self) {
        self.sae_choice.set(None);
        if !self.steering.get_untracked().latents.is_empty() {
            self.steering.update(|s| s.latents.clear());
            self.notices.update(|n| {
                n.push("The steering set was emptied: its latents belonged to the previous model's SAE.".to_string())
            });
        }
    }

    pub fn model_loaded(&self, summary: ModelSummary) {
        if let Some(note) = &summary.backend_note {
            self.notices.update(|n| n.push(note.clone()));
        }
        self.error.set(None);
        self.gpu_lost.set(false);
        self.sae.set(None);
        self.reading.set(None);
        self.search.set(None);
        self.discovery.set(None);
        self.evaluation.set(None);
        self.outputs.set(Outputs::default());
        self.model.set(Some(summary));
    }
}

//! Messages between the page and the engine's worker. Each request carries an id that its responses repeat; a
//! request gets any number of streamed responses (`Progress`, `Working`, `Text`) and then one final response (its
//! result, or `Error`). The worker sends data (numbers, enums, token strings); the page formats it.

pub use saif::check::Verdict;
pub use saif::data::Placement;
pub use saif::discover::{LatentStats, Rank};
pub use saif::evaluate::Method;
pub use saif::sweep::SweepRow;
pub use saif_engine::bench::{BenchResult, BenchSettings};
pub use saif_engine::{Sampling, Scope};
use serde::{Deserialize, Serialize};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// WebGPU when the browser offers it, the CPU otherwise.
    #[default]
    Auto,
    Webgpu,
    Cpu,
    /// The CPU with each layer's activations rounded to 8 bits in decoding steps, as llama.cpp computes (the
    /// engine's `LoadOptions::int8_activations`; prompts stay exact): not exact, and faster on SmolLM2's Q4_1
    /// layers; on Gemma 3's about 1.2x on one thread and even on two (docs/benchmarks.md, stops 48 and 49).
    CpuInt8,
}

impl BackendChoice {
    /// Every choice, in the order the page offers them.
    pub const ALL: [BackendChoice; 4] =
        [BackendChoice::Auto, BackendChoice::Webgpu, BackendChoice::Cpu, BackendChoice::CpuInt8];

    pub fn label(self) -> &'static str {
        match self {
            BackendChoice::Auto => "WebGPU, or the CPU without it",
            BackendChoice::Webgpu => "WebGPU only",
            BackendChoice::Cpu => "CPU (WebAssembly)",
            BackendChoice::CpuInt8 => "CPU, 8-bit activations (not exact; faster on SmolLM2)",
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Webgpu => "webgpu",
            BackendChoice::Cpu => "cpu",
            BackendChoice::CpuInt8 => "cpu-int8",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.id() == id)
    }
}

/// What a download is known to be, so that a damaged copy is caught (and a cached one checked on every read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Expected {
    pub bytes: Option<u64>,
    /// Lowercase hex.
    pub sha256: Option<String>,
}

/// Steering with SAE latents of the SAE in use: `h + multiplier * sum_j strength_j * W_dec[j]` at the SAE's layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SteeringSpec {
    pub latents: Vec<(u32, f32)>,
    pub multiplier: f32,
    pub scope: Scope,
}

/// A generation request: the default output and, with steering, the steered one from the same seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Wrap the prompt in the model's chat template and stop at the end of the answer's turn.
    pub chat: bool,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub steering: Option<SteeringSpec>,
}

/// Which SAE to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum SaeSource {
    /// The SAE the page ships for the loaded model at this layer.
    Shipped { layer: usize },
    /// A folder on the web holding `params.safetensors` and `config.json` (Gemma Scope 2's layout), with the layer
    /// it reads.
    Folder { url: String, layer: usize, label: String },
    /// Files the visitor picked or dropped (they travel beside the request).
    Files { layer: Option<usize>, label: String },
}

/// SAIF's discovery on the SAE in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoverRequest {
    pub instruction: String,
    pub placement: Placement,
    pub k: usize,
    pub tau: f32,
    pub rank: Rank,
    /// Discovery contents used (of 240).
    pub contents: usize,
}

/// An evaluation of methods on held-out contents, over several strengths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateRequest {
    pub discovery: DiscoverRequest,
    pub methods: Vec<Method>,
    pub alphas: Vec<f32>,
    /// Difference-in-means' strengths (its scale differs from SAIF's).
    pub diffmean_alphas: Vec<f32>,
    /// Held-out contents used (of 120).
    pub contents: usize,
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// Download (or take from the browser's cache) and load a GGUF file.
    LoadUrl { url: String, name: String, backend: BackendChoice, expected: Expected },
    /// Load a GGUF file the user picked; the `File` travels beside the request (see `worker`).
    LoadFile { name: String, backend: BackendChoice },
    /// Generate from a prompt, streaming the text.
    Generate(GenerateRequest),
    /// Stop the long task under way (generation, discovery, evaluation).
    Stop,
    /// Measure prefill and decode speed.
    Bench(BenchSettings),
    /// Tokenize text with the loaded model's tokenizer (wrapped in its chat template when `chat`).
    Tokenize { text: String, add_bos: bool, chat: bool },
    /// Use another SAE; one that records another model than the loaded one only with `any_model` (the page asks
    /// the visitor first).
    UseSae { source: SaeSource, any_model: bool },
    /// The SAE's latents on every token of a prompt.
    ReadLatents { text: String, chat: bool, top: usize },
    /// Latents by id ("1247") or by the tokens they promote ("French", " les").
    SearchLatents { query: String, top: usize },
    /// The tokens one latent promotes (for SAEs without a lens file, computed on demand).
    Lens { latent: u32 },
    /// The vector a steering set adds (for export).
    SteeringVector(SteeringSpec),
    /// SAIF's discovery of an instruction's latents.
    Discover(DiscoverRequest),
    /// Methods compared on held-out contents.
    Evaluate(EvaluateRequest),
    /// Destroys the WebGPU device as a driver reset or a lost GPU would (for tests and for trying the recovery).
    LoseGpu,
    /// What the browser's cache holds.
    ListCache,
    /// Forget one cached download.
    DeleteCached { url: String },
    /// Forget every cached download.
    ClearCache,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u32,
    pub body: T,
}

/// Which of a generation's two outputs a piece of text belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    Default,
    Steered,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    /// The worker has started and waits for requests.
    Ready,
    /// A load's progress.
    Progress(Progress),
    /// A long task's progress (discovery, evaluation).
    Working {
        phase: String,
        done: usize,
        total: usize,
    },
    /// More generated text of one output (its decoded tokens so far).
    Text {
        output: Output,
        text: String,
        tokens: usize,
    },
    /// Something worth knowing that does not stop the request (a damaged cache entry replaced, a full quota).
    Notice {
        text: String,
    },
    Loaded(ModelSummary),
    Tokens(TokenList),
    Generated(GenerationSummary),
    Benchmarked(BenchResult),
    SaeLoaded(SaeSummary),
    Latents(LatentReading),
    Found(SearchResults),
    Lens {
        latent: u32,
        tokens: Vec<String>,
    },
    Vector {
        layer: usize,
        values: Vec<f32>,
    },
    Discovered(DiscoveryView),
    Evaluated(EvaluationView),
    Cache {
        files: Vec<CachedFile>,
    },
    CacheCleared {
        entries: u32,
    },
    /// The SAE asked for records another model than the loaded one; the message says which and how they differ.
    /// Sending the request again with `any_model` uses it anyway.
    SaeForAnotherModel {
        message: String,
    },
    /// The request is done and has nothing to return.
    Done,
    /// The request failed; the message is meant for a person. `gpu_lost`: the GPU failed, so the model has to be
    /// loaded again (on the CPU, the page suggests).
    Error {
        message: String,
        gpu_lost: bool,
    },
}

impl Response {
    /// Whether this response ends its request (the others are streamed along the way).
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Response::Progress(_)
                | Response::Working { .. }
                | Response::Text { .. }
                | Response::Notice { .. }
                | Response::Ready
        )
    }
}

/// Where a load stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub stage: Stage,
    /// Bytes (download) or parts (weights) done.
    pub done: u64,
    pub total: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Downloading,
    ReadingCache,
    CheckingCache,
    ReadingFile,
    Parsing,
    BuildingTokenizer,
    LoadingWeights,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Downloading => "Downloading",
            Stage::ReadingCache => "Reading from the browser cache",
            Stage::CheckingCache => "Checking the cached copy",
            Stage::ReadingFile => "Reading the file",
            Stage::Parsing => "Reading the GGUF header",
            Stage::BuildingTokenizer => "Building the tokenizer",
            Stage::LoadingWeights => "Loading weights",
        }
    }

    /// Whether `done`/`total` count bytes.
    pub fn counts_bytes(self) -> bool {
        matches!(self, Stage::Downloading | Stage::ReadingCache | Stage::ReadingFile)
    }
}

/// What the page shows about a loaded model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub name: String,
    /// The key SAEs are shipped under ("smollm2-135m").
    pub key: String,
    pub architecture: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub tokenizer: String,
    pub instruction_tuned: bool,
    /// Where it runs ("wgpu: ..." or "cpu"), and why it is not on the GPU when WebGPU was wanted.
    pub backend: String,
    pub backend_note: Option<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub adds_bos: bool,
    pub file_bytes: u64,
    /// Whether the bytes came from the browser's cache rather than the network.
    pub from_cache: bool,
    pub load_ms: f64,
    /// How long each step of the load took, in ms, in order (reading the file, the header, the tokenizer, the
    /// weights, the wait for the cached copy's checksum).
    pub load_steps: Vec<(Stage, f64)>,
    /// Every metadata key with a one-line rendering of its value.
    pub metadata: Vec<(String, String)>,
    /// Count of tensors per quantization, e.g. ("Q4_K", 27).
    pub tensor_types: Vec<(String, usize)>,
    /// Every layer with a shipped SAE for this model, in order (the page offers them).
    pub shipped_layers: Vec<usize>,
    /// The shipped SAE the page puts in use once the model is loaded: the layer whose SAE reproduces the recorded
    /// SAIF results (crates/saif/data/steering.json), else the last. It is loaded after the model, not with it,
    /// so that Generate does not wait for it.
    pub default_sae_layer: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeSummary {
    pub layer: usize,
    pub width: usize,
    /// "TopK (k = 32)", "JumpReLU"...
    pub activation: String,
    /// Where it came from ("shipped with the page: saes/smollm2-135m/layer_29").
    pub source: String,
    /// Mean norm of the model's residual stream at this layer on a few plain prompts (a scale for strengths).
    pub residual_norm: f32,
    /// Mean norm of the SAE's decoder rows (a strength of 1 adds about this much).
    pub decoder_norm: f32,
    /// Whether every latent's top tokens are known (lens.json); else they are computed on demand.
    pub has_lens: bool,
}

/// A latent with what is known of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentView {
    pub index: u32,
    /// Its activation (a reading) or its score (a search).
    pub value: f32,
    /// The tokens its decoder direction promotes.
    pub tokens: Vec<String>,
}

/// An SAE's reading of every token of a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentReading {
    pub sae: SaeSummary,
    pub tokens: Vec<TokenView>,
    /// Per token: its nonzero latents (index, activation), strongest first.
    pub per_token: Vec<Vec<(u32, f32)>>,
    /// The most active latents at the last token.
    pub last: Vec<LatentView>,
    /// Top tokens of every latent that appears in the reading.
    pub lens: Vec<(u32, Vec<String>)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResults {
    pub query: String,
    /// How the query was read: "latent id", or the vocabulary tokens it matched.
    pub matched: String,
    pub latents: Vec<LatentView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryView {
    pub instruction: String,
    pub layer: usize,
    pub positives: usize,
    pub candidates: usize,
    pub latents: Vec<LatentStats>,
    pub diffmean_norm: f32,
    pub residual_norm: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationView {
    pub instruction: String,
    pub layer: usize,
    pub rows: Vec<SweepRow>,
    /// A few outputs per method and strength, for reading.
    pub samples: Vec<SampleView>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleView {
    pub method: Method,
    pub alpha: Option<f32>,
    pub content: String,
    pub output: String,
    pub loose: bool,
}

/// One output of a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSummary {
    pub text: String,
    pub ids: Vec<u32>,
    /// "end_token", "limit" or "cancelled".
    pub stop: String,
    /// Tokens after the first, per second.
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationSummary {
    pub default: OutputSummary,
    pub steered: Option<OutputSummary>,
    pub prompt_tokens: usize,
    pub time_to_first_token_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: u32,
    /// The token as text (its vocabulary entry when it is not valid text alone, e.g. a byte token).
    pub text: String,
    pub special: bool,
}

/// One entry of the browser's cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedFile {
    pub url: String,
    pub bytes: u64,
    pub sha256: Option<String>,
}

/// "12.3 MB" for a byte count.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "kB", "MB", "GB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_json() {
        let r = Envelope { id: 7, body: Request::Tokenize { text: "hé <b>".into(), add_bos: true, chat: false } };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Envelope<Request>>(&s).unwrap(), r);
        assert!(s.contains("\"kind\":\"tokenize\""));
        let g = Request::Generate(GenerateRequest {
            prompt: "x".into(),
            chat: true,
            max_new_tokens: 4,
            sampling: Sampling::Greedy,
            steering: Some(SteeringSpec { latents: vec![(1767, 6.0), (88, -2.0)], multiplier: 1.0, scope: Scope::All }),
        });
        assert_eq!(serde_json::from_str::<Request>(&serde_json::to_string(&g).unwrap()).unwrap(), g);
    }

    #[test]
    fn only_results_and_errors_end_a_request() {
        assert!(!Response::Text { output: Output::Default, text: String::new(), tokens: 0 }.is_final());
        assert!(!Response::Working { phase: String::new(), done: 0, total: 1 }.is_final());
        assert!(Response::Error { message: String::new(), gpu_lost: false }.is_final());
        assert!(Response::CacheCleared { entries: 0 }.is_final());
    }

    /// Every response serializes (an internally tagged enum cannot hold a bare string or list in a newtype
    /// variant: such a response would never reach the page).
    #[test]
    fn every_kind_of_response_serializes() {
        let responses = [
            Response::Ready,
            Response::Notice { text: "x".into() },
            Response::Cache { files: vec![CachedFile { url: "u".into(), bytes: 1, sha256: None }] },
            Response::CacheCleared { entries: 2 },
            Response::Done,
            Response::Lens { latent: 1, tokens: vec!["a".into()] },
            Response::Vector { layer: 1, values: vec![1.0] },
            Response::Working { phase: "p".into(), done: 1, total: 2 },
            Response::Text { output: Output::Steered, text: "t".into(), tokens: 1 },
            Response::Tokens(TokenList { tokens: vec![] }),
            Response::Error { message: "m".into(), gpu_lost: true },
            Response::Progress(Progress { stage: Stage::Downloading, done: 1, total: None }),
        ];
        for r in responses {
            let text = serde_json::to_string(&r).unwrap_or_else(|e| panic!("{r:?}: {e}"));
            assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
        }
    }

    #[test]
    fn bytes_read_like_a_person_writes_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(98_362_432), "98.4 MB");
        assert_eq!(human_bytes(253_113_024), "253.1 MB");
    }
}

//! Messages between the page and the engine's worker. Each request carries an id that its responses repeat, so
//! the page can drop answers to requests it has since replaced (a tokenization of text the user kept typing).

pub use saif_engine::bench::{BenchResult, BenchSettings};
pub use saif_engine::Sampling;
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
}

impl BackendChoice {
    pub fn label(self) -> &'static str {
        match self {
            BackendChoice::Auto => "WebGPU, or the CPU without it",
            BackendChoice::Webgpu => "WebGPU only",
            BackendChoice::Cpu => "CPU (WebAssembly)",
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Webgpu => "webgpu",
            BackendChoice::Cpu => "cpu",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        [BackendChoice::Auto, BackendChoice::Webgpu, BackendChoice::Cpu].into_iter().find(|b| b.id() == id)
    }
}

/// A generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Wrap the prompt in the model's chat template and stop at the end of the answer's turn.
    pub chat: bool,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// Download (or take from the browser's cache) and load a GGUF file.
    LoadUrl { url: String, name: String, backend: BackendChoice },
    /// Load a GGUF file the user picked; the `File` travels beside the request (see `worker`).
    LoadFile { name: String, backend: BackendChoice },
    /// Generate from a prompt, streaming the text.
    Generate(GenerateRequest),
    /// Stop the generation under way.
    Stop,
    /// Measure prefill and decode speed.
    Bench(BenchSettings),
    /// The SAE latents most active at the prompt's last token, with the shipped SAE of `layer` (default: the one
    /// loaded with the model).
    Latents { text: String, chat: bool, top: usize, layer: Option<usize> },
    /// Tokenize text with the loaded model's tokenizer (wrapped in its chat template when `chat`).
    Tokenize { text: String, add_bos: bool, chat: bool },
    /// Forget every cached download.
    ClearCache,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u32,
    pub body: T,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    /// The worker has started and waits for requests.
    Ready,
    Progress(Progress),
    Loaded(ModelSummary),
    Tokens(TokenList),
    /// More generated text (the decoded tokens so far, from the start of the answer).
    Text {
        text: String,
        tokens: usize,
    },
    Generated(GenerationSummary),
    Benchmarked(BenchResult),
    Latents(LatentList),
    CacheCleared {
        entries: u32,
    },
    /// The request failed; the message is meant for a person. `gpu_lost`: the GPU failed, so the model has to be
    /// loaded again (on the CPU, the page suggests).
    Error {
        message: String,
        gpu_lost: bool,
    },
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
    /// Where it runs ("wgpu: ..." or "cpu"), and why it is not on the GPU when WebGPU was wanted.
    pub backend: String,
    pub backend_note: Option<String>,
    /// Why the model's shipped SAE is not there although the page ships one (the model still works).
    pub sae_note: Option<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub adds_bos: bool,
    pub file_bytes: u64,
    /// Whether the bytes came from the browser's cache rather than the network.
    pub from_cache: bool,
    pub load_ms: f64,
    /// Every metadata key with a one-line rendering of its value.
    pub metadata: Vec<(String, String)>,
    /// Count of tensors per quantization, e.g. ("Q4_K", 27).
    pub tensor_types: Vec<(String, usize)>,
    /// The SAE the page found for this model, if any.
    pub sae: Option<SaeSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeSummary {
    pub layer: usize,
    pub width: usize,
    /// "TopK (k = 32)", "JumpReLU"...
    pub activation: String,
    /// Where it came from ("shipped with the page: saes/smollm2-135m/layer_29").
    pub source: String,
    /// Every layer with a shipped SAE for this model, in order (the page offers them).
    pub shipped_layers: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentList {
    /// The SAE that read them (its layer, width, source).
    pub sae: SaeSummary,
    /// The token the latents were read at.
    pub token: String,
    pub latents: Vec<LatentView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentView {
    pub index: u32,
    pub activation: f32,
    /// The tokens its decoder direction promotes (lens.json), when the SAE has them.
    pub tokens: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationSummary {
    pub text: String,
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// "end_token", "limit" or "cancelled".
    pub stop: String,
    pub time_to_first_token_ms: f64,
    /// Tokens after the first, per second.
    pub decode_tokens_per_s: f64,
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
    }

    #[test]
    fn bytes_read_like_a_person_writes_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(98_362_432), "98.4 MB");
        assert_eq!(human_bytes(253_113_024), "253.1 MB");
    }
}

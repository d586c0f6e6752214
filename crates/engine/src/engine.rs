//! A loaded model with everything needed to go from text to text: the file's metadata, the tokenizer, the chat
//! template and the forward pass on a backend.

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::rc::Rc;
use std::sync::Arc;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::fingerprint::ModelFingerprint;
use crate::gguf::{type_name, GgufFile};
use crate::gpu::{Gpu, GpuModel};
use crate::model::cpu::{CpuModel, LoadOptions};
use crate::model::LanguageModel;
use crate::tokenizer::Tokenizer;

/// What a load is doing, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum LoadStep {
    /// Parsing the GGUF header and checking the tensor directory.
    Header,
    /// Building the tokenizer from the vocabulary.
    Tokenizer,
    /// Reading the weights: `done` of `total` parts (embedding, layers, output).
    Weights { done: usize, total: usize },
}

pub struct Engine {
    /// Shared so that a host can tokenize while the model is busy generating.
    pub tokenizer: Arc<Tokenizer>,
    pub chat: ChatTemplate,
    pub model: Box<dyn LanguageModel>,
    /// The GGUF metadata, one line per key, for display.
    pub metadata: Vec<(String, String)>,
    /// How many tensors the file stores in each quantization, e.g. ("Q4_K", 27).
    pub tensor_types: Vec<(String, usize)>,
    /// The file's size in bytes.
    pub file_bytes: u64,
    /// Whether the file names an instruction-tuned model (see `is_instruction_tuned`).
    pub instruction_tuned: bool,
    /// What tells this model from others (an SAE records it and is refused by other models).
    pub fingerprint: ModelFingerprint,
}

/// Whether a GGUF holds a model tuned to follow instructions: it carries a chat template
/// (`tokenizer.chat_template`; pretrained files such as Gemma 3 270M's have none), or the names it gives its model
/// (`general.name`, `general.finetune`, `general.basename`) say "instruct", "chat" or "it" (Gemma's `-it`). A
/// pretrained model is fed plain text; an instruction-tuned one its chat template.
pub fn is_instruction_tuned(gguf: &GgufFile) -> bool {
    if gguf.get_str("tokenizer.chat_template").is_ok_and(|t| !t.trim().is_empty()) {
        return true;
    }
    let names = ["general.name", "general.finetune", "general.basename"]
        .iter()
        .filter_map(|k| gguf.get_str(k).ok())
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    names.contains("instruct")
        || names.contains("chat")
        || names.split(|c: char| !c.is_alphanumeric()).any(|w| w == "it")
}

impl Engine {
    /// The first two load steps of every backend: the GGUF header and the tokenizer it describes.
    fn read_header<R: Read + Seek>(
        reader: &mut R,
        progress: &mut impl FnMut(LoadStep),
    ) -> Result<(GgufFile, Tokenizer)> {
        progress(LoadStep::Header);
        let gguf = GgufFile::read(reader)?;
        progress(LoadStep::Tokenizer);
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        Ok((gguf, tokenizer))
    }

    /// Loads a GGUF file onto the CPU backend.
    pub fn load_cpu<R: Read + Seek>(reader: &mut R, options: &LoadOptions) -> Result<Self> {
        Self::load_cpu_with_progress(reader, options, |_| {})
    }

    /// As `load_cpu`, reporting each step (the browser shows them while a large model loads).
    pub fn load_cpu_with_progress<R: Read + Seek>(
        reader: &mut R,
        options: &LoadOptions,
        mut progress: impl FnMut(LoadStep),
    ) -> Result<Self> {
        let (gguf, tokenizer) = Self::read_header(reader, &mut progress)?;
        let model = CpuModel::load_with_progress(&gguf, reader, options, |done, total| {
            progress(LoadStep::Weights { done, total })
        })?;
        Ok(Self::assemble(&gguf, tokenizer, Box::new(model)))
    }

    /// Loads a GGUF file onto the GPU backend (wgpu), on `gpu` or, when `None`, on a newly opened device.
    pub async fn load_wgpu<R: Read + Seek>(
        reader: &mut R,
        options: &LoadOptions,
        gpu: Option<Rc<Gpu>>,
    ) -> Result<Self> {
        let gpu = match gpu {
            Some(gpu) => gpu,
            None => Rc::new(Gpu::new().await?),
        };
        Self::load_wgpu_with_progress(reader, options, gpu, |_| {})
    }

    /// As `load_wgpu` on an open device, reporting each step.
    pub fn load_wgpu_with_progress<R: Read + Seek>(
        reader: &mut R,
        options: &LoadOptions,
        gpu: Rc<Gpu>,
        mut progress: impl FnMut(LoadStep),
    ) -> Result<Self> {
        let (gguf, tokenizer) = Self::read_header(reader, &mut progress)?;
        let model = GpuModel::load_with_progress(gpu, &gguf, reader, options, |done, total| {
            progress(LoadStep::Weights { done, total })
        })?;
        Ok(Self::assemble(&gguf, tokenizer, Box::new(model)))
    }

    fn assemble(gguf: &GgufFile, tokenizer: Tokenizer, model: Box<dyn LanguageModel>) -> Self {
        let chat = ChatTemplate::from_gguf(gguf, model.config().architecture);
        let fingerprint = ModelFingerprint::of(gguf, model.config(), is_instruction_tuned(gguf));
        let mut types = BTreeMap::new();
        for t in gguf.tensors() {
            *types.entry(type_name(t.dtype).to_string()).or_insert(0) += 1;
        }
        Self {
            tokenizer: Arc::new(tokenizer),
            chat,
            model,
            metadata: gguf.metadata_summary(),
            tensor_types: types.into_iter().collect(),
            file_bytes: gguf.file_size(),
            instruction_tuned: fingerprint.instruction_tuned,
            fingerprint,
        }
    }

    /// Loads a GGUF file held in memory onto the CPU backend.
    pub fn from_bytes_cpu(bytes: &[u8], options: &LoadOptions) -> Result<Self> {
        Self::load_cpu(&mut std::io::Cursor::new(bytes), options)
    }

    /// As `from_bytes_cpu`, reporting each step.
    pub fn from_bytes_cpu_with_progress(
        bytes: &[u8],
        options: &LoadOptions,
        progress: impl FnMut(LoadStep),
    ) -> Result<Self> {
        Self::load_cpu_with_progress(&mut std::io::Cursor::new(bytes), options, progress)
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Whether the model follows chat instructions (it then gets its chat template).
    pub fn instruction_tuned(&self) -> bool {
        self.instruction_tuned
    }

    /// Tokens that end a plain completion: the GGUF's end-of-sequence token.
    pub fn stop_tokens(&self) -> Vec<u32> {
        self.tokenizer.eos().into_iter().collect()
    }

    /// Tokens that end a chat answer: EOS and the end-of-turn token.
    pub fn chat_stop_tokens(&self) -> Vec<u32> {
        self.tokenizer.eos().into_iter().chain(self.tokenizer.end_of_turn()).collect()
    }
}

//! A loaded model with everything needed to go from text to text: the file's metadata, the tokenizer, the chat
//! template and the forward pass on a backend.

use std::io::{Read, Seek};

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::model::cpu::{CpuModel, LoadOptions};
use crate::model::LanguageModel;
use crate::tokenizer::Tokenizer;

pub struct Engine {
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    pub model: Box<dyn LanguageModel>,
    /// The GGUF metadata, one line per key, for display.
    pub metadata: Vec<(String, String)>,
}

impl Engine {
    /// Loads a GGUF file onto the CPU backend.
    pub fn load_cpu<R: Read + Seek>(reader: &mut R, options: &LoadOptions) -> Result<Self> {
        let gguf = GgufFile::read(reader)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let model = CpuModel::load(&gguf, reader, options)?;
        let chat = ChatTemplate::from_gguf(&gguf, model.config().architecture);
        Ok(Self {
            tokenizer,
            chat,
            model: Box::new(model),
            metadata: gguf.metadata_summary(),
        })
    }

    /// Loads a GGUF file held in memory onto the CPU backend.
    pub fn from_bytes_cpu(bytes: &[u8], options: &LoadOptions) -> Result<Self> {
        Self::load_cpu(&mut std::io::Cursor::new(bytes), options)
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Tokens that end a plain completion: the GGUF's end-of-sequence token.
    pub fn stop_tokens(&self) -> Vec<u32> {
        self.tokenizer.eos().into_iter().collect()
    }

    /// Tokens that end a chat answer: EOS and the end-of-turn token.
    pub fn chat_stop_tokens(&self) -> Vec<u32> {
        self.tokenizer
            .eos()
            .into_iter()
            .chain(self.tokenizer.end_of_turn())
            .collect()
    }
}

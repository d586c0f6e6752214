//! The tokenizer a GGUF file carries in its metadata (`tokenizer.ggml.*`), rebuilt with the `tokenizers` crate.
//!
//! Two kinds exist in the files this project reads:
//! - `llama` (SentencePiece BPE; Gemma): a vocabulary with scores. SentencePiece merges the adjacent pair whose
//!   merged piece has the highest score (`sentencepiece`, a model of its own: as a `tokenizers` BPE it needs half a
//!   million merges, slow to build); spaces become `▁`, and characters outside the vocabulary fall back to byte
//!   tokens `<0xNN>`.
//! - `gpt2` (byte-level BPE; SmolLM2, Llama 3): a vocabulary and an explicit merge list, with a pre-tokenizer that
//!   `tokenizer.ggml.pre` names.
//!
//! Control tokens (`<start_of_turn>`, `<|im_start|>`...) and user-defined tokens (Gemma's runs of spaces, tabs and
//! newlines) are matched in the raw text before the model sees it, as llama.cpp and Hugging Face do.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BpeTrainer, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, Model, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Token, TokenizerImpl,
};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

mod sentencepiece;
use sentencepiece::SentencePieceBpe;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Which algorithm the GGUF's tokenizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// SentencePiece BPE with scores (`tokenizer.ggml.model = "llama"`).
    SentencePiece,
    /// Byte-level BPE with merges (`tokenizer.ggml.model = "gpt2"`).
    ByteLevelBpe,
}

/// The `tokenizers` pipeline (normalizer, pre-tokenizer, added tokens, decoder) around either kind's model.
type Inner = TokenizerImpl<GgufModel, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

pub struct Tokenizer {
    inner: Inner,
    kind: TokenizerKind,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    vocab_size: usize,
    /// The token that ends a chat turn where it differs from EOS (`<end_of_turn>`, `<|eot_id|>`).
    end_of_turn: Option<u32>,
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let types = gguf.opt_i64_array("tokenizer.ggml.token_type")?.unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(EngineError::Tokenizer(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let id =
            |key: &str| gguf.opt_usize(key).ok().flatten().map(|v| v as u32).filter(|&v| (v as usize) < tokens.len());
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let unk = id("tokenizer.ggml.unknown_token_id");

        let (kind, mut inner) = match model {
            "llama" | "gemma" => {
                let scores = gguf.opt_f32_array("tokenizer.ggml.scores")?.ok_or_else(|| {
                    EngineError::Tokenizer("a SentencePiece vocabulary needs tokenizer.ggml.scores".into())
                })?;
                let add_space_prefix = gguf.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                (TokenizerKind::SentencePiece, sentencepiece(&tokens, &scores, &types, unk, add_space_prefix)?)
            }
            "gpt2" => {
                let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
                let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
                (TokenizerKind::ByteLevelBpe, byte_level_bpe(&tokens, &merges, pre)?)
            }
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "unsupported tokenizer model \"{other}\" (supported: llama/SentencePiece, gpt2/byte-level BPE)"
                )))
            }
        };

        // Control tokens are special (skipped when decoding for display); user-defined ones are ordinary text.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TYPE_CONTROL || t == TYPE_USER_DEFINED)
            .map(|(&text, &t)| AddedToken::from(text.to_string(), t == TYPE_CONTROL).normalized(false))
            .collect();
        let specials: Vec<AddedToken> = added.iter().filter(|t| t.special).cloned().collect();
        let plain: Vec<AddedToken> = added.into_iter().filter(|t| !t.special).collect();
        inner.add_special_tokens(&specials);
        inner.add_tokens(&plain);

        let add_bos = gguf.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(kind == TokenizerKind::SentencePiece);
        let lookup = |text: &str| tokens.iter().position(|t| *t == text).map(|i| i as u32);
        let end_of_turn = id("tokenizer.ggml.eot_token_id")
            .or_else(|| lookup("<end_of_turn>"))
            .or_else(|| lookup("<|im_end|>"))
            .or_else(|| lookup("<|eot_id|>"))
            .filter(|&t| Some(t) != eos);
        Ok(Self { inner, kind, bos, eos, add_bos, vocab_size: tokens.len(), end_of_turn })
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether a prompt starts with BOS (`tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    pub fn end_of_turn(&self) -> Option<u32> {
        self.end_of_turn
    }

    /// Token ids of `text`, without BOS; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a prompt as the model expects it: BOS first when the GGUF asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.adds_bos() {
            ids.extend(self.bos);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Text of `ids` with special tokens written out (`<|im_end|>`), as reference implementations print them.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// The vocabulary entry of one token, as stored (with `▁` or byte-level characters).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Text of one token in context, for streaming output: decodes `ids` with and without the last token.
    pub fn decode_suffix(&self, ids: &[u32], start: usize) -> Result<String> {
        let before = self.decode(&ids[..start])?;
        let all = self.decode(ids)?;
        Ok(match all.strip_prefix(&before) {
            Some(rest) => rest.to_string(),
            None => all,
        })
    }
}

fn tokenizer_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// The vocabulary as the BPE model wants it; the first of duplicate entries wins, as in llama.cpp.
fn vocab_map(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(i as u32);
    }
    vocab
}

/// SentencePiece BPE: the model of `sentencepiece`, with spaces as `▁` (and one before the text where the GGUF asks
/// for it); decoding turns byte pieces back into characters.
fn sentencepiece(
    tokens: &[&str],
    scores: &[f32],
    types: &[i64],
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<Inner> {
    if scores.len() != tokens.len() {
        return Err(EngineError::Tokenizer(format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let mut tk = Inner::new(GgufModel::SentencePiece(SentencePieceBpe::new(tokens, scores, types, unk)));
    let replace = Replace::new(" ", "▁").map_err(tokenizer_error)?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        tokenizers::normalizers::Sequence::new(vec![Prepend::new("▁".into()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    tk.with_normalizer(Some(normalizer));
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new("▁", " ").map_err(tokenizer_error)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tk)
}

/// The regular expression that splits text into words before byte-level BPE, by `tokenizer.ggml.pre`.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    // GPT-2's own split, built into the ByteLevel pre-tokenizer.
    let gpt2 = || PreTokenizerWrapper::from(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true));
    let split_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(tokenizer_error)?;
        Ok(PreSequence::new(vec![
            split.into(),
            tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    match pre {
        "default" | "gpt2" | "gpt-2" => Ok(gpt2()),
        // SmolLM: every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" => Ok(PreSequence::new(vec![Digits::new(true).into(), gpt2()]).into()),
        // Llama 3.
        "llama-bpe" | "llama3" => split_then_bytes(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        other => Err(EngineError::Tokenizer(format!(
            "unsupported pre-tokenizer \"{other}\" (supported: default, gpt2, smollm, llama-bpe)"
        ))),
    }
}

/// Byte-level BPE with the GGUF's merge list ("left right" per entry).
fn byte_level_bpe(tokens: &[&str], merges: &[&str], pre: &str) -> Result<Inner> {
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| EngineError::Tokenizer(format!("malformed merge \"{m}\"")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab_map(tokens), merges).build().map_err(tokenizer_error)?;
    let mut tk = Inner::new(GgufModel::ByteLevel(bpe));
    tk.with_pre_tokenizer(Some(pre_tokenizer_for(pre)?));
    tk.with_decoder(Some(ByteLevel::default()));
    Ok(tk)
}

/// The model of either kind of GGUF tokenizer. One per tokenizer, so the size of its larger variant does not matter.
#[allow(clippy::large_enum_variant)]
enum GgufModel {
    ByteLevel(BPE),
    SentencePiece(SentencePieceBpe),
}

impl GgufModel {
    fn model(&self) -> &dyn Model<Trainer = BpeTrainer> {
        match self {
            Self::ByteLevel(m) => m,
            Self::SentencePiece(m) => m,
        }
    }
}

impl Model for GgufModel {
    /// Never used: these models come from GGUF files, not from training.
    type Trainer = BpeTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        self.model().tokenize(sequence)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.model().token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.model().id_to_token(id)
    }

    fn get_vocab(&self) -> std::collections::HashMap<String, u32> {
        self.model().get_vocab()
    }

    fn get_vocab_size(&self) -> usize {
        self.model().get_vocab_size()
    }

    fn save(&self, folder: &std::path::Path, prefix: Option<&str>) -> tokenizers::Result<Vec<std::path::PathBuf>> {
        self.model().save(folder, prefix)
    }

    fn get_trainer(&self) -> BpeTrainer {
        BpeTrainer::default()
    }
}

//! What tells one model from another, so that an SAE can record the model it was trained on and be refused by any
//! other. The key (`gemma-3-270m`) is not enough: the pretrained and the instruction-tuned Gemma share it, and
//! share their shape and tokenizer too, while their residual streams differ.

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::gguf::GgufFile;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// The GGUF architecture: "llama", "gemma2", "gemma3".
    pub architecture: String,
    /// The residual stream's width.
    pub hidden: usize,
    pub layers: usize,
    pub vocab: usize,
    /// FNV-1a (64 bits, hex) of the vocabulary: every token's text in id order, each followed by a zero byte.
    pub tokenizer: String,
    /// Whether the file names an instruction-tuned model (`engine::is_instruction_tuned`).
    pub instruction_tuned: bool,
}

impl ModelFingerprint {
    pub fn of(gguf: &GgufFile, config: &ModelConfig, instruction_tuned: bool) -> Self {
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens").unwrap_or_default();
        Self {
            architecture: gguf.architecture().unwrap_or("unknown").to_string(),
            hidden: config.hidden,
            layers: config.n_layers,
            vocab: config.vocab_size,
            tokenizer: format!("{:016x}", fnv1a(tokens.iter().flat_map(|t| t.bytes().chain([0])))),
            instruction_tuned,
        }
    }

    /// What differs between two fingerprints, one phrase each ("42 layers against 30"); empty when they are equal.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut out = Vec::new();
        if self.architecture != other.architecture {
            out.push(format!("architecture {} against {}", self.architecture, other.architecture));
        }
        for (what, a, b) in [("values wide", self.hidden, other.hidden), ("layers", self.layers, other.layers)] {
            if a != b {
                out.push(format!("{a} {what} against {b}"));
            }
        }
        if self.vocab != other.vocab || self.tokenizer != other.tokenizer {
            out.push(format!(
                "tokenizer {} ({} tokens) against {} ({} tokens)",
                self.tokenizer, self.vocab, other.tokenizer, other.vocab
            ));
        }
        if self.instruction_tuned != other.instruction_tuned {
            let name = |tuned| if tuned { "instruction-tuned" } else { "pretrained" };
            out.push(format!("{} against {}", name(self.instruction_tuned), name(other.instruction_tuned)));
        }
        out
    }
}

impl std::fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, {} layers of {}, {} tokens (tokenizer {}), {}",
            self.architecture,
            self.layers,
            self.hidden,
            self.vocab,
            self.tokenizer,
            if self.instruction_tuned { "instruction-tuned" } else { "pretrained" }
        )
    }
}

/// The 64-bit FNV-1a hash: a fingerprint for telling vocabularies apart, not a defence against forgery.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_published_test_vectors() {
        // From the FNV reference (http://www.isthe.com/chongo/tech/comp/fnv/): "" and "a".
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(*b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn differences_name_each_field() {
        let a = ModelFingerprint {
            architecture: "gemma3".into(),
            hidden: 640,
            layers: 18,
            vocab: 262_144,
            tokenizer: "00ff".into(),
            instruction_tuned: false,
        };
        assert!(a.differences(&a).is_empty());
        let b = ModelFingerprint { instruction_tuned: true, ..a.clone() };
        assert_eq!(a.differences(&b), ["pretrained against instruction-tuned"]);
        let c = ModelFingerprint { architecture: "llama".into(), hidden: 576, layers: 30, ..a.clone() };
        assert_eq!(
            a.differences(&c),
            ["architecture gemma3 against llama", "640 values wide against 576", "18 layers against 30"]
        );
    }
}

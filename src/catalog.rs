//! The models the page offers. The offline ones are served beside the page (`make serve` puts them under
//! `models/`); the others are public Hugging Face files a browser may fetch directly (CORS allowed).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogModel {
    /// Short id used in shareable links.
    pub id: &'static str,
    pub label: &'static str,
    /// Relative to the page for offline models, absolute otherwise.
    pub url: &'static str,
    pub bytes: u64,
    pub note: &'static str,
}

pub const MODELS: &[CatalogModel] = &[
    CatalogModel {
        id: "smollm2-135m-instruct",
        label: "SmolLM2-135M-Instruct (Q4_1, offline)",
        url: "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        bytes: 98_362_432,
        note: "Llama architecture, instruction-tuned: the offline model on which steering with instruction latents \
               can be shown.",
    },
    CatalogModel {
        id: "gemma-3-270m",
        label: "Gemma 3 270M (pretrained, Q4_K_M, offline)",
        url: "models/gemma-3-270m-q4_k_m.gguf",
        bytes: 253_113_024,
        note: "The model family the app is built around; pretrained, so it does not follow instructions.",
    },
    CatalogModel {
        id: "gemma-3-270m-it-qat",
        label: "Gemma 3 270M IT (QAT Q4_0, Hugging Face)",
        url: "https://huggingface.co/ggml-org/gemma-3-270m-it-qat-GGUF/resolve/main/gemma-3-270m-it-qat-Q4_0.gguf",
        bytes: 241_410_624,
        note: "Instruction-tuned Gemma 3, downloaded from Hugging Face (needs the internet).",
    },
];

/// The model a fresh visit loads.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

pub fn find(id: &str) -> Option<&'static CatalogModel> {
    MODELS.iter().find(|m| m.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_the_default_exists() {
        for (i, a) in MODELS.iter().enumerate() {
            assert!(MODELS[i + 1..].iter().all(|b| b.id != a.id), "duplicate id {}", a.id);
        }
        assert!(find(DEFAULT_MODEL).is_some());
    }
}

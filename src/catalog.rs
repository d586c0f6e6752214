//! What the page offers: models (the offline ones are served beside the page, `make serve` puts them under
//! `models/`; the others are public Hugging Face files a browser may fetch directly, CORS allowed) and SAE presets
//! beyond the SAEs shipped with the page (Gemma Scope 2's residual SAEs for Gemma 3 270M IT).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogModel {
    /// Short id used in shareable links.
    pub id: &'static str,
    pub label: &'static str,
    /// Relative to the page for offline models, absolute otherwise.
    pub url: &'static str,
    pub bytes: u64,
    /// The file's sha256 where it is known (a download or cached copy that differs is refused).
    pub sha256: Option<&'static str>,
    pub note: &'static str,
}

pub const MODELS: &[CatalogModel] = &[
    CatalogModel {
        id: "smollm2-135m-instruct",
        label: "SmolLM2-135M-Instruct (Q4_1, offline)",
        url: "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        bytes: 98_362_432,
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        note: "Llama architecture, instruction-tuned: the offline model on which steering with instruction latents \
               can be shown.",
    },
    CatalogModel {
        id: "gemma-3-270m",
        label: "Gemma 3 270M (pretrained, Q4_K_M, offline)",
        url: "models/gemma-3-270m-q4_k_m.gguf",
        bytes: 253_113_024,
        sha256: Some("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        note: "The model family the app is built around; pretrained, so it does not follow instructions.",
    },
    CatalogModel {
        id: "gemma-3-270m-it-qat",
        label: "Gemma 3 270M IT (QAT Q4_0, Hugging Face)",
        url: "https://huggingface.co/ggml-org/gemma-3-270m-it-qat-GGUF/resolve/main/gemma-3-270m-it-qat-Q4_0.gguf",
        bytes: 241_410_624,
        sha256: None,
        note: "Instruction-tuned Gemma 3, downloaded from Hugging Face (needs the internet); Gemma Scope 2's SAEs \
               are offered for it.",
    },
];

/// The model a fresh visit loads.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

pub fn find(id: &str) -> Option<&'static CatalogModel> {
    MODELS.iter().find(|m| m.id == id)
}

/// An SAE folder on the web in Gemma Scope 2's layout, for models of one SAE key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaePreset {
    pub id: &'static str,
    pub label: &'static str,
    /// The SAE key of the models it fits (`ModelSummary::key`).
    pub model_key: &'static str,
    pub layer: usize,
    /// The folder holding `params.safetensors` and `config.json`.
    pub folder: &'static str,
}

/// Where Gemma Scope 2's SAEs for Gemma 3 270M IT live.
const GEMMA_SCOPE_2_270M_IT: &str = "https://huggingface.co/google/gemma-scope-2-270m-it/resolve/main";

pub const SAE_PRESETS: &[SaePreset] = &[
    SaePreset {
        id: "gemmascope2-res-9-16k",
        label: "Gemma Scope 2, residual stream, layer 9, 16k latents (about 84 MB)",
        model_key: "gemma-3-270m",
        layer: 9,
        folder: "resid_post/layer_9_width_16k_l0_medium",
    },
    SaePreset {
        id: "gemmascope2-res-17-16k",
        label: "Gemma Scope 2, residual stream, layer 17 (the last), 16k latents (about 84 MB)",
        model_key: "gemma-3-270m",
        layer: 17,
        folder: "resid_post_all/layer_17_width_16k_l0_medium",
    },
];

pub fn sae_preset(id: &str) -> Option<&'static SaePreset> {
    SAE_PRESETS.iter().find(|p| p.id == id)
}

impl SaePreset {
    /// The folder's URL (only `params.safetensors` and `config.json` are fetched from it).
    pub fn url(&self) -> String {
        format!("{GEMMA_SCOPE_2_270M_IT}/{}", self.folder)
    }
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
        for (i, a) in SAE_PRESETS.iter().enumerate() {
            assert!(SAE_PRESETS[i + 1..].iter().all(|b| b.id != a.id), "duplicate preset {}", a.id);
            assert!(a.id.parse::<usize>().is_err(), "a preset id must not read as a layer");
        }
        assert!(sae_preset("gemmascope2-res-17-16k")
            .unwrap()
            .url()
            .ends_with("/resid_post_all/layer_17_width_16k_l0_medium"));
    }
}

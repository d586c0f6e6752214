//! The SAEs the worker reads latents with: those shipped with the page for the loaded model (`saes/index.json`),
//! any folder on the web in Gemma Scope 2's layout (`params.safetensors` and `config.json`: the Gemma Scope 2
//! presets on Hugging Face), and files the visitor picks or drops (Gemma Scope 2 or SAELens). An SAE that does not
//! fit the model (its width, its layer) is refused with the reason.

use saif::{Activation, Sae};
use saif_engine::Engine;
use web_sys::File;

use super::download::{fetch, read_blob};
use super::Failure;
use crate::protocol::{Expected, SaeSummary, Stage};

/// An SAE in use: the SAE, the layer it reads, each latent's top tokens where known, and its summary.
pub struct LoadedSae {
    pub sae: Sae,
    pub layer: usize,
    pub lens: Option<Vec<Vec<String>>>,
    pub summary: SaeSummary,
}

/// What `saes/index.json` says of a model's shipped SAEs: their layers and each file's size and sha256.
#[derive(Clone, Default)]
pub struct Shipped {
    pub layers: Vec<usize>,
    files: serde_json::Value,
}

impl Shipped {
    /// What a shipped file is known to be (so a damaged download or cached copy is caught).
    fn expected(&self, layer: usize, name: &str) -> Expected {
        let entry = &self.files[format!("layer_{layer}")][name];
        Expected { bytes: entry["bytes"].as_u64(), sha256: entry["sha256"].as_str().map(String::from) }
    }
}

/// The SAEs shipped for `key` (none when the page ships none for it).
pub async fn shipped_index(id: u32, key: &str) -> Result<Shipped, Failure> {
    let Ok(index) = fetch(id, "saes/index.json", &Expected::default()).await else { return Ok(Shipped::default()) };
    let index: serde_json::Value = serde_json::from_slice(&index.bytes).map_err(|e| format!("saes/index.json: {e}"))?;
    let Some(entry) = index.get(key) else { return Ok(Shipped::default()) };
    let layers = entry["layers"]
        .as_array()
        .map(|l| l.iter().map(|l| l.as_u64().map(|l| l as usize)).collect::<Option<Vec<_>>>())
        .unwrap_or(Some(Vec::new()))
        .ok_or("saes/index.json: a layer is not a number")?;
    Ok(Shipped { layers, files: entry["files"].clone() })
}

/// The SAE shipped for `key` at `layer`, each file checked against the index.
pub async fn shipped(
    id: u32,
    key: &str,
    index: &Shipped,
    layer: usize,
) -> Result<(Sae, Option<Vec<Vec<String>>>, String), Failure> {
    let folder = format!("saes/{key}/layer_{layer}");
    let config = fetch(id, &format!("{folder}/config.json"), &index.expected(layer, "config.json")).await?.bytes;
    let params =
        fetch(id, &format!("{folder}/params.safetensors"), &index.expected(layer, "params.safetensors")).await?.bytes;
    super::yield_to_messages().await;
    let sae = parse_or_forget(&folder, &params, &config)?;
    let lens = fetch(id, &format!("{folder}/lens.json"), &index.expected(layer, "lens.json"))
        .await
        .ok()
        .and_then(|f| lens_or_none(&f.bytes, sae.info.d_sae));
    Ok((sae, lens, format!("shipped with the page: {folder}")))
}

/// An SAE in a folder on the web: `params.safetensors` and `config.json`, nothing else. Files that turn out not to
/// be an SAE are dropped from the cache, so that the next try downloads them again.
pub async fn folder_sae(id: u32, folder: &str) -> Result<Sae, Failure> {
    let folder = folder.trim_end_matches('/');
    let none = Expected::default();
    let (config_url, params_url) = (format!("{folder}/config.json"), format!("{folder}/params.safetensors"));
    let config = fetch(id, &config_url, &none).await?.bytes;
    let params = fetch(id, &params_url, &none).await?.bytes;
    parse_or_forget(folder, &params, &config)
}

/// The SAE in a folder's `params.safetensors` and `config.json`; where they are not one, their cached copies are
/// deleted, so that the next try downloads them again.
fn parse_or_forget(folder: &str, params: &[u8], config: &[u8]) -> Result<Sae, Failure> {
    Sae::from_gemma_scope(params, config).map_err(|e| {
        let urls = [format!("{folder}/config.json"), format!("{folder}/params.safetensors")];
        wasm_bindgen_futures::spawn_local(async move {
            for url in urls {
                let _ = super::download::delete(&url).await;
            }
        });
        Failure::from(format!("{folder}: {e}"))
    })
}

/// An SAE from files the visitor picked: Gemma Scope 2 (`params.safetensors` + `config.json`) or SAELens
/// (`sae_weights.safetensors` + `cfg.json`), told apart by their names; `lens.json` is used where given.
pub async fn files_sae(id: u32, files: &[File]) -> Result<(Sae, Option<Vec<Vec<String>>>), Failure> {
    let find = |name: &str| files.iter().find(|f| f.name() == name);
    let read = |f: &File| {
        let f = f.clone();
        async move { read_blob(id, &f, Stage::ReadingFile).await }
    };
    let names: Vec<String> = files.iter().map(|f| f.name()).collect();
    let sae = if let Some(params) = find("params.safetensors") {
        let config = match find("config.json") {
            Some(c) => read(c).await?,
            None => b"{}".to_vec(),
        };
        Sae::from_gemma_scope(&read(params).await?, &config)
    } else if let (Some(weights), Some(cfg)) = (find("sae_weights.safetensors"), find("cfg.json")) {
        Sae::from_sae_lens(&read(weights).await?, &read(cfg).await?)
    } else {
        return Err(format!(
            "the files {names:?} are not an SAE: pick params.safetensors and config.json (Gemma Scope 2), or \
             sae_weights.safetensors and cfg.json (SAELens)"
        )
        .into());
    }
    .map_err(|e| e.to_string())?;
    let lens = match find("lens.json") {
        Some(f) => lens_or_none(&read(f).await?, sae.info.d_sae),
        None => None,
    };
    Ok((sae, lens))
}

/// A lens.json is optional: one that cannot be read is left out (and said in the console), and the latents'
/// tokens are then computed from the model.
fn lens_or_none(bytes: &[u8], d_sae: usize) -> Option<Vec<Vec<String>>> {
    saif::lens::read_lens_json(bytes, d_sae).map_err(|e| gloo::console::warn!(e)).ok()
}

/// Why an SAE was not attached: it cannot be (`Failure`), or it records another model, which the visitor may
/// still choose to use (`OtherModel`, with the message that asks).
pub enum NotAttached {
    Failure(Failure),
    OtherModel(String),
}

impl<T: Into<Failure>> From<T> for NotAttached {
    fn from(failure: T) -> Self {
        Self::Failure(failure.into())
    }
}

/// Checks that `sae` fits the loaded model at `layer` (and, unless `any_model`, that it records no other model),
/// takes the residual stream's norm there (recorded or measured), and summarizes it.
pub async fn attach(
    engine: &mut Engine,
    sae: Sae,
    layer: Option<usize>,
    lens: Option<Vec<Vec<String>>>,
    source: String,
    any_model: bool,
) -> Result<LoadedSae, NotAttached> {
    let c = engine.config().clone();
    let layer = layer.or(sae.info.layer).ok_or("the SAE does not say which layer it reads; give the layer")?;
    if let Some(trained) = sae.info.layer.filter(|&l| l != layer) {
        return Err(format!("this SAE was trained on layer {trained}, not on layer {layer}").into());
    }
    sae.check_fits(c.hidden, c.n_layers, layer).map_err(|e| e.to_string())?;
    if !any_model {
        sae.check_model(&engine.fingerprint).map_err(|e| NotAttached::OtherModel(e.to_string()))?;
    }
    // A shipped SAE records the norm for its model and layer; any other is measured (one short forward pass).
    let residual_norm = match saif::residual_norm::recorded(&sae.info, &engine.fingerprint, layer) {
        Some(recorded) => recorded,
        None => saif::residual_norm::measure(engine, layer).await?,
    };
    let decoder_norm =
        (0..sae.info.d_sae).map(|j| saif::steer::norm(sae.decoder_row(j))).sum::<f64>() as f32 / sae.info.d_sae as f32;
    let activation = match sae.info.activation {
        Activation::TopK { k } => format!("TopK (k = {k})"),
        Activation::JumpRelu => "JumpReLU".into(),
        Activation::Relu => "ReLU".into(),
    };
    let summary = SaeSummary {
        layer,
        width: sae.info.d_sae,
        activation,
        source,
        residual_norm,
        decoder_norm,
        has_lens: lens.is_some(),
    };
    Ok(LoadedSae { sae, layer, lens, summary })
}

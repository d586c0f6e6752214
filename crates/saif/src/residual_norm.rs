//! The size of the residual stream at an SAE's layer: what the page's strength sliders are scaled against (a
//! latent's strength is a coefficient on its decoder row, and a useful push is a few residual norms).
//!
//! Measuring it runs the model on one sentence. `saif sae-stamp` records the figure in the SAE's config, with the
//! layer and the sentence, beside the model's fingerprint it records anyway, so that attaching a shipped SAE in the
//! page runs nothing; an SAE without a record that fits (another model, another layer, an older sentence) is
//! measured when it is attached.

use saif_engine::{Engine, EngineError, Hooks, ModelFingerprint, Positions};
use serde_json::{json, Value};

use crate::sae::SaeInfo;
use crate::steer::norm;

/// The sentence the norm is measured on: plain everyday English, like SAIF's contents.
pub const TEXT: &str = "The weather was mild, so we walked to the market and bought bread.";

/// The config key of the record.
const KEY: &str = "residual_norm";

/// The mean norm of `resid_post[layer]` over `TEXT`'s tokens, the first (an attention sink, far larger than the
/// rest) left out.
pub async fn measure(engine: &mut Engine, layer: usize) -> Result<f32, EngineError> {
    let ids = engine.tokenizer.encode_prompt(TEXT)?;
    let hooks = Hooks::none().read(layer, Positions::All);
    let captures = engine.model.read_prompt(&ids, &hooks).await?;
    let norms: Vec<f64> = captures.iter().filter(|c| c.position > 0).map(|c| norm(&c.values)).collect();
    Ok((norms.iter().sum::<f64>() / norms.len().max(1) as f64) as f32)
}

/// Writes the record of `mean`, measured at `layer`, into an SAE's config. It holds for the model the config's
/// `model_fingerprint` names, which the caller records beside it (`saif sae-stamp`).
pub fn record(config: &mut Value, layer: usize, mean: f32) {
    config[KEY] = json!({ "mean": mean, "layer": layer, "text": TEXT });
}

/// The norm an SAE's config records for `model` at `layer` on `TEXT`, if it records one and was stamped with
/// `model`; `None` otherwise, and for a record that is malformed or not a positive finite number.
pub fn recorded(info: &SaeInfo, model: &ModelFingerprint, layer: usize) -> Option<f32> {
    let entry = info.extra.get(KEY)?;
    let fits = info.trained_on.as_ref() == Some(model)
        && entry.get("layer").and_then(Value::as_u64) == Some(layer as u64)
        && entry.get("text").and_then(Value::as_str) == Some(TEXT);
    let mean = entry.get("mean").and_then(Value::as_f64)? as f32;
    (fits && mean.is_finite() && mean > 0.0).then_some(mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Activation;

    fn model(layers: usize) -> ModelFingerprint {
        ModelFingerprint {
            architecture: "llama".into(),
            hidden: 4,
            layers,
            vocab: 10,
            tokenizer: "0123456789abcdef".into(),
            instruction_tuned: true,
        }
    }

    /// The SAE as `Sae::from_gemma_scope` reads this config: its fingerprint into `trained_on`.
    fn info(extra: Value) -> SaeInfo {
        let trained_on = extra.get("model_fingerprint").map(|f| serde_json::from_value(f.clone()).unwrap());
        SaeInfo { activation: Activation::Relu, d_in: 4, d_sae: 8, layer: Some(2), model: None, trained_on, extra }
    }

    #[test]
    fn a_record_is_used_only_for_its_model_layer_and_sentence() {
        let mut config = json!({ "architecture": "relu" });
        record(&mut config, 2, 7.5);
        // No model recorded: the figure is for no model in particular.
        assert_eq!(recorded(&info(config.clone()), &model(3), 2), None);
        config["model_fingerprint"] = json!(model(3));
        assert_eq!(recorded(&info(config.clone()), &model(3), 2), Some(7.5));
        // Another model, another layer: measured again.
        assert_eq!(recorded(&info(config.clone()), &model(4), 2), None);
        assert_eq!(recorded(&info(config.clone()), &model(3), 1), None);
        // A record made on an older sentence, or with no usable figure.
        let mut older = config.clone();
        older[KEY]["text"] = json!("Another sentence.");
        assert_eq!(recorded(&info(older), &model(3), 2), None);
        for bad in [json!(0.0), json!(-1.0), json!("7.5"), Value::Null] {
            let mut broken = config.clone();
            broken[KEY]["mean"] = bad;
            assert_eq!(recorded(&info(broken), &model(3), 2), None);
        }
        assert_eq!(recorded(&info(json!({})), &model(3), 2), None);
    }
}

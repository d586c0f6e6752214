//! SAE files from outside the project load through the same code path as the project's own: a small synthetic
//! Gemma Scope 2 folder and a SAELens folder, written here byte for byte in those layouts, encode and decode as
//! their formulas say (computed here by hand).

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use saif::{Activation, Sae, StoreAs};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn write_safetensors(path: &std::path::Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| f32_bytes(&t.1)).collect();
    let views: Vec<(&str, TensorView)> =
        tensors.iter().zip(&bytes).map(|(t, b)| (t.0, TensorView::new(Dtype::F32, t.2.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

const D_IN: usize = 8;
const D_SAE: usize = 12;

#[test]
fn a_gemma_scope_2_folder_loads_and_encodes_as_jump_relu() {
    let dir = std::env::temp_dir().join(format!("saif-gs2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (w_enc, w_dec, b_enc, b_dec) =
        (values(D_IN * D_SAE, 1), values(D_SAE * D_IN, 2), values(D_SAE, 3), values(D_IN, 4));
    let threshold: Vec<f32> = (0..D_SAE).map(|j| 0.05 * j as f32).collect();
    write_safetensors(
        &dir.join("params.safetensors"),
        &[
            ("w_enc", w_enc.clone(), vec![D_IN, D_SAE]),
            ("w_dec", w_dec.clone(), vec![D_SAE, D_IN]),
            ("b_enc", b_enc.clone(), vec![D_SAE]),
            ("b_dec", b_dec.clone(), vec![D_IN]),
            ("threshold", threshold.clone(), vec![D_SAE]),
        ],
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"architecture": "jump_relu", "layer": 5, "model_name": "gemma-3-270m-it", "d_in": 8, "d_sae": 12}"#,
    )
    .unwrap();

    let sae = Sae::load_dir(&dir).unwrap();
    assert_eq!(sae.info.activation, Activation::JumpRelu);
    assert_eq!((sae.info.d_in, sae.info.d_sae, sae.info.layer), (D_IN, D_SAE, Some(5)));
    let x = values(D_IN, 9);
    let dense = sae.encode(&x);
    for j in 0..D_SAE {
        let pre: f32 = b_enc[j] + (0..D_IN).map(|i| x[i] * w_enc[i * D_SAE + j]).sum::<f32>();
        let want = if pre > threshold[j] { pre } else { 0.0 };
        assert!((dense[j] - want).abs() < 1e-5, "latent {j}: {} vs {want}", dense[j]);
    }
    let latents = sae.encode_sparse(&x);
    let recon = sae.decode(&latents);
    for i in 0..D_IN {
        let want: f32 = b_dec[i] + latents.iter().map(|&(j, a)| a * w_dec[j as usize * D_IN + i]).sum::<f32>();
        assert!((recon[i] - want).abs() < 1e-5);
    }
    // A wrong SAE for the model is named as such.
    let err = sae.check_fits(640, 18, 5).unwrap_err().to_string();
    assert!(err.contains("does not fit") && err.contains("640") && err.contains("gemma-3-270m-it"), "{err}");

    // Saved (as the trainer saves) and read again: the same SAE, within f16 rounding.
    let again = dir.join("again");
    sae.save_dir(&again, StoreAs::F16).unwrap();
    let back = Sae::load_dir(&again).unwrap();
    assert_eq!(back.info.activation, Activation::JumpRelu);
    for (a, b) in back.encode(&x).iter().zip(&dense) {
        assert!((a - b).abs() < 2e-2 * (1.0 + b.abs()), "{a} vs {b}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sae_lens_topk_folder_folds_its_input_bias() {
    let dir = std::env::temp_dir().join(format!("saif-saelens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (w_enc, w_dec, b_enc, b_dec) =
        (values(D_IN * D_SAE, 5), values(D_SAE * D_IN, 6), values(D_SAE, 7), values(D_IN, 8));
    write_safetensors(
        &dir.join("sae_weights.safetensors"),
        &[
            ("W_enc", w_enc.clone(), vec![D_IN, D_SAE]),
            ("W_dec", w_dec.clone(), vec![D_SAE, D_IN]),
            ("b_enc", b_enc.clone(), vec![D_SAE]),
            ("b_dec", b_dec.clone(), vec![D_IN]),
        ],
    );
    std::fs::write(
        dir.join("cfg.json"),
        r#"{"architecture": "topk", "activation_fn_kwargs": {"k": 3}, "hook_name": "blocks.7.hook_resid_post", "apply_b_dec_to_input": true, "d_in": 8, "d_sae": 12}"#,
    )
    .unwrap();
    let sae = Sae::load_dir(&dir).unwrap();
    assert_eq!(sae.info.activation, Activation::TopK { k: 3 });
    assert_eq!(sae.info.layer, Some(7));
    let x = values(D_IN, 10);
    // By hand: pre = (x - b_dec) W_enc + b_enc, keep the 3 largest positive.
    let mut pre: Vec<f32> = (0..D_SAE)
        .map(|j| b_enc[j] + (0..D_IN).map(|i| (x[i] - b_dec[i]) * w_enc[i * D_SAE + j]).sum::<f32>())
        .collect();
    let mut order: Vec<usize> = (0..D_SAE).collect();
    order.sort_by(|&a, &b| pre[b].total_cmp(&pre[a]));
    for (rank, &j) in order.iter().enumerate() {
        if rank >= 3 || pre[j] <= 0.0 {
            pre[j] = 0.0;
        }
    }
    for (got, want) in sae.encode(&x).iter().zip(&pre) {
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn foreign_files_are_refused_with_a_reason() {
    let dir = std::env::temp_dir().join(format!("saif-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(Sae::load_dir(&dir).unwrap_err().to_string().contains("neither params.safetensors"));
    std::fs::write(dir.join("params.safetensors"), b"<html>not found</html>").unwrap();
    assert!(Sae::load_dir(&dir).unwrap_err().to_string().contains("not an SAE file"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An SAELens folder with `cfg` as its cfg.json: what loading it says.
fn sae_lens_with_cfg(cfg: &str) -> Result<Sae, saif::sae::SaeError> {
    let dir = std::env::temp_dir().join(format!("saif-saelens-cfg-{}-{}", std::process::id(), cfg.len()));
    std::fs::create_dir_all(&dir).unwrap();
    write_safetensors(
        &dir.join("sae_weights.safetensors"),
        &[("W_enc", values(D_IN * D_SAE, 1), vec![D_IN, D_SAE]), ("W_dec", values(D_SAE * D_IN, 2), vec![D_SAE, D_IN])],
    );
    std::fs::write(dir.join("cfg.json"), cfg).unwrap();
    let sae = Sae::load_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    sae
}

#[test]
fn sae_lens_architectures_and_hooks_are_read_not_guessed() {
    let standard =
        sae_lens_with_cfg(r#"{"architecture": "standard", "hook_name": "blocks.3.hook_resid_post"}"#).unwrap();
    assert_eq!((standard.info.activation, standard.info.layer), (Activation::Relu, Some(3)));
    let gated = sae_lens_with_cfg(r#"{"architecture": "gated", "hook_name": "blocks.3.hook_resid_post"}"#).unwrap_err();
    assert!(gated.to_string().contains("unknown SAE architecture \"gated\""), "{gated}");
    for hook in ["blocks.3.hook_mlp_out", "blocks.3.attn.hook_z", "blocks.3.hook_resid_mid"] {
        let err = sae_lens_with_cfg(&format!(r#"{{"architecture": "jumprelu", "hook_name": "{hook}"}}"#)).unwrap_err();
        assert!(err.to_string().contains(hook) && err.to_string().contains("resid_post"), "{err}");
    }
    let nameless = sae_lens_with_cfg(r#"{"architecture": "jumprelu", "hook_name": "hook_resid_post"}"#).unwrap_err();
    assert!(nameless.to_string().contains("names no layer"), "{nameless}");
}

#[test]
fn an_sae_records_its_model_and_refuses_another() {
    use saif_engine::ModelFingerprint;
    let smol = ModelFingerprint {
        architecture: "llama".into(),
        hidden: 8,
        layers: 30,
        vocab: 49_152,
        tokenizer: "3ff3b2ef50dfd8ca".into(),
        instruction_tuned: true,
    };
    let sae = || {
        let bytes = |t: &[(&str, Vec<f32>, Vec<usize>)]| {
            let path = std::env::temp_dir().join(format!("saif-fingerprint-{}.safetensors", std::process::id()));
            write_safetensors(&path, t);
            std::fs::read(&path).unwrap()
        };
        let params = bytes(&[
            ("w_enc", values(D_IN * D_SAE, 1), vec![D_IN, D_SAE]),
            ("w_dec", values(D_SAE * D_IN, 2), vec![D_SAE, D_IN]),
        ]);
        Sae::from_gemma_scope(&params, br#"{"architecture": "topk", "k": 2}"#).unwrap()
    };
    let mut recorded = sae();
    recorded.info.trained_on = Some(smol.clone());
    let dir = std::env::temp_dir().join(format!("saif-fingerprint-{}", std::process::id()));
    recorded.save_dir(&dir, StoreAs::F32).unwrap();
    let back = Sae::load_dir(&dir).unwrap();
    assert_eq!(back.info.trained_on.as_ref(), Some(&smol), "the fingerprint survives save and load");
    back.check_model(&smol).unwrap();
    let pretrained = ModelFingerprint { instruction_tuned: false, ..smol.clone() };
    let err = back.check_model(&pretrained).unwrap_err();
    assert!(matches!(err, saif::SaeError::OtherModel { .. }), "{err}");
    assert!(err.to_string().contains("instruction-tuned against pretrained"), "{err}");
    // A record that is not a fingerprint is an error naming the file, not a silence.
    let config =
        std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"hidden\": 8", "\"hidden\": \"eight\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = Sae::load_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("config.json: model_fingerprint"), "{err}");
    // SAEs that record no model (Gemma Scope's, SAELens') are checked by their shape only.
    sae().check_model(&pretrained).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

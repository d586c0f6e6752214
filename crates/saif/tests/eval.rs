//! The SAE evaluation on SAEs with known answers, on the engine's tiny Llama fixture: an SAE that reconstructs
//! exactly (latents relu(x) and relu(-x)) recovers all the loss with FVU 0 and L0 = d; an SAE that outputs zero
//! recovers none, leaves all variance unexplained and has every latent dead.

use saif::eval::{evaluate, evaluate_layers};
use saif::{Activation, Sae, SaeInfo};
use saif_engine::{block_on, Engine, LoadOptions};

fn fixture() -> Engine {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/tiny-llama.gguf");
    Engine::from_bytes_cpu(&std::fs::read(path).unwrap(), &LoadOptions::default()).unwrap()
}

fn sae(d: usize, identity: bool) -> Sae {
    let d_sae = 2 * d;
    let (mut w_enc, mut w_dec) = (vec![0f32; d * d_sae], vec![0f32; d_sae * d]);
    if identity {
        for i in 0..d {
            w_enc[i * d_sae + i] = 1.0;
            w_enc[i * d_sae + d + i] = -1.0;
            w_dec[i * d + i] = 1.0;
            w_dec[(d + i) * d + i] = -1.0;
        }
    }
    Sae {
        info: SaeInfo {
            activation: Activation::Relu,
            d_in: d,
            d_sae,
            layer: Some(1),
            model: None,
            trained_on: None,
            extra: serde_json::json!({}),
        },
        w_enc,
        w_dec,
        b_enc: vec![0.0; d_sae],
        b_dec: vec![0.0; d],
        threshold: vec![0.0; d_sae],
    }
}

fn lines() -> Vec<String> {
    // Token ids of the fixture's byte-level vocabulary: plain ASCII text.
    ["the cat sat on the mat", "in the garden there is a tree", "he ran to the river and then back home"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn an_exact_sae_recovers_everything_and_a_zero_sae_nothing() {
    let mut engine = fixture();
    let d = engine.config().hidden;
    let exact = block_on(evaluate(&mut engine, &sae(d, true), 1, &lines(), |_, _| {})).unwrap();
    assert!(exact.fvu < 1e-10, "{exact:?}");
    assert_eq!(exact.l0, d as f64);
    assert_eq!(exact.ce_loss_sae, exact.ce_loss_clean);
    assert!((exact.ce_recovered - 1.0).abs() < 1e-12);
    // (A random model may even do better with a layer zeroed; it must at least do differently.)
    assert!((exact.ce_loss_zero - exact.ce_loss_clean).abs() > 1e-3, "zeroing a layer changed nothing: {exact:?}");
    assert_eq!(exact.texts, 3);

    let zero = block_on(evaluate(&mut engine, &sae(d, false), 1, &lines(), |_, _| {})).unwrap();
    assert!(zero.fvu >= 1.0, "{zero:?}");
    assert_eq!(zero.l0, 0.0);
    assert_eq!(zero.dead_fraction, 1.0);
    assert_eq!(zero.ce_loss_sae, zero.ce_loss_zero);
    assert_eq!(zero.ce_recovered, 0.0);
    assert_eq!(zero.ce_loss_clean, exact.ce_loss_clean);
}

#[test]
fn a_wrong_sae_for_the_model_is_refused() {
    let mut engine = fixture();
    let err = block_on(evaluate(&mut engine, &sae(100, true), 1, &lines(), |_, _| {})).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}

/// Several SAEs in one evaluation (one clean pass shared by all) give exactly what each gives alone.
#[test]
fn saes_evaluated_together_equal_each_evaluated_alone() {
    let mut engine = fixture();
    let d = engine.config().hidden;
    let (exact, zero) = (sae(d, true), sae(d, false));
    let saes = [(&exact, 0), (&zero, 1), (&exact, 1)];
    let together = block_on(evaluate_layers(&mut engine, &saes, &lines(), |_, _| {})).unwrap();
    assert_eq!(together.len(), 3);
    for (&(sae, layer), joint) in saes.iter().zip(&together) {
        let alone = block_on(evaluate(&mut engine, sae, layer, &lines(), |_, _| {})).unwrap();
        assert_eq!(&alone, joint, "layer {layer}");
    }
    assert_ne!(together[0].ce_loss_zero, together[2].ce_loss_zero, "layers 0 and 1 were zeroed alike");
    // And the known answers, independent of either code path: the exact SAE recovers everything, the zero one nothing.
    for exact in [&together[0], &together[2]] {
        assert!(exact.fvu < 1e-10 && (exact.ce_recovered - 1.0).abs() < 1e-12, "{exact:?}");
    }
    assert_eq!((together[1].ce_recovered, together[1].dead_fraction), (0.0, 1.0));
}

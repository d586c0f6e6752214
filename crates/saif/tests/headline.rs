//! The headline claim on the offline SmolLM2 with its shipped SAE and the recorded settings
//! (`crates/saif/data/steering.json`): steering with the latents SAIF discovers for "translate into French" makes
//! the model answer in French on held-out contents it was never asked to translate, at least 15 points of loose
//! accuracy above no steering, by an independent language identifier. (docs/results.md has the full 120 contents;
//! this test takes 40, to stay lean.)

use std::path::{Path, PathBuf};

use saif::data;
use saif::evaluate::{self, EvalOptions, Method};
use saif::progress::silent;
use saif::{defaults, Sae};
use saif_engine::{block_on, Engine, LoadOptions};

#[test]
fn saif_steers_smollm2_into_french() {
    let dir = std::env::var_os("SAIF_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/saif/models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let file = std::fs::File::open(&path).expect("the offline SmolLM2: run `make setup`");
    let mut engine = Engine::load_cpu(
        &mut std::io::BufReader::new(file),
        &LoadOptions { max_context: Some(512), ..Default::default() },
    )
    .unwrap();
    std::env::set_var("SAIF_SAES", Path::new(env!("CARGO_MANIFEST_DIR")).join("../../public/saes"));
    let key = engine.config().key.clone();
    let settings = defaults::steering(&key, "translate-fr").expect("settings recorded for SmolLM2's translate-fr");
    let (_, sae_dir) = defaults::find(&key, Some(settings.layer)).expect("a shipped SAE at the recorded layer");
    let sae = Sae::load_dir(&sae_dir).unwrap();
    let instruction = data::instruction("translate-fr").unwrap();
    let contents: Vec<String> = data::heldout_contents().into_iter().take(40).map(String::from).collect();
    let mut accuracy = |method| {
        let mut options = EvalOptions::new(method, settings.layer, settings.alpha, settings.k);
        options.max_new_tokens = 24;
        let report =
            block_on(evaluate::run(&mut engine, instruction, &contents, Some(&sae), &options, silent)).unwrap();
        eprintln!(
            "{}: loose {:.3} {:?}, strict {:.3}, {:?}",
            method.name(),
            report.loose,
            report.loose_ci,
            report.strict,
            report.fluency
        );
        for s in report.samples.iter().take(3) {
            eprintln!("  {:?}", s.output);
        }
        report.loose
    };
    let none = accuracy(Method::None);
    let saif = accuracy(Method::Saif);
    assert!(saif >= none + 0.15, "SAIF {saif:.3} vs no steering {none:.3}");
}

//! The SAEs the project ships for the offline models (public/saes, found without any flag), on held-out text the
//! trainer never saw (tests/data/heldout.txt: every 32nd line of the corpus' held-out split): loss recovered at
//! least 0.8, FVU at most 0.25, L0 at most 64, dead fraction at most 0.3. And they are interpretable: some
//! latent of SmolLM2's last-layer SAE promotes French words through the logit lens.

use std::path::{Path, PathBuf};

use saif::eval::evaluate;
use saif::lens::LogitLens;
use saif::{defaults, Sae};
use saif_engine::{block_on, Engine, LoadOptions};

fn model(file: &str) -> PathBuf {
    let dir = std::env::var_os("SAIF_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/saif/models"));
    let path = dir.join(file);
    assert!(path.exists(), "{} is missing: run `make setup`", path.display());
    path
}

fn load(path: &Path) -> Engine {
    Engine::load_cpu(&mut std::io::BufReader::new(std::fs::File::open(path).unwrap()), &LoadOptions::default()).unwrap()
}

fn heldout() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/heldout.txt");
    saif::corpus::read_lines(&path).unwrap()
}

/// The repository's public/saes, where `defaults` looks when the tests run from the crate's folder.
fn use_repository_saes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../public/saes");
    std::env::set_var("SAIF_SAES", dir);
}

fn check_shipped(file: &str, expected_layers: usize) {
    use_repository_saes();
    let mut engine = load(&model(file));
    let key = engine.config().key.clone();
    let shipped = defaults::shipped(&key);
    assert!(shipped.len() >= expected_layers, "{key}: shipped layers {shipped:?}");
    let last = engine.config().n_layers - 1;
    assert_eq!(shipped.last().unwrap().0, last, "{key}: the last layer's SAE is shipped");
    let lines = heldout();
    for (layer, dir) in shipped {
        let sae = Sae::load_dir(&dir).unwrap();
        assert_eq!(sae.info.layer, Some(layer));
        let size: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(size < 12_000_000, "{}: {size} bytes is not a few MB", dir.display());
        let eval = block_on(evaluate(&mut engine, &sae, layer, &lines, |_, _| {})).unwrap();
        eprintln!("{key} layer {layer}: {eval:?}");
        assert!(eval.ce_recovered >= 0.8, "{key} layer {layer}: loss recovered {}", eval.ce_recovered);
        assert!(eval.fvu <= 0.25, "{key} layer {layer}: FVU {}", eval.fvu);
        assert!(eval.l0 <= 64.0, "{key} layer {layer}: L0 {}", eval.l0);
        assert!(eval.dead_fraction <= 0.3, "{key} layer {layer}: dead fraction {}", eval.dead_fraction);
    }
}

#[test]
fn smollm2_saes_meet_the_quality_bar() {
    check_shipped("SmolLM2-135M-Instruct.Q4_1.gguf", 2);
}

#[test]
fn gemma3_saes_meet_the_quality_bar() {
    check_shipped("gemma-3-270m-q4_k_m.gguf", 2);
}

/// Common French words (few of them English ones): a latent whose logit lens is made of these speaks French.
const FRENCH: &str =
    "le les des une est et du au aux avec dans sur pas qui que qu mais nous vous ils elle elles leur leurs sont \
    été être avoir fait cette ces ses très plus aussi comme tout tous toutes bien où même alors donc entre sans \
    chez français française bonjour merci oui avez avons suis sommes êtes peut peuvent faire temps jour ça ici \
    voici selon après avant depuis pendant toujours jamais encore beaucoup quelque chaque notre votre mes tes \
    lui eux moi toi là déjà parce quand comment pourquoi aujourd il je la un de en ce se nos vos ont sera était \
    avait fois rien peu dont";

#[test]
fn smollm2_has_a_french_latent() {
    use_repository_saes();
    let path = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let engine = load(&path);
    let (_, dir) = defaults::find(&engine.config().key, None).expect("a shipped SAE");
    let sae = Sae::load_dir(&dir).unwrap();
    let lens = LogitLens::from_gguf(&mut std::io::BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
    let all: Vec<usize> = (0..sae.info.d_sae).collect();
    let tops = lens.top_tokens(&sae, &all, 10).unwrap();
    let french_count = |tokens: &[(u32, f32)]| {
        tokens
            .iter()
            .filter(|&&(id, _)| {
                let word = engine.tokenizer.decode(&[id]).unwrap_or_default().trim().to_lowercase();
                let word = word.trim_matches(|c: char| !c.is_alphabetic());
                !word.is_empty() && FRENCH.split_whitespace().any(|w| w == word)
            })
            .count()
    };
    let (best, count) = tops.iter().enumerate().map(|(j, t)| (j, french_count(t))).max_by_key(|x| x.1).unwrap();
    let words: Vec<String> =
        tops[best].iter().map(|&(id, _)| engine.tokenizer.decode(&[id]).unwrap_or_default()).collect();
    eprintln!("latent {best}: {count} French words of 10: {words:?}");
    assert!(count >= 5, "no latent whose top tokens are mostly French; best: latent {best} {words:?}");
}

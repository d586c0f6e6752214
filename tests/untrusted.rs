//! The fuzz targets' inputs, replayed on the stable toolchain in every `cargo test`: the committed seeds
//! (fuzz/corpus, written by fuzz/seeds.py), the engine's fixture models, every crash a fuzzer ever found
//! (fuzz/regressions), and a few thousand deterministic mutations of the seeds. The coverage-guided search itself
//! runs in `make fuzz` and, briefly, in `make test` (scripts/fuzz.sh).

use std::path::{Path, PathBuf};

use saif_app::untrusted;
#[path = "../crates/engine/tests/common/draws.rs"]
mod draws;
use draws::Draws;

type Target = fn(&[u8]) -> Result<String, String>;

const TARGETS: [(&str, Target); 6] = [
    ("gguf", untrusted::gguf),
    ("sae_gemma_scope", untrusted::sae_gemma_scope),
    ("sae_lens", untrusted::sae_lens),
    ("sae_shapes", untrusted::sae_shapes),
    ("lens_json", untrusted::lens_json),
    ("link", untrusted::link),
];

/// The files a target's error messages must name, so that a visitor knows which file is wrong.
fn files_named(target: &str) -> &'static [&'static str] {
    match target {
        "sae_gemma_scope" | "sae_shapes" => &["params.safetensors", "config.json"],
        "sae_lens" => &["sae_weights.safetensors", "cfg.json"],
        "lens_json" => &["lens.json"],
        _ => &[],
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The seeds of a target: its committed corpus, and for GGUF the engine's fixture models.
fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut paths = files_in(&root().join("fuzz/corpus").join(target));
    if target == "gguf" {
        paths.extend(
            files_in(&root().join("crates/engine/tests/fixtures"))
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "gguf")),
        );
    }
    paths.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

fn check_error(target: &str, input: &Path, message: &str) {
    assert!(!message.trim().is_empty(), "{target}: {} gives an empty error", input.display());
    let names = files_named(target);
    assert!(
        names.is_empty() || names.iter().any(|n| message.contains(n)),
        "{target}: the error for {} names no file ({names:?}): {message}",
        input.display()
    );
}

#[test]
fn every_seed_is_read() {
    for (target, run) in TARGETS {
        let seeds = seeds(target);
        assert!(seeds.len() >= 2, "{target} has {} seeds; run fuzz/seeds.py", seeds.len());
        for (path, bytes) in seeds {
            // The link seeds include a hostile link, which still reads (with notes); every other seed is a valid file.
            if let Err(e) = run(&bytes) {
                panic!("{target}: seed {} is refused: {e}", path.display());
            }
        }
    }
}

#[test]
fn every_past_crash_is_an_error_naming_the_file() {
    let mut replayed = 0;
    for (target, run) in TARGETS {
        for path in files_in(&root().join("fuzz/regressions").join(target)) {
            let bytes = std::fs::read(&path).unwrap();
            match run(&bytes) {
                Ok(summary) if target == "link" => assert!(!summary.is_empty()),
                Ok(summary) => panic!("{target}: {} was read as {summary}", path.display()),
                Err(e) => check_error(target, &path, &e),
            }
            replayed += 1;
        }
    }
    assert!(replayed >= 6, "only {replayed} regression cases found under fuzz/regressions");
}

/// One libFuzzer-like mutation: flip bits, write a boundary value, cut, or repeat a slice.
fn mutate(bytes: &mut Vec<u8>, draws: &mut Draws, window: usize) {
    let len = bytes.len().min(window).max(1);
    match draws.below(5) {
        0 => {
            for _ in 0..1 + draws.below(4) {
                let i = draws.below(len);
                if let Some(b) = bytes.get_mut(i) {
                    *b ^= 1 << draws.below(8);
                }
            }
        }
        1 => {
            let boundary: [u64; 6] = [0, 1, 0x7f, 0xffff_ffff, 1 << 62, u64::MAX];
            let value = boundary[draws.below(boundary.len())].to_le_bytes();
            let at = draws.below(len);
            for (k, v) in value.iter().take(1 << draws.below(4)).enumerate() {
                if let Some(b) = bytes.get_mut(at + k) {
                    *b = *v;
                }
            }
        }
        2 => bytes.truncate(draws.below(bytes.len() + 1)),
        3 => {
            let at = draws.below(len);
            let piece: Vec<u8> = bytes[at..(at + 1 + draws.below(16)).min(bytes.len())].to_vec();
            let to = draws.below(bytes.len() + 1);
            bytes.splice(to..to, piece);
        }
        _ => {
            let at = draws.below(len);
            if at < bytes.len() {
                bytes[at] = draws.next() as u8;
            }
        }
    }
}

#[test]
fn mutated_seeds_give_values_never_panics() {
    // GGUF loads cost milliseconds (mutations stay in the header and tokenizer, where the parsing is); the
    // others microseconds.
    for (target, run) in TARGETS {
        let (rounds, window) = if target == "gguf" { (200, 4096) } else { (2000, usize::MAX) };
        let (mut read, mut refused) = (0, 0);
        for (path, seed) in seeds(target) {
            let mut draws = Draws(0x5eed ^ seed.len() as u64);
            for round in 0..rounds {
                let mut bytes = seed.clone();
                for _ in 0..1 + round % 4 {
                    mutate(&mut bytes, &mut draws, window);
                }
                let outcome = std::panic::catch_unwind(|| run(&bytes));
                match outcome {
                    Ok(Ok(_)) => read += 1,
                    Ok(Err(e)) => {
                        refused += 1;
                        check_error(target, &path, &e)
                    }
                    Err(_) => {
                        let kept = std::env::temp_dir().join(format!("saif-{target}-mutation-{round}"));
                        std::fs::write(&kept, &bytes).unwrap();
                        panic!(
                            "{target}: mutation {round} of {} panics; input kept in {}",
                            path.display(),
                            kept.display()
                        );
                    }
                }
            }
        }
        eprintln!("{target}: {read} mutations read, {refused} refused with an error");
    }
}

//! Crafted and damaged GGUF headers get an error value, never a panic or an abort: the three files that crashed
//! `saif info` before the header was checked against the file's size (a string claiming 2^61 bytes, an array
//! claiming 2^60 elements, the real SmolLM2 with bytes flipped in its tensor directory), and random damage to a
//! small fixture's header. An allocation the header asks for but the file cannot hold aborts the test process,
//! so reaching the end of each test is the assertion that nothing was allocated that way.

mod common;

use common::*;
use saif_engine::{Engine, EngineError, GgufFile, LoadOptions};
#[path = "common/draws.rs"]
mod draws;
use draws::Draws;

/// A version-3 GGUF header with no tensors and one metadata entry whose value is `value` (type byte included).
fn header_with_entry(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // metadata entries
    out.extend((key.len() as u64).to_le_bytes());
    out.extend(key.as_bytes());
    out.extend(value);
    out
}

#[test]
fn a_string_claiming_two_to_the_61_bytes_is_an_error() {
    let mut value = 8u32.to_le_bytes().to_vec(); // a string
    value.extend((1u64 << 61).to_le_bytes());
    value.extend(b"only a few bytes follow");
    let err = GgufFile::from_bytes(&header_with_entry("general.name", &value)).err().expect("an error");
    assert!(matches!(err, EngineError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains(&(1u64 << 61).to_string()), "the message names the claimed size: {err}");
}

#[test]
fn an_array_claiming_two_to_the_60_elements_is_an_error() {
    for element_type in [4u32, 8] {
        // u32 elements, then strings
        let mut value = 9u32.to_le_bytes().to_vec(); // an array
        value.extend(element_type.to_le_bytes());
        value.extend((1u64 << 60).to_le_bytes());
        value.extend([0u8; 64]);
        let err = GgufFile::from_bytes(&header_with_entry("tokenizer.ggml.tokens", &value)).err().expect("an error");
        assert!(
            matches!(err, EngineError::Truncated { .. } | EngineError::MalformedGguf { .. }),
            "element type {element_type}: {err}"
        );
        assert!(err.to_string().contains(&(1u64 << 60).to_string()), "{err}");
    }
}

#[test]
fn a_zero_alignment_is_an_error() {
    let mut value = 4u32.to_le_bytes().to_vec();
    value.extend(0u32.to_le_bytes());
    let err = GgufFile::from_bytes(&header_with_entry("general.alignment", &value)).err().expect("an error");
    assert!(matches!(err, EngineError::MalformedGguf { .. }), "{err}");
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn smollm2_with_bytes_flipped_in_its_tensor_directory_is_an_error_or_loads() {
    let bytes = std::fs::read(model_path("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let file = GgufFile::from_bytes(&bytes).unwrap();
    // The directory: from the first tensor entry (a u64 name length, then the name) to the last one's end.
    let mut start = usize::MAX;
    let mut end = 0;
    for t in file.tensors() {
        let mut entry = (t.name.len() as u64).to_le_bytes().to_vec();
        entry.extend(t.name.as_bytes());
        let at = find(&bytes, &entry).unwrap_or_else(|| panic!("{} is in the directory", t.name));
        start = start.min(at);
        end = end.max(at + entry.len() + 4 + 8 * t.dims.len() + 4 + 8);
    }
    assert!(end > start && end - start < 64 * 1024, "directory {start}..{end}");
    let mut draws = Draws(0x5a1f);
    let mut refused = 0;
    for _ in 0..40 {
        let mut damaged = bytes[..end + 64].to_vec();
        damaged.extend(std::iter::repeat_n(0u8, bytes.len() - damaged.len())); // the same size, data zeroed
        for _ in 0..200 {
            let i = start + draws.below(end - start);
            damaged[i] ^= 1 << draws.below(8);
        }
        match GgufFile::from_bytes(&damaged) {
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
            Ok(parsed) => {
                // Whatever parses has every tensor inside the file.
                assert!(parsed.data_end() <= damaged.len() as u64);
            }
        }
    }
    assert!(refused > 0, "200 flipped bits in the directory never broke it: the walk is not checking anything");
}

#[test]
fn random_damage_to_a_fixture_header_never_panics() {
    let bytes = std::fs::read(fixture_path("tiny-llama.gguf")).unwrap();
    let header = bytes.len().min(16 * 1024);
    let mut draws = Draws(7);
    let (mut loaded, mut refused) = (0, 0);
    for round in 0..1500 {
        let mut damaged = bytes.clone();
        for _ in 0..1 + draws.below(8) {
            let i = draws.below(header);
            damaged[i] = match draws.below(3) {
                0 => damaged[i] ^ (1 << draws.below(8)),
                1 => 0xff,
                _ => draws.next() as u8,
            };
        }
        if round % 3 == 0 {
            damaged.truncate(draws.below(damaged.len()));
        }
        match Engine::from_bytes_cpu(&damaged, &LoadOptions::default()) {
            Ok(_) => loaded += 1,
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    eprintln!("damaged headers: {loaded} loaded, {refused} refused");
    assert!(refused > 0);
}

//! Bad input gets a clear error, never a panic: truncated files, foreign files, unknown architectures,
//! unsupported quantizations, prompts longer than the context. The engine stays usable afterwards.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use saif_engine::{
    block_on, generate, Engine, EngineError, GenerateOptions, Hooks, LoadOptions, LogitsWanted, Sampling, Segment,
};

fn load_bytes(bytes: &[u8]) -> Result<Engine, EngineError> {
    Engine::from_bytes_cpu(bytes, &LoadOptions::default())
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture_path("tiny-llama.gguf")).unwrap()
}

#[test]
fn truncated_files_say_so() {
    let bytes = fixture_bytes();
    let header_end = saif_engine::GgufFile::from_bytes(&bytes).unwrap().data_end() as usize;
    assert_eq!(header_end, bytes.len(), "the fixture ends where its last tensor does");
    for cut in [0, 3, 100, 5000, bytes.len() / 2, bytes.len() - 1] {
        match load_bytes(&bytes[..cut]) {
            Err(e @ EngineError::Truncated { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("truncated") && msg.contains(&cut.to_string()), "{cut}: {msg}");
            }
            Err(other) => panic!("cut at {cut}: expected a truncation error, got: {other}"),
            Ok(_) => panic!("cut at {cut}: loaded a truncated file"),
        }
    }
}

#[test]
fn foreign_files_are_named_as_not_gguf() {
    let zip = b"PK\x03\x04\x14\x00\x00\x00\x08\x00rest of a zip file".to_vec();
    let html = b"<!DOCTYPE html><html><body>404 Not Found</body></html>".to_vec();
    let mut safetensors = 42u64.to_le_bytes().to_vec();
    safetensors.extend_from_slice(b"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}    ");
    for bytes in [zip, html, safetensors] {
        match load_bytes(&bytes) {
            Err(e @ EngineError::NotGguf { .. }) => {
                assert!(e.to_string().contains("not a GGUF file"), "{e}")
            }
            other => panic!("expected NotGguf, got {:?}", other.err().map(|e| e.to_string())),
        }
    }
}

#[test]
fn unknown_architectures_are_refused_by_name() {
    let mut bytes = std::fs::read(fixture_path("tiny-gemma3.gguf")).unwrap();
    // Rename the architecture everywhere it appears (the value and the keys' prefix).
    let (from, to) = (b"gemma3", b"mamba9");
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
        }
        i += 1;
    }
    match load_bytes(&bytes) {
        Err(EngineError::UnsupportedArchitecture(name)) => assert_eq!(name, "mamba9"),
        other => panic!("expected UnsupportedArchitecture, got {:?}", other.err().map(|e| e.to_string())),
    }
}

/// A GGUF with one tensor in `dtype`, written by candle.
fn gguf_with_tensor(dtype: GgmlDType) -> Vec<u8> {
    let t = Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let arch = gguf_file::Value::String("llama".into());
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &[("general.architecture", &arch)], &[("blk.0.attn_q.weight", &q)]).unwrap();
    out.into_inner()
}

#[test]
fn unsupported_quantizations_are_named() {
    match load_bytes(&gguf_with_tensor(GgmlDType::Q5_1)) {
        Err(e @ EngineError::UnsupportedTensorType { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("Q5_1") && msg.contains("blk.0.attn_q.weight") && msg.contains("Q4_K"), "{msg}");
        }
        other => panic!("expected UnsupportedTensorType, got {:?}", other.err().map(|e| e.to_string())),
    }
    // A type code no reader knows (ggml has added IQ and MX types over time): patch Q8_0's code 8 to 99.
    let mut bytes = gguf_with_tensor(GgmlDType::Q8_0);
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // After the name: n_dims (u32), 2 dims (u64 each), then the type (u32).
    let type_at = at + 4 + 16;
    assert_eq!(u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()), 8);
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    match load_bytes(&bytes) {
        Err(e @ EngineError::UnsupportedTensorType { .. }) => {
            assert!(e.to_string().contains("99"), "{e}")
        }
        other => panic!("expected UnsupportedTensorType, got {:?}", other.err().map(|e| e.to_string())),
    }
}

#[test]
fn prompts_longer_than_the_context_are_refused_and_the_model_stays_usable() {
    let mut engine = load(&fixture_path("tiny-llama.gguf"));
    let context = engine.model.max_context();
    assert_eq!(context, 64);
    let too_long: Vec<u32> = (0..context as u32 + 1).map(|i| 5 + i % 200).collect();
    let none = Hooks::none();
    match block_on(engine.model.forward(&too_long, Segment::Prompt, &none, LogitsWanted::Last)) {
        Err(e @ EngineError::ContextOverflow { .. }) => {
            assert!(e.to_string().contains("65 tokens") && e.to_string().contains("64"), "{e}")
        }
        other => panic!("expected ContextOverflow, got {:?}", other.err().map(|e| e.to_string())),
    }
    // Prompt plus new tokens beyond the context fails before any work.
    let options = GenerateOptions { max_new_tokens: 10, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let err = block_on(generate(engine.model.as_mut(), &too_long[..60], &options, &none, |_| true)).unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { tokens: 69, context: 64 }), "{err}");
    // Still usable.
    let g = block_on(generate(engine.model.as_mut(), &too_long[..5], &options, &none, |_| true)).unwrap();
    assert_eq!(g.ids.len(), 10);
}

#[test]
fn bad_requests_are_refused() {
    let mut engine = load(&fixture_path("tiny-llama.gguf"));
    let none = Hooks::none();
    assert!(matches!(
        block_on(engine.model.forward(&[], Segment::Prompt, &none, LogitsWanted::Last)),
        Err(EngineError::InvalidRequest(_))
    ));
    let err = block_on(engine.model.forward(&[100_000], Segment::Prompt, &none, LogitsWanted::Last)).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let bad_hook = Hooks::none().read(3, saif_engine::Positions::Last);
    let err = block_on(engine.model.forward(&[5, 6], Segment::Prompt, &bad_hook, LogitsWanted::Last)).unwrap_err();
    assert!(err.to_string().contains("layer 3"), "{err}");
    let bad_sampling = GenerateOptions {
        max_new_tokens: 4,
        sampling: Sampling::Random { temperature: -1.0, top_k: None, top_p: None, seed: 0 },
        stop_tokens: vec![],
    };
    assert!(block_on(generate(engine.model.as_mut(), &[5, 6], &bad_sampling, &none, |_| { true })).is_err());
}

/// A CPU-only option asked of the GPU is refused by name, not ignored.
#[test]
fn the_gpu_refuses_8_bit_activations() {
    let reader = &mut std::io::BufReader::new(std::fs::File::open(fixture_path("tiny-llama.gguf")).unwrap());
    let options = LoadOptions { int8_activations: true, ..Default::default() };
    match block_on(Engine::load_wgpu(reader, &options, None)) {
        Err(e) => assert!(e.to_string().contains("8-bit activations are a CPU mode"), "{e}"),
        Ok(_) => panic!("loaded with 8-bit activations on the GPU"),
    }
}

/// The fixture `name` written again by candle, its tensors first passed through `change`.
fn rewritten(name: &str, change: impl FnOnce(&mut Vec<(String, QTensor)>)) -> Vec<u8> {
    rewritten_with(name, |_| {}, change)
}

/// `rewritten`, its metadata first passed through `metadata`.
fn rewritten_with(
    name: &str,
    metadata: impl FnOnce(&mut std::collections::HashMap<String, gguf_file::Value>),
    change: impl FnOnce(&mut Vec<(String, QTensor)>),
) -> Vec<u8> {
    let mut file = std::fs::File::open(fixture_path(name)).unwrap();
    let mut content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> =
        names.into_iter().map(|n| (n.clone(), content.tensor(&mut file, n, &Device::Cpu).unwrap())).collect();
    change(&mut tensors);
    metadata(&mut content.metadata);
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (&k[..], v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (&n[..], t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    out.into_inner()
}

/// Both backends read the model's tensors through one description (`saif_engine::tensors`): a tensor of the wrong
/// shape, or one the architecture needs and the file lacks, is refused by name on each.
#[test]
fn tensors_of_the_wrong_shape_or_missing_are_named_on_both_backends() {
    let fixture = "tiny-gemma3.gguf";
    let transposed = rewritten(fixture, |tensors| {
        let (_, t) = tensors.iter_mut().find(|(n, _)| n == "blk.1.attn_k.weight").unwrap();
        let (rows, cols) = t.shape().dims2().unwrap();
        assert_ne!(rows, cols, "a transposed square matrix would keep its shape");
        *t = QTensor::quantize(
            &Tensor::zeros((cols, rows), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
    });
    let without_norm = rewritten(fixture, |tensors| tensors.retain(|(n, _)| n != "blk.0.post_ffw_norm.weight"));
    let intact = rewritten(fixture, |_| {});
    let load_gpu = |bytes: &[u8]| {
        let options = LoadOptions { max_context: Some(64), ..Default::default() };
        block_on(Engine::load_wgpu(&mut std::io::Cursor::new(bytes), &options, None))
    };
    type Loader<'a> = &'a dyn Fn(&[u8]) -> Result<Engine, EngineError>;
    let loaders: [(&str, Loader); 2] = [("cpu", &load_bytes), ("wgpu", &load_gpu)];
    for (backend, load) in loaders {
        assert!(load(&intact).is_ok(), "{backend}: the fixture written again loads");
        for (bytes, tensor, why) in [
            (&transposed, "blk.1.attn_k.weight", "expected shape"),
            (&without_norm, "blk.0.post_ffw_norm.weight", "missing from the file"),
        ] {
            match load(bytes) {
                Err(e @ EngineError::BadTensor { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(tensor) && msg.contains(why), "{backend}: {msg}");
                }
                other => {
                    panic!("{backend}: expected BadTensor for {tensor}, got {:?}", other.err().map(|e| e.to_string()))
                }
            }
        }
    }
}

/// Sizes that would build empty layers, or heads RoPE cannot turn, are refused by their metadata key before any
/// tensor is read.
#[test]
fn zero_sizes_and_odd_heads_are_refused_by_key() {
    let odd_heads = [("llama.attention.key_length", 7), ("llama.attention.value_length", 7)];
    for (set, key, why) in [
        (&[("llama.embedding_length", 0)][..], "llama.embedding_length", "is 0"),
        (&[("llama.block_count", 0)], "llama.block_count", "is 0"),
        (&[("llama.feed_forward_length", 0)], "llama.feed_forward_length", "is 0"),
        (&[("llama.context_length", 0)], "llama.context_length", "is 0"),
        (&odd_heads, "llama.attention.key_length", "in pairs"),
    ] {
        let bytes = rewritten_with(
            "tiny-llama.gguf",
            |metadata| {
                for &(k, v) in set {
                    metadata.insert(k.into(), gguf_file::Value::U32(v));
                }
            },
            |_| {},
        );
        match load_bytes(&bytes) {
            Err(e @ EngineError::MissingMetadata { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(key) && msg.contains(why), "{key}: {msg}");
            }
            other => panic!("{set:?}: expected MissingMetadata, got {:?}", other.err().map(|e| e.to_string())),
        }
    }
}

/// No query heads, with the head size left to be computed from them (no key length in the file), is refused by
/// key, not divided by.
#[test]
fn no_heads_and_no_key_length_are_refused_by_key() {
    let bytes = rewritten_with(
        "tiny-llama.gguf",
        |metadata| {
            metadata.remove("llama.attention.key_length");
            metadata.remove("llama.attention.value_length");
            metadata.insert("llama.attention.head_count".into(), gguf_file::Value::U32(0));
        },
        |_| {},
    );
    match load_bytes(&bytes) {
        Err(e @ EngineError::MissingMetadata { .. }) => assert!(e.to_string().contains("head_count"), "{e}"),
        other => panic!("expected MissingMetadata, got {:?}", other.err().map(|e| e.to_string())),
    }
}

//! The engine in the browser (wasm-bindgen-test in headless Chromium; `make test` runs it): it tokenizes the
//! golden tokenizer cases of both offline models and runs the fixture models' forward pass with the outputs of
//! Hugging Face transformers. The tokenizer-only GGUFs are written by `make` (examples/tokenizer_gguf.rs) into
//! $SAIF_WASM_FIXTURES before this test is compiled.
#![cfg(target_arch = "wasm32")]

use saif_engine::{
    generate, generate_batch, Engine, GenerateOptions, GgufFile, Hooks, LoadOptions, LogitsWanted, Sampling, Scope,
    Segment, SequenceRequest, Tokenizer,
};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_tokenizer(gguf_bytes: &[u8], golden: &str) {
    let gguf = GgufFile::from_bytes(gguf_bytes).unwrap();
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let golden = json(golden);
    for case in golden["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text).unwrap(), ids(&case["ids"]), "{text:?}");
    }
    for p in golden["prompts"].as_array().unwrap() {
        assert_eq!(tokenizer.encode_prompt(p["prompt"].as_str().unwrap()).unwrap(), ids(&p["input_ids"]));
    }
}

#[wasm_bindgen_test]
fn gemma3_tokenizer_matches_the_golden_cases() {
    check_tokenizer(
        include_bytes!(concat!(env!("SAIF_WASM_FIXTURES"), "/gemma-3-270m-tokenizer.gguf")),
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/gemma-3-270m-q4_k_m.json")),
    );
}

#[wasm_bindgen_test]
fn smollm2_tokenizer_matches_the_golden_cases() {
    check_tokenizer(
        include_bytes!(concat!(env!("SAIF_WASM_FIXTURES"), "/smollm2-135m-tokenizer.gguf")),
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/smollm2-135m-instruct-q4_1.json")),
    );
}

async fn check_fixture(gguf_bytes: &[u8], reference: &str) {
    let mut engine = Engine::from_bytes_cpu(gguf_bytes, &LoadOptions::default()).unwrap();
    let reference = json(reference);
    for case in reference["cases"].as_array().unwrap() {
        let input = ids(&case["input_ids"]);
        engine.model.reset();
        let out = engine.model.forward(&input, Segment::Prompt, &Hooks::none(), LogitsWanted::Last).await.unwrap();
        for (g, w) in out.logits.iter().zip(case["last_logits"].as_array().unwrap()) {
            let w = w.as_f64().unwrap();
            assert!((*g as f64 - w).abs() <= 1e-3 + 1e-3 * w.abs(), "{g} vs {w}");
        }
        let options = GenerateOptions { max_new_tokens: 8, sampling: Sampling::Greedy, stop_tokens: vec![] };
        let g = generate(engine.model.as_mut(), &input, &options, &Hooks::none(), |_| true).await.unwrap();
        assert_eq!(g.ids, ids(&case["greedy8_ids"]));
    }
}

#[wasm_bindgen_test]
async fn tiny_gemma3_forward_matches_transformers() {
    check_fixture(include_bytes!("fixtures/tiny-gemma3.gguf"), include_str!("fixtures/tiny-gemma3.json")).await;
}

#[wasm_bindgen_test]
async fn tiny_gemma2_forward_matches_transformers() {
    check_fixture(include_bytes!("fixtures/tiny-gemma2.gguf"), include_str!("fixtures/tiny-gemma2.json")).await;
}

#[wasm_bindgen_test]
async fn tiny_llama_forward_matches_transformers() {
    check_fixture(include_bytes!("fixtures/tiny-llama.gguf"), include_str!("fixtures/tiny-llama.json")).await;
}

/// A greedy decoding step picks through the output matrix's screen in wasm (`CpuModel::forward_pick`), and
/// `generate` gives the tokens the whole logits' argmax gives, step after step, with 8-bit activations too. On
/// tiny-llama given an untied Q8_0 output matrix of random rows (the offline models' type, the one the screen
/// reads), written here.
#[wasm_bindgen_test]
async fn greedy_steps_through_the_screen_give_the_argmax_of_the_logits() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    assert!(saif_engine::quant::greedy_screen::screens_single_rows(), "wasm screens single rows");
    let mut reader = std::io::Cursor::new(&include_bytes!("fixtures/tiny-llama.gguf")[..]);
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> =
        names.into_iter().map(|n| (n.clone(), content.tensor(&mut reader, n, &Device::Cpu).unwrap())).collect();
    let (vocab, hidden) = tensors.iter().find(|(n, _)| n == "token_embd.weight").unwrap().1.shape().dims2().unwrap();
    let w = Tensor::from_vec(gpu_cases::noise(vocab * hidden, 31), (vocab, hidden), &Device::Cpu).unwrap();
    tensors.push(("output.weight".into(), QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()));
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (&k[..], v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (&n[..], t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    let bytes = out.into_inner();
    for int8_activations in [false, true] {
        let options = LoadOptions { int8_activations, ..Default::default() };
        let mut engine = Engine::from_bytes_cpu(&bytes, &options).unwrap();
        let prompt = [1, 7, 42, 99];
        let steps = 16;
        let greedy = GenerateOptions { max_new_tokens: steps, sampling: Sampling::Greedy, stop_tokens: vec![] };
        let screened = generate(engine.model.as_mut(), &prompt, &greedy, &Hooks::none(), |_| true).await.unwrap().ids;
        let model = engine.model.as_mut();
        model.reset();
        let (mut input, mut segment, mut whole) = (prompt.to_vec(), Segment::Prompt, Vec::new());
        for _ in 0..steps {
            let out = model.forward(&input, segment, &Hooks::none(), LogitsWanted::Last).await.unwrap();
            whole.push(saif_engine::sampler::argmax(&out.logits));
            (input, segment) = (vec![*whole.last().unwrap()], Segment::Generated);
        }
        assert_eq!(screened, whole, "8-bit activations: {int8_activations}");
    }
}

#[wasm_bindgen_test]
fn truncated_files_are_errors_not_panics() {
    let bytes = include_bytes!("fixtures/tiny-llama.gguf");
    let err = Engine::from_bytes_cpu(&bytes[..bytes.len() / 2], &LoadOptions::default()).err().unwrap();
    assert!(err.to_string().contains("truncated"), "{err}");
}

/// The CPU path's block kernels in WebAssembly SIMD (quant/simd128.rs) equal the portable code bit for bit: the
/// fused dot products and the decoders, on quantized rows of every type (those without a simd128 kernel take the
/// portable code in both), and Q5_0's rewriting as Q8_0.
#[wasm_bindgen_test]
fn simd128_kernels_equal_the_portable_ones() {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use saif_engine::quant::blocks::{dequantize, dot_row, portable_dequantize, portable_dot_row};
    const { assert!(cfg!(target_feature = "simd128"), "the wasm builds enable simd128 (.cargo/config.toml)") };
    let (rows, cols) = (8, 512);
    for dtype in saif_engine::gguf::SUPPORTED_TYPES {
        let w = Tensor::from_vec(gpu_cases::noise(rows * cols, 7), (rows, cols), &Device::Cpu).unwrap();
        let bytes = QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned();
        let row_bytes = bytes.len() / rows;
        for r in 0..rows {
            // Activations with some exact zeros and negative zeros among them.
            let mut x = gpu_cases::noise(cols, 100 + r as u64);
            x.iter_mut().step_by(17).for_each(|v| *v = if r % 2 == 0 { 0.0 } else { -0.0 });
            let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
            let (got, want) = (dot_row(dtype, row, &x), portable_dot_row(dtype, row, &x));
            assert_eq!(got.to_bits(), want.to_bits(), "{dtype:?} row {r}: {got} vs the portable {want}");
        }
        let (mut got, mut want) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
        dequantize(dtype, &bytes, &mut got);
        portable_dequantize(dtype, &bytes, &mut want);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{dtype:?} value {i}: {g} vs the portable {w}");
        }
        if dtype == GgmlDType::Q5_0 {
            let mut want = vec![0u8; bytes.len() / 22 * 34];
            saif_engine::quant::blocks::portable_q5_0_as_q8_0(&bytes, &mut want);
            let mut got = vec![0u8; want.len()];
            saif_engine::quant::blocks::q5_0_as_q8_0(&bytes, &mut got);
            assert_eq!(got, want, "Q5_0 rewritten as Q8_0");
        }
    }
}

/// The block types of the offline models' matrices.
const OFFLINE_TYPES: [GgmlDType; 5] =
    [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K];

/// A `rows x cols` matrix of noise (`seed`) quantized to `dtype`, and its bytes, row after row.
fn noise_matrix(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (candle_core::quantized::QTensor, Vec<u8>) {
    let w = candle_core::Tensor::from_vec(gpu_cases::noise(rows * cols, seed), (rows, cols), &candle_core::Device::Cpu);
    let q = candle_core::quantized::QTensor::quantize(&w.unwrap(), dtype).unwrap();
    let bytes = q.data().unwrap().into_owned();
    (q, bytes)
}

/// In wasm, a batched step's exact products (`matmul_exact_rows`, which unpacks each weight row once for several
/// activation rows) give each activation row what a decoding step's fused product of that row alone (`matmul`)
/// gives it, and both equal the portable `dot_row` of the file's rows, bit for bit, for batches of 1 to 6 rows and
/// every type the simd128 kernels cover (Q5_0's rows stored as Q8_0). (Both products read the activations' block
/// sums, made once per product, on Q4_1 and Q4_K; the portable twin sums the blocks itself.)
#[wasm_bindgen_test]
fn batched_exact_rows_equal_each_row_alone() {
    use saif_engine::quant::blocks::portable_dot_row;
    use saif_engine::quant::QuantMatrix;
    let (rows, cols) = (12, 512);
    for dtype in OFFLINE_TYPES {
        let (q, bytes) = noise_matrix(dtype, rows, cols, 3);
        let row_bytes = bytes.len() / rows;
        let q = QuantMatrix::new("w", std::sync::Arc::new(q)).unwrap().for_decoding().unwrap();
        // Q5_0 rows are kept as Q8_0 rows of the same values, whose kernels are the faster in wasm.
        let stored = if dtype == GgmlDType::Q5_0 { GgmlDType::Q8_0 } else { dtype };
        assert_eq!(q.dtype(), stored, "{dtype:?} stored as");
        for m in 1..=6 {
            let x = gpu_cases::noise(m * cols, 50 + m as u64);
            let batch = q.matmul_exact_rows(&x).unwrap();
            for i in 0..m {
                let xi = &x[i * cols..(i + 1) * cols];
                let alone = q.matmul(xi).unwrap();
                for r in 0..rows {
                    let portable = portable_dot_row(dtype, &bytes[r * row_bytes..(r + 1) * row_bytes], xi);
                    for (what, got) in [("batched", batch[i * rows + r]), ("alone", alone[r])] {
                        assert_eq!(
                            got.to_bits(),
                            portable.to_bits(),
                            "{dtype:?}, {m} rows, row {i}, output {r}: {what} {got} vs the portable {portable}"
                        );
                    }
                }
            }
        }
    }
}

/// Activations rounded to 8 bits in wasm (`LoadOptions::int8_activations`): `int8::dot_row`'s simd128 kernels equal
/// the portable twin bit for bit on every type they cover (Q8_0 too, the form of wasm's Q5_0 rows), with zeros and
/// an outlier among the activations, on rows of 16 and 19 blocks; a decoding step's product gives what the kernel
/// gives the file's rows (Q5_0 rows included, stored as Q8_0); and a batched step's product (`matmul_exact_rows`)
/// gives each row what a decoding step of that row alone (`matmul`) gives it, for batches of 1 to 5 rows, on those
/// types and on Q8_0, which stays exact.
#[wasm_bindgen_test]
fn rounded_activations_products_equal_the_portable_ones() {
    use saif_engine::quant::{int8, QuantMatrix};
    let rows = 12;
    // 16 blocks of 32 a row, and for the types of 32-value blocks also 19 (the kernels take four blocks at a time,
    // then the rest one by one).
    let cases = OFFLINE_TYPES.map(|dtype| (dtype, 512)).into_iter();
    for (dtype, cols) in cases.chain([GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q5_0].map(|dtype| (dtype, 608))) {
        let (q, bytes) = noise_matrix(dtype, rows, cols, 21);
        let row_bytes = bytes.len() / rows;
        let matrix = QuantMatrix::new("w", std::sync::Arc::new(q)).unwrap().with_int8_activations(true);
        let matrix = matrix.for_decoding().unwrap();
        for m in 1..=5 {
            let mut x = gpu_cases::noise(m * cols, 60 + m as u64);
            x.iter_mut().step_by(13).for_each(|v| *v = 0.0);
            x[7] *= 50.0;
            let batch = matrix.matmul_exact_rows(&x).unwrap();
            for i in 0..m {
                let xi = &x[i * cols..(i + 1) * cols];
                let alone = matrix.matmul(xi).unwrap();
                let rounded = int8::quantize(xi);
                for r in 0..rows {
                    let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
                    let (got, want) =
                        (int8::dot_row(dtype, row, &rounded), int8::portable_dot_row(dtype, row, &rounded));
                    assert_eq!(got.to_bits(), want.to_bits(), "{dtype:?} row {r}: {got} vs the portable {want}");
                    if int8::supports(dtype) {
                        assert_eq!(alone[r].to_bits(), got.to_bits(), "{dtype:?}, a step's product, output {r}");
                    }
                    let (got, want) = (batch[i * rows + r], alone[r]);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{dtype:?}, {m} rows, row {i}, output {r}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// The greedy screen in wasm: its approximation in simd128 (`greedy_screen::rounded_dots`) equals the portable
/// twin bit for bit for 1 to 4 activation rows at once (the native tests check the twin against the screen's
/// bound), and the screened pick is `sampler::argmax` of the exact product, for 1, 2 and 8 rows, with three rows
/// that tie exactly (the first of them wins).
#[wasm_bindgen_test]
fn greedy_screen_picks_the_exact_argmax() {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use saif_engine::quant::greedy_screen::{portable_rounded_dot, rounded_dots};
    use saif_engine::quant::{int8, QuantMatrix};
    use saif_engine::sampler::argmax;
    let (rows, cols) = (1024, 256);
    let mut w: Vec<f32> = gpu_cases::noise(rows * cols, 11).iter().map(|v| v * 0.05).collect();
    let x = gpu_cases::noise(8 * cols, 12);
    // Rows 5, 40 and 700 the same, made to win for the first activation row.
    for r in [5, 40, 700] {
        let own: Vec<f32> = x[..cols].iter().map(|v| v * 0.03).collect();
        w[r * cols..(r + 1) * cols].copy_from_slice(&own);
    }
    let q = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap();
    let bytes = q.data().unwrap().into_owned();
    let row_bytes = bytes.len() / rows;
    let rounded: Vec<int8::Q8Row> = x.chunks_exact(cols).map(int8::quantize).collect();
    let widened: Vec<Vec<i16>> = rounded.iter().map(|r| r.values.iter().map(|&v| i16::from(v)).collect()).collect();
    // `M` activation rows from row i on.
    fn dots<const M: usize>(row: &[u8], widened: &[Vec<i16>], rounded: &[int8::Q8Row], i: usize) -> [f32; M] {
        let xs = std::array::from_fn(|j| &widened[i + j][..]);
        rounded_dots::<M>(row, xs, std::array::from_fn(|j| &rounded[i + j].scale[..]))
    }
    for r in 0..rows {
        let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
        let got: Vec<f32> = [
            &dots::<1>(row, &widened, &rounded, 0)[..],
            &dots::<2>(row, &widened, &rounded, 1)[..],
            &dots::<3>(row, &widened, &rounded, 3)[..],
            &dots::<4>(row, &widened, &rounded, 4)[..],
        ]
        .concat();
        assert_eq!(got.len(), 10);
        for (slot, i) in [0, 1, 2, 3, 4, 5, 4, 5, 6, 7].into_iter().enumerate() {
            let want = portable_rounded_dot(row, &widened[i], &rounded[i].scale);
            assert_eq!(got[slot].to_bits(), want.to_bits(), "row {r}, activation row {i}: {} vs {want}", got[slot]);
        }
    }
    let matrix = QuantMatrix::new("w", std::sync::Arc::new(q)).unwrap().for_decoding().unwrap();
    for m in [1, 2, 8] {
        let exact = matrix.matmul_exact_rows(&x[..m * cols]).unwrap();
        let picks = matrix.argmax_exact_rows(&x[..m * cols]).unwrap().expect("a screen in wasm");
        for (i, &pick) in picks.iter().enumerate() {
            assert_eq!(pick, argmax(&exact[i * rows..(i + 1) * rows]), "{m} rows, activation row {i}");
        }
        assert_eq!(picks[0], 5, "the first of the tied rows");
    }
}

// --- WebGPU (SwiftShader in headless Chromium) ---------------------------------------------------------------

mod gpu_cases;

use candle_core::quantized::GgmlDType;
use saif_engine::gpu::kernels::MatmulForm;

async fn gpu() -> saif_engine::gpu::Gpu {
    saif_engine::gpu::Gpu::new().await.expect("WebGPU (Chromium runs with --enable-unsafe-webgpu)")
}

#[wasm_bindgen_test]
async fn webgpu_matmul_matches_cpu_for_every_type() {
    gpu_cases::matmul_matches_cpu_for_every_type(&gpu().await.with_matmul_form(MatmulForm::PerRow)).await;
}

/// The form real GPUs get (16 threads per row), on SwiftShader too.
#[wasm_bindgen_test]
async fn webgpu_cooperative_matmul_matches_cpu_for_every_type() {
    gpu_cases::matmul_matches_cpu_for_every_type(&gpu().await.with_matmul_form(MatmulForm::Cooperative)).await;
}

#[wasm_bindgen_test]
async fn webgpu_split_matrices_give_the_same_products() {
    gpu_cases::split_matrices_give_the_same_products(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_embedding_matches_cpu_for_every_type() {
    gpu_cases::embedding_matches_cpu_for_every_type(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_rms_norms_match_cpu() {
    gpu_cases::rms_norms_match_cpu(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_head_preparation_matches_cpu() {
    gpu_cases::head_preparation_matches_cpu(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_fused_products_match_cpu() {
    gpu_cases::fused_products_match_cpu(&gpu().await.with_matmul_form(MatmulForm::PerRow)).await;
    gpu_cases::fused_products_match_cpu(&gpu().await.with_matmul_form(MatmulForm::Cooperative)).await;
}

#[wasm_bindgen_test]
async fn webgpu_normalized_products_equal_norm_then_product() {
    // One type per form: SwiftShader compiles each pipeline slowly (every type runs natively).
    let gpu_form = gpu().await.with_matmul_form(MatmulForm::Cooperative);
    gpu_cases::normalized_products_equal_norm_then_product(&gpu().await, &[GgmlDType::Q4_1]).await;
    gpu_cases::normalized_products_equal_norm_then_product(&gpu_form, &[GgmlDType::Q6K]).await;
}

#[wasm_bindgen_test]
async fn webgpu_add_norm_products_equal_norm_add_then_product() {
    gpu_cases::add_norm_products_equal_norm_add_then_product(&gpu().await, &[GgmlDType::Q5_0]).await;
}

#[wasm_bindgen_test]
async fn webgpu_largest_products_pick_as_argmax() {
    gpu_cases::largest_products_pick_as_argmax(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_embed_norm_products_equal_embed_then_norm_product() {
    gpu_cases::embed_norm_products_equal_embed_then_norm_product(&gpu().await, &[GgmlDType::Q4_1]).await;
}

#[wasm_bindgen_test]
async fn webgpu_attention_matches_cpu() {
    gpu_cases::attention_matches_cpu(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_step_attention_matches_prepare_then_attend() {
    gpu_cases::step_attention_matches_prepare_then_attend(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_attention_gives_each_sequence_what_it_gets_alone() {
    gpu_cases::attention_gives_each_sequence_what_it_gets_alone(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_elementwise_steps_match_cpu() {
    gpu_cases::elementwise_steps_match_cpu(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_projection_matches_cpu() {
    gpu_cases::projection_matches_cpu(&gpu().await).await;
}

#[wasm_bindgen_test]
async fn webgpu_token_selection_matches_the_cpu_sampler() {
    gpu_cases::token_selection_matches_the_cpu_sampler(&gpu().await).await;
}

/// The whole model on WebGPU, in both forms of the matrix products: the fixtures' logits and greedy tokens equal
/// transformers'.
#[wasm_bindgen_test]
async fn webgpu_fixture_models_match_transformers() {
    for form in [MatmulForm::PerRow, MatmulForm::Cooperative] {
        check_fixtures_on_webgpu(std::rc::Rc::new(gpu().await.with_matmul_form(form))).await;
    }
}

async fn check_fixtures_on_webgpu(gpu: std::rc::Rc<saif_engine::gpu::Gpu>) {
    for (bytes, reference) in [
        (&include_bytes!("fixtures/tiny-gemma3.gguf")[..], include_str!("fixtures/tiny-gemma3.json")),
        (&include_bytes!("fixtures/tiny-gemma2.gguf")[..], include_str!("fixtures/tiny-gemma2.json")),
        (&include_bytes!("fixtures/tiny-llama.gguf")[..], include_str!("fixtures/tiny-llama.json")),
    ] {
        let mut engine =
            Engine::load_wgpu(&mut std::io::Cursor::new(bytes), &LoadOptions::default(), Some(gpu.clone()))
                .await
                .unwrap();
        let reference = json(reference);
        for case in reference["cases"].as_array().unwrap() {
            let input = ids(&case["input_ids"]);
            engine.model.reset();
            let out = engine.model.forward(&input, Segment::Prompt, &Hooks::none(), LogitsWanted::Last).await.unwrap();
            for (g, w) in out.logits.iter().zip(case["last_logits"].as_array().unwrap()) {
                let w = w.as_f64().unwrap();
                assert!((*g as f64 - w).abs() <= 1e-3 + 1e-3 * w.abs(), "{g} vs {w}");
            }
            let options = GenerateOptions { max_new_tokens: 8, sampling: Sampling::Greedy, stop_tokens: vec![] };
            let g = generate(engine.model.as_mut(), &input, &options, &Hooks::none(), |_| true).await.unwrap();
            assert_eq!(g.ids, ids(&case["greedy8_ids"]));
        }
    }
}

/// Batched decoding on WebGPU, told to batch on SwiftShader: three sequences of tiny-llama, two of them steered,
/// each get in one batch the greedy tokens they get alone, and the steps ran as one call.
#[wasm_bindgen_test]
async fn webgpu_batched_steps_give_each_sequence_what_it_gets_alone() {
    let gpu = std::rc::Rc::new(gpu().await.with_batched_steps(true));
    let bytes = &include_bytes!("fixtures/tiny-llama.gguf")[..];
    let mut engine =
        Engine::load_wgpu(&mut std::io::Cursor::new(bytes), &LoadOptions::default(), Some(gpu)).await.unwrap();
    let hidden = engine.config().hidden;
    let v: Vec<f32> = (0..hidden).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.6).collect();
    let prompts = [vec![2u32, 40, 41, 42], vec![2, 50], vec![2, 60, 61, 62, 63, 64]];
    let hooks = [Hooks::none(), Hooks::none().add(1, v.clone(), Scope::All), Hooks::none().add(0, v, Scope::Generated)];
    let options = GenerateOptions { max_new_tokens: 6, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let requests: Vec<SequenceRequest> =
        (0..3).map(|i| SequenceRequest { prompt: &prompts[i], hooks: &hooks[i], options: &options }).collect();
    let batched = generate_batch(engine.model.as_mut(), &requests, |_, _| async { true }).await.unwrap();
    assert_eq!(engine.model.stats().batched_steps, Some(5), "steps run as one call");
    for (i, b) in batched.iter().enumerate() {
        let alone = generate(engine.model.as_mut(), &prompts[i], &options, &hooks[i], |_| true).await.unwrap();
        assert_eq!(alone.ids, b.ids, "sequence {i}");
    }
}

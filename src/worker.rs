//! The Web Worker that hosts the engine, so that downloading, parsing and running a model never blocks the page.
//!
//! Messages in: `{ request: { id, body: Request }, file?: File }` (the file for `LoadFile`); messages out:
//! `{ id, body: Response }`; both are plain JS objects (serde-wasm-bindgen). Downloads go through the browser's
//! Cache API, so a model is fetched once and read from disk on later visits; an entry that turns out damaged is
//! deleted. The model runs on WebGPU when the browser has it and falls back to the CPU (WebAssembly) otherwise.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use gloo::timers::future::TimeoutFuture;
use js_sys::{Array, Reflect, Uint8Array};
use saif::{Activation, Sae};
use saif_engine::gpu::Gpu;
use saif_engine::{
    ChatTemplate, Engine, EngineError, GenerateOptions, Hooks, LoadOptions, LoadStep, LogitsWanted, Positions, Segment,
    Tokenizer,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    Blob, Cache, DedicatedWorkerGlobalScope, File, MessageEvent, ReadableStreamDefaultReader, Response as WebResponse,
};

use crate::protocol::{
    BackendChoice, Envelope, GenerateRequest, GenerationSummary, LatentList, LatentView, ModelSummary, Progress,
    Request, Response, SaeSummary, Stage, TokenList, TokenView,
};

const CACHE_NAME: &str = "saif-models-v1";

/// The context a model is loaded with in the browser (GPU memory for the KV cache is allocated up front).
const BROWSER_CONTEXT: usize = 4096;

thread_local! {
    /// The loaded model; `None` while a generation or benchmark has it (or before the first load).
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
    /// The loaded model's tokenizer and chat template, usable while the model is busy.
    static TOKENIZER: RefCell<Option<(Arc<Tokenizer>, ChatTemplate)>> = const { RefCell::new(None) };
    /// The WebGPU device, opened once and reused by later loads.
    static GPU: RefCell<Option<Rc<Gpu>>> = const { RefCell::new(None) };
    /// Set by a Stop request; the generation loop checks it between tokens.
    static STOP: Cell<bool> = const { Cell::new(false) };
    /// The SAE for the loaded model: the SAE, its layer, and each latent's logit-lens tokens.
    static SAE: RefCell<Option<Rc<LoadedSae>>> = const { RefCell::new(None) };
}

/// An SAE the page found for its model.
struct LoadedSae {
    sae: Sae,
    layer: usize,
    lens: Vec<Vec<String>>,
    summary: SaeSummary,
}

fn scope() -> DedicatedWorkerGlobalScope {
    js_sys::global().unchecked_into()
}

fn post(id: u32, body: Response) {
    match serde_wasm_bindgen::to_value(&Envelope { id, body }) {
        Ok(message) => {
            let _ = scope().post_message(&message);
        }
        Err(e) => gloo::console::error!(format!("could not send a response: {e}")),
    }
}

/// A failure of a request: its message, and whether it was the GPU that failed (the page then offers the CPU).
struct Failure {
    message: String,
    gpu_lost: bool,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self { message, gpu_lost: false }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        Self { gpu_lost: matches!(e, EngineError::GpuLost(_)), message: e.to_string() }
    }
}

/// Reports progress at most every 1% (or every step when there is no total), so messages never flood the page.
struct Reporter {
    id: u32,
    stage: Stage,
    last_percent: i64,
}

impl Reporter {
    fn new(id: u32, stage: Stage) -> Self {
        Self { id, stage, last_percent: -1 }
    }

    fn report(&mut self, done: u64, total: Option<u64>) {
        let percent = total.filter(|&t| t > 0).map_or(done as i64, |t| (done * 100 / t) as i64);
        if percent != self.last_percent {
            self.last_percent = percent;
            post(self.id, Response::Progress(Progress { stage: self.stage, done, total }));
        }
    }
}

/// Entry point of the worker binary.
pub fn start() {
    console_error_panic_hook::set_once();
    let onmessage = Closure::<dyn FnMut(MessageEvent)>::new(|event: MessageEvent| {
        let data = event.data();
        let request = Reflect::get(&data, &"request".into()).unwrap_or(JsValue::UNDEFINED);
        let file = Reflect::get(&data, &"file".into()).ok().and_then(|v| v.dyn_into::<File>().ok());
        match serde_wasm_bindgen::from_value::<Envelope<Request>>(request) {
            // Stop must act at once, even while a generation holds the model.
            Ok(Envelope { body: Request::Stop, .. }) => STOP.with(|s| s.set(true)),
            Ok(Envelope { id, body }) => wasm_bindgen_futures::spawn_local(async move {
                if let Err(Failure { message, gpu_lost }) = handle(id, body, file).await {
                    post(id, Response::Error { message, gpu_lost });
                }
            }),
            Err(e) => post(
                0,
                Response::Error { message: format!("the worker could not read a request: {e}"), gpu_lost: false },
            ),
        }
    });
    scope().set_onmessage(Some(onmessage.as_ref().unchecked_ref()));
    onmessage.forget();
    post(0, Response::Ready);
}

async fn handle(id: u32, request: Request, file: Option<File>) -> Result<(), Failure> {
    match request {
        Request::LoadUrl { url, name, backend } => {
            let (bytes, from_cache) = download(id, &url).await?;
            match load(id, &name, bytes, from_cache, backend).await {
                Ok(summary) => post(id, Response::Loaded(summary)),
                Err(failure) if from_cache && !failure.gpu_lost => {
                    // A damaged cache entry would fail every visit: drop it so the next try downloads afresh.
                    let _ = delete_cached(&url).await;
                    return Err(format!(
                        "{} (the cached copy was removed; loading again downloads it anew)",
                        failure.message
                    )
                    .into());
                }
                Err(failure) => return Err(failure),
            }
        }
        Request::LoadFile { name, backend } => {
            let file = file.ok_or("no file came with the request")?;
            let bytes = read_blob(id, &file, Stage::ReadingFile).await?;
            post(id, Response::Loaded(load(id, &name, bytes, false, backend).await?));
        }
        Request::Tokenize { text, add_bos, chat } => {
            let (tokenizer, template) = TOKENIZER.with(|t| t.borrow().clone()).ok_or("load a model first")?;
            let text = if chat { template.render(&text, None) } else { text };
            post(id, Response::Tokens(tokenize(&tokenizer, &text, add_bos)?));
        }
        Request::Generate(request) => {
            let mut engine = take_engine()?;
            let result = generate(id, &mut engine, request).await;
            ENGINE.with(|e| *e.borrow_mut() = Some(engine));
            post(id, Response::Generated(result?));
        }
        Request::Bench(settings) => {
            let mut engine = take_engine()?;
            let now = || now_ms();
            let result = saif_engine::bench::run(&mut engine, &settings, &now).await;
            ENGINE.with(|e| *e.borrow_mut() = Some(engine));
            post(id, Response::Benchmarked(result?));
        }
        Request::Latents { text, chat, top, layer } => {
            let mut sae = SAE.with(|s| s.borrow().clone()).ok_or("no SAE is loaded for this model")?;
            if let Some(layer) = layer.filter(|&l| l != sae.layer) {
                let c = ENGINE.with(|e| e.borrow().as_ref().map(|e| e.config().clone())).ok_or("no model is loaded")?;
                let loaded = shipped_sae(id, &c.key, Some(layer))
                    .await?
                    .ok_or_else(|| format!("no SAE is shipped for {} at layer {layer}", c.key))?;
                loaded.sae.check_fits(c.hidden, c.n_layers, loaded.layer).map_err(|e| e.to_string())?;
                sae = Rc::new(loaded);
                SAE.with(|s| *s.borrow_mut() = Some(sae.clone()));
            }
            let mut engine = take_engine()?;
            let result = latents(&mut engine, &sae, &text, chat, top).await;
            ENGINE.with(|e| *e.borrow_mut() = Some(engine));
            post(id, Response::Latents(result?));
        }
        Request::Stop => STOP.with(|s| s.set(true)),
        Request::ClearCache => {
            let caches = scope().caches().map_err(js_error)?;
            let cache: Cache = JsFuture::from(caches.open(CACHE_NAME)).await.map_err(js_error)?.unchecked_into();
            let keys: Array = JsFuture::from(cache.keys()).await.map_err(js_error)?.unchecked_into();
            let entries = keys.length();
            JsFuture::from(caches.delete(CACHE_NAME)).await.map_err(js_error)?;
            post(id, Response::CacheCleared { entries });
        }
    }
    Ok(())
}

/// Takes the model out for a long task (generation, benchmark); it goes back when the task ends.
fn take_engine() -> Result<Engine, Failure> {
    ENGINE.with(|e| e.borrow_mut().take()).ok_or_else(|| {
        let loaded = TOKENIZER.with(|t| t.borrow().is_some());
        Failure::from(if loaded {
            "the model is busy with another request; wait or stop it"
        } else {
            "load a model first"
        })
    })
}

fn tokenize(tokenizer: &Tokenizer, text: &str, add_bos: bool) -> Result<TokenList, EngineError> {
    let ids = if add_bos { tokenizer.encode_prompt(text)? } else { tokenizer.encode(text)? };
    let tokens = ids
        .iter()
        .map(|&id| {
            let shown = tokenizer.decode(&[id]).unwrap_or_default();
            let raw = tokenizer.token_text(id).unwrap_or_default();
            let special = shown.is_empty() && !raw.is_empty();
            let text = if shown.is_empty() || shown.contains('\u{fffd}') { raw } else { shown };
            TokenView { id, text, special }
        })
        .collect();
    Ok(TokenList { tokens })
}

async fn generate(id: u32, engine: &mut Engine, request: GenerateRequest) -> Result<GenerationSummary, Failure> {
    let text = if request.chat { engine.chat.render(&request.prompt, None) } else { request.prompt.clone() };
    let prompt = engine.tokenizer.encode_prompt(&text)?;
    let stop_tokens = if request.chat { engine.chat_stop_tokens() } else { engine.stop_tokens() };
    let options = GenerateOptions { max_new_tokens: request.max_new_tokens, sampling: request.sampling, stop_tokens };
    let tokenizer = engine.tokenizer.clone();
    let ids = RefCell::new(Vec::new());
    let times = RefCell::new(Vec::new());
    STOP.with(|s| s.set(false));
    let started = now_ms();
    let generation = saif_engine::generate_async(engine.model.as_mut(), &prompt, &options, &Hooks::none(), |token| {
        times.borrow_mut().push(now_ms());
        ids.borrow_mut().push(token);
        let text = tokenizer.decode(&ids.borrow()).unwrap_or_default();
        post(id, Response::Text { text, tokens: ids.borrow().len() });
        async {
            // Let a Stop request (or a tokenization) in between tokens.
            TimeoutFuture::new(0).await;
            !STOP.with(|s| s.get())
        }
    })
    .await?;
    let times = times.into_inner();
    let first = times.first().copied().unwrap_or(started);
    let decode_tokens_per_s = match (times.len(), times.last()) {
        (n, Some(&last)) if n > 1 && last > first => (n - 1) as f64 / ((last - first) / 1000.0),
        _ => 0.0,
    };
    Ok(GenerationSummary {
        text: engine.tokenizer.decode(&generation.ids)?,
        ids: generation.ids,
        prompt_tokens: prompt.len(),
        stop: serde_json::to_value(generation.stop).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        time_to_first_token_ms: first - started,
        decode_tokens_per_s,
    })
}

/// The latents most active at the last token of the prompt.
async fn latents(
    engine: &mut Engine,
    sae: &LoadedSae,
    text: &str,
    chat: bool,
    top: usize,
) -> Result<LatentList, Failure> {
    let text = if chat { engine.chat.render(text, None) } else { text.to_string() };
    let ids = engine.tokenizer.encode_prompt(&text)?;
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    engine.model.reset();
    let hooks = Hooks::none().read(sae.layer, Positions::Last);
    let out = engine.model.forward(&ids, Segment::Prompt, &hooks, LogitsWanted::Last).await?;
    let values = &out.captures.first().ok_or("the model returned no activation")?.values;
    let latents = sae
        .sae
        .encode_sparse(values)
        .into_iter()
        .take(top)
        .map(|(index, activation)| LatentView {
            index,
            activation,
            tokens: sae.lens.get(index as usize).cloned().unwrap_or_default(),
        })
        .collect();
    let token = engine.tokenizer.decode(&ids[ids.len() - 1..]).unwrap_or_default();
    Ok(LatentList { sae: sae.summary.clone(), token, latents })
}

/// The SAE shipped with the page for `key` at `layer` (default: its last layer), from `saes/index.json`; `None` when
/// there is none.
async fn shipped_sae(id: u32, key: &str, layer: Option<usize>) -> Result<Option<LoadedSae>, Failure> {
    let Ok((index, _)) = download(id, "saes/index.json").await else { return Ok(None) };
    let index: serde_json::Value = serde_json::from_slice(&index).map_err(|e| format!("saes/index.json: {e}"))?;
    let Some(layers) = index.pointer(&format!("/{key}/layers")).and_then(|l| l.as_array()) else { return Ok(None) };
    let layers: Vec<usize> = layers
        .iter()
        .map(|l| l.as_u64().map(|l| l as usize))
        .collect::<Option<_>>()
        .ok_or("saes/index.json: a layer is not a number")?;
    let Some(layer) = layer.or(layers.last().copied()).filter(|l| layers.contains(l)) else { return Ok(None) };
    let folder = format!("saes/{key}/layer_{layer}");
    let (config, _) = download(id, &format!("{folder}/config.json")).await?;
    let (params, _) = download(id, &format!("{folder}/params.safetensors")).await?;
    let sae = Sae::from_gemma_scope(&params, &config).map_err(|e| format!("{folder}: {e}"))?;
    let lens = match download(id, &format!("{folder}/lens.json")).await {
        Ok((bytes, _)) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| serde_json::from_value::<Vec<Vec<String>>>(v["top_tokens"].clone()).ok())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let activation = match sae.info.activation {
        Activation::TopK { k } => format!("TopK (k = {k})"),
        Activation::JumpRelu => "JumpReLU".into(),
        Activation::Relu => "ReLU".into(),
    };
    let source = format!("shipped with the page: {folder}");
    let summary = SaeSummary { layer, width: sae.info.d_sae, activation, source, shipped_layers: layers };
    Ok(Some(LoadedSae { sae, layer, lens, summary }))
}

/// The WebGPU device, opened on first use (and again after a failure).
async fn gpu() -> Result<Rc<Gpu>, EngineError> {
    if let Some(gpu) = GPU.with(|g| g.borrow().clone()).filter(|g| g.check().is_ok()) {
        return Ok(gpu);
    }
    let gpu = Rc::new(Gpu::new().await?);
    GPU.with(|g| *g.borrow_mut() = Some(gpu.clone()));
    Ok(gpu)
}

async fn load(
    id: u32,
    name: &str,
    bytes: Vec<u8>,
    from_cache: bool,
    backend: BackendChoice,
) -> Result<ModelSummary, Failure> {
    let started = now_ms();
    // Drop the previous model first: two models at once may not fit in the tab's memory.
    ENGINE.with(|e| e.borrow_mut().take());
    TOKENIZER.with(|t| t.borrow_mut().take());
    let options = LoadOptions { max_context: Some(BROWSER_CONTEXT) };
    let mut weights = Reporter::new(id, Stage::LoadingWeights);
    let mut progress = |step: LoadStep| match step {
        LoadStep::Header => post(id, Response::Progress(Progress { stage: Stage::Parsing, done: 0, total: None })),
        LoadStep::Tokenizer => {
            post(id, Response::Progress(Progress { stage: Stage::BuildingTokenizer, done: 0, total: None }))
        }
        LoadStep::Weights { done, total } => weights.report(done as u64, Some(total as u64)),
    };
    let cursor = || std::io::Cursor::new(bytes.as_slice());
    let on_cpu = |progress: &mut dyn FnMut(LoadStep)| Engine::load_cpu_with_progress(&mut cursor(), &options, progress);
    let (engine, note) = match backend {
        BackendChoice::Cpu => (on_cpu(&mut progress)?, None),
        BackendChoice::Webgpu => {
            let gpu = gpu().await?;
            (Engine::load_wgpu_with_progress(&mut cursor(), &options, gpu, &mut progress)?, None)
        }
        BackendChoice::Auto => match gpu().await {
            // A WebGPU that is itself a CPU program (SwiftShader) is many times slower than the engine's own CPU
            // path (docs/benchmarks.md): take the CPU path, and say so.
            Ok(gpu) if gpu.runs_on_cpu() => {
                let note = format!(
                    "WebGPU here runs on the CPU ({}), slower than this page's own CPU engine: the model runs on the \
                     CPU. Choose \"WebGPU only\" to use it anyway.",
                    gpu.describe()
                );
                (on_cpu(&mut progress)?, Some(note))
            }
            Ok(gpu) => match Engine::load_wgpu_with_progress(&mut cursor(), &options, gpu, &mut progress) {
                Ok(engine) => (engine, None),
                Err(e @ (EngineError::Gpu(_) | EngineError::GpuLost(_))) => {
                    GPU.with(|g| g.borrow_mut().take());
                    let note =
                        format!("WebGPU could not hold the model ({e}); it runs on the CPU instead, more slowly.");
                    (on_cpu(&mut progress)?, Some(note))
                }
                Err(e) => return Err(e.into()),
            },
            Err(e) => {
                let note = format!("This browser offers no WebGPU ({e}); the model runs on the CPU, more slowly.");
                (on_cpu(&mut progress)?, Some(note))
            }
        },
    };
    drop(bytes);
    let c = engine.config().clone();
    SAE.with(|s| s.borrow_mut().take());
    // The model is usable without its SAE: a failure here becomes a notice, not an error.
    let (mut sae_summary, mut sae_note) = (None, None);
    match shipped_sae(id, &c.key, None).await {
        Ok(Some(loaded)) => match loaded.sae.check_fits(c.hidden, c.n_layers, loaded.layer) {
            Ok(()) => {
                sae_summary = Some(loaded.summary.clone());
                SAE.with(|s| *s.borrow_mut() = Some(Rc::new(loaded)));
            }
            Err(e) => {
                sae_note = Some(format!("The SAE shipped for {} does not fit this model ({e}); no latents.", c.key))
            }
        },
        Ok(None) => {}
        Err(failure) => {
            sae_note =
                Some(format!("The SAE shipped for this model could not be loaded ({}); no latents.", failure.message))
        }
    }
    let summary = ModelSummary {
        name: if c.name.is_empty() { name.to_string() } else { c.name.clone() },
        architecture: c.architecture.gguf_name().to_string(),
        layers: c.n_layers,
        hidden: c.hidden,
        heads: c.n_heads,
        kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        ffn_hidden: c.ffn_hidden,
        vocab_size: c.vocab_size,
        context_length: c.context_length,
        tokenizer: format!("{:?}", engine.tokenizer.kind()),
        backend: engine.model.backend_name(),
        backend_note: note,
        sae_note,
        bos: engine.tokenizer.bos(),
        eos: engine.tokenizer.eos(),
        adds_bos: engine.tokenizer.adds_bos(),
        file_bytes: engine.file_bytes,
        from_cache,
        load_ms: now_ms() - started,
        metadata: engine.metadata.clone(),
        tensor_types: engine.tensor_types.clone(),
        sae: sae_summary,
    };
    TOKENIZER.with(|t| *t.borrow_mut() = Some((engine.tokenizer.clone(), engine.chat.clone())));
    ENGINE.with(|e| *e.borrow_mut() = Some(engine));
    Ok(summary)
}

/// Fetches `url` through the Cache API, reporting progress. Returns the bytes and whether they came from the cache.
async fn download(id: u32, url: &str) -> Result<(Vec<u8>, bool), Failure> {
    let scope = scope();
    let cache: Option<Cache> = match scope.caches() {
        Ok(caches) => JsFuture::from(caches.open(CACHE_NAME)).await.ok().map(|c| c.unchecked_into()),
        Err(_) => None, // e.g. a page not served over https or localhost: no cache, still works
    };
    if let Some(cache) = &cache {
        let hit = JsFuture::from(cache.match_with_str(url)).await.map_err(js_error)?;
        if let Ok(response) = hit.dyn_into::<WebResponse>() {
            let bytes = read_response(id, &response, Stage::ReadingCache).await?;
            return Ok((bytes, true));
        }
    }
    let response: WebResponse = JsFuture::from(scope.fetch_with_str(url))
        .await
        .map_err(|e| {
            format!("could not download {url}: {} (offline, or the server refuses cross-origin requests?)", js_text(&e))
        })?
        .unchecked_into();
    if !response.ok() {
        return Err(format!("downloading {url} failed: HTTP {} {}", response.status(), response.status_text()).into());
    }
    let total = content_length(&response);
    let (bytes, chunks) = read_stream(id, &response, Stage::Downloading, total).await?;
    if let Some(total) = total {
        if bytes.len() as u64 != total {
            return Err(
                format!("the download of {url} stopped after {} of {total} bytes; try again", bytes.len()).into()
            );
        }
    }
    if let Some(cache) = &cache {
        // Cache what was downloaded, from the chunks the stream gave (no second copy in wasm memory).
        let blob = Blob::new_with_u8_array_sequence(&chunks).map_err(js_error)?;
        let cached = WebResponse::new_with_opt_blob(Some(&blob)).map_err(js_error)?;
        if let Err(e) = JsFuture::from(cache.put_with_str(url, &cached)).await {
            gloo::console::warn!(format!("could not cache {url}: {}", js_text(&e)));
        }
    }
    Ok((bytes, false))
}

async fn delete_cached(url: &str) -> Result<(), JsValue> {
    let caches = scope().caches()?;
    let cache: Cache = JsFuture::from(caches.open(CACHE_NAME)).await?.unchecked_into();
    JsFuture::from(cache.delete_with_str(url)).await?;
    Ok(())
}

fn content_length(response: &WebResponse) -> Option<u64> {
    response.headers().get("content-length").ok().flatten().and_then(|v| v.parse().ok())
}

async fn read_response(id: u32, response: &WebResponse, stage: Stage) -> Result<Vec<u8>, String> {
    let total = content_length(response);
    read_stream(id, response, stage, total).await.map(|(bytes, _)| bytes)
}

async fn read_blob(id: u32, blob: &Blob, stage: Stage) -> Result<Vec<u8>, String> {
    let response = WebResponse::new_with_opt_blob(Some(blob)).map_err(js_error)?;
    let total = Some(blob.size() as u64);
    read_stream(id, &response, stage, total).await.map(|(bytes, _)| bytes)
}

/// Reads a response body chunk by chunk into memory, reporting progress; also returns the chunks as JS arrays.
async fn read_stream(
    id: u32,
    response: &WebResponse,
    stage: Stage,
    total: Option<u64>,
) -> Result<(Vec<u8>, Array), String> {
    let body = response.body().ok_or("the response has no body")?;
    let reader: ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let mut bytes = Vec::with_capacity(total.unwrap_or(0) as usize);
    let chunks = Array::new();
    let mut reporter = Reporter::new(id, stage);
    reporter.report(0, total);
    loop {
        let result = JsFuture::from(reader.read()).await.map_err(|e| format!("reading failed: {}", js_text(&e)))?;
        if Reflect::get(&result, &"done".into()).map_err(js_error)?.as_bool().unwrap_or(true) {
            break;
        }
        let chunk: Uint8Array = Reflect::get(&result, &"value".into()).map_err(js_error)?.unchecked_into();
        let start = bytes.len();
        bytes.resize(start + chunk.length() as usize, 0);
        chunk.copy_to(&mut bytes[start..]);
        chunks.push(&chunk);
        reporter.report(bytes.len() as u64, total);
    }
    Ok((bytes, chunks))
}

fn now_ms() -> f64 {
    scope().performance().map(|p| p.now()).unwrap_or_else(|| js_sys::Date::now())
}

fn js_text(value: &JsValue) -> String {
    value
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| value.as_string())
        .unwrap_or_else(|| format!("{value:?}"))
}

fn js_error(value: JsValue) -> String {
    js_text(&value)
}

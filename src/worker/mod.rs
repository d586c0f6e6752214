//! The Web Worker that hosts the engine, so that downloading, parsing and running a model never blocks the page.
//!
//! Messages in: `{ request: { id, body: Request }, file?: File, files?: File[] }`; messages out: `{ id, body:
//! Response }` (plain JS objects through serde-wasm-bindgen). One `WorkerState` holds everything the worker
//! knows; `handle` only dispatches. Long tasks take the engine out of the state (`Engine` is not shared) and always
//! put it back; between steps they yield, so that a Stop request gets in.
//!
//! `download` (the Cache API with integrity checks), `saes` (where SAEs come from), `latents` (readings, search,
//! lens), `generation` (default and steered outputs) and `experiments` (SAIF's discovery and evaluation) do the
//! work.

mod download;
mod experiments;
mod generation;
mod latents;
mod saes;
pub mod threads;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::Reflect;
use saif::lens::LogitLens;
use saif_engine::gpu::Gpu;
use saif_engine::{ChatTemplate, Engine, EngineError, LoadOptions, LoadStep, LocalBoxFuture, Tokenizer};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{DedicatedWorkerGlobalScope, File, MessageEvent};

use crate::protocol::{
    BackendChoice, Envelope, Expected, ModelSummary, Progress, Request, Response, SaeSource, Stage, TokenList,
    TokenView,
};
use saes::LoadedSae;

/// The context a model is loaded with in the browser (GPU memory for the KV cache is allocated up front).
const BROWSER_CONTEXT: usize = 4096;

/// Everything the worker holds between requests.
#[derive(Default)]
struct WorkerState {
    /// The loaded model; `None` while a long task has it (or before the first load).
    engine: Option<Engine>,
    /// The loaded model's tokenizer and chat template, usable while the model is busy.
    tokenizer: Option<(Arc<Tokenizer>, ChatTemplate)>,
    /// The loaded model's SAE key and shape, and the SAEs the page ships for it.
    model: Option<ModelFacts>,
    /// The WebGPU device, opened once and reused by later loads.
    gpu: Option<Rc<Gpu>>,
    /// The SAE in use.
    sae: Option<Rc<LoadedSae>>,
    /// The model's logit lens (final norm and unembedding).
    lens: Option<Rc<LogitLens>>,
    /// Each vocabulary entry's text, lowercased and trimmed, made on the first search.
    vocabulary: Option<Rc<Vec<String>>>,
    /// The last discovery, reused by an evaluation of the same settings.
    discovery: Option<Rc<experiments::Held>>,
}

#[derive(Clone)]
struct ModelFacts {
    key: String,
    hidden: usize,
    shipped: saes::Shipped,
}

thread_local! {
    static STATE: RefCell<WorkerState> = RefCell::new(WorkerState::default());
    /// Set by a Stop request; long tasks check it between steps.
    static STOP: Cell<bool> = const { Cell::new(false) };
    /// How many times a model was loaded (or forgotten): a request that waited for the model checks it.
    static MODELS_LOADED: Cell<u64> = const { Cell::new(0) };
}

fn scope() -> DedicatedWorkerGlobalScope {
    js_sys::global().unchecked_into()
}

/// Sends a response; one that cannot be encoded becomes an error for its request (the page never waits forever).
fn post(id: u32, body: Response) {
    let message = serde_wasm_bindgen::to_value(&Envelope { id, body }).or_else(|e| {
        let body = Response::Error { message: format!("the worker could not send its answer: {e}"), gpu_lost: false };
        serde_wasm_bindgen::to_value(&Envelope { id, body })
    });
    match message {
        Ok(message) => {
            let _ = scope().post_message(&message);
        }
        Err(e) => gloo::console::error!(format!("could not send a response: {e}")),
    }
}

/// A failure of a request: its message, and whether it was the GPU that failed (the page then offers the CPU).
pub struct Failure {
    pub message: String,
    pub gpu_lost: bool,
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

/// Reports a load's progress at most every 1% (or every step when there is no total).
pub struct Reporter {
    id: u32,
    stage: Stage,
    last_percent: i64,
}

impl Reporter {
    pub fn new(id: u32, stage: Stage) -> Self {
        Self { id, stage, last_percent: -1 }
    }

    pub fn report(&mut self, done: u64, total: Option<u64>) {
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
    #[cfg(feature = "threads")]
    wasm_bindgen_futures::spawn_local(async {
        if let Some(text) = threads::start_pool().await {
            post(0, Response::Notice { text });
        }
    });
    listen();
}

/// Takes requests from the page, and tells it so.
fn listen() {
    let onmessage = Closure::<dyn FnMut(MessageEvent)>::new(|event: MessageEvent| {
        let data = event.data();
        let request = Reflect::get(&data, &"request".into()).unwrap_or(JsValue::UNDEFINED);
        let mut files: Vec<File> = Vec::new();
        if let Ok(file) = Reflect::get(&data, &"file".into()).and_then(|v| v.dyn_into::<File>()) {
            files.push(file);
        }
        if let Ok(list) = Reflect::get(&data, &"files".into()).and_then(|v| v.dyn_into::<js_sys::Array>()) {
            files.extend(list.iter().filter_map(|f| f.dyn_into::<File>().ok()));
        }
        match serde_wasm_bindgen::from_value::<Envelope<Request>>(request) {
            // Stop must act at once, even while a task holds the model.
            Ok(Envelope { body: Request::Stop, .. }) => STOP.with(|s| s.set(true)),
            Ok(Envelope { id, body }) => wasm_bindgen_futures::spawn_local(async move {
                match handle(id, body, files).await {
                    Ok(response) => post(id, response),
                    Err(Failure { message, gpu_lost }) => post(id, Response::Error { message, gpu_lost }),
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

/// Dispatches one request; returns its final response.
async fn handle(id: u32, request: Request, files: Vec<File>) -> Result<Response, Failure> {
    // A load reads its bytes while the CPU threads start, and waits for them after (`load`).
    if !matches!(request, Request::LoadUrl { .. } | Request::LoadFile { .. }) {
        threads::ready().await;
    }
    match request {
        Request::LoadUrl { url, name, backend, expected } => load_url(id, &url, &name, backend, &expected).await,
        Request::LoadFile { name, backend } => {
            let file = files.first().ok_or("no file came with the request")?;
            let started = now_ms();
            let bytes = download::read_blob(id, file, Stage::ReadingFile).await?;
            let read = vec![(Stage::ReadingFile, now_ms() - started)];
            Ok(Response::Loaded(load(id, &name, bytes, false, backend, read).await?))
        }
        Request::Tokenize { text, add_bos, chat } => {
            let (tokenizer, template) = STATE.with(|s| s.borrow().tokenizer.clone()).ok_or("load a model first")?;
            let text = if chat { template.render(&text, None) } else { text };
            Ok(Response::Tokens(TokenList { tokens: token_views(&tokenizer, &text, add_bos)? }))
        }
        Request::Generate(request) => {
            let sae = current_sae().ok();
            with_engine(|engine| Box::pin(generation::generate(id, engine, request, sae)))
                .await
                .map(Response::Generated)
        }
        Request::Bench(settings) => with_engine(|engine| {
            Box::pin(async move { Ok(saif_engine::bench::run(engine, &settings, &now_ms).await?) })
        })
        .await
        .map(Response::Benchmarked),
        Request::UseSae { source, any_model } => use_sae(id, source, any_model, &files).await,
        Request::ReadLatents { text, chat, top } => {
            let (sae, lens) = (current_sae()?, current_lens());
            with_engine(|engine| Box::pin(latents::read(engine, sae, lens, text, chat, top)))
                .await
                .map(Response::Latents)
        }
        Request::SearchLatents { query, top } => latents::search(&query, top).map(Response::Found),
        Request::Lens { latent } => {
            let sae = current_sae()?;
            Ok(Response::Lens { latent, tokens: latents::lens_tokens(&sae, current_lens(), latent)? })
        }
        Request::SteeringVector(spec) => {
            let sae = current_sae()?;
            let latents: Vec<(usize, f32)> = spec.latents.iter().map(|&(j, v)| (j as usize, v)).collect();
            let values = saif::steer::latent_vector(&sae.sae, &latents, spec.multiplier)?;
            Ok(Response::Vector { layer: sae.layer, values })
        }
        Request::Discover(request) => {
            let sae = current_sae()?;
            STOP.with(|s| s.set(false));
            with_engine(|engine| Box::pin(experiments::discover(id, engine, sae, request)))
                .await
                .map(Response::Discovered)
        }
        Request::Evaluate(request) => {
            let sae = current_sae()?;
            STOP.with(|s| s.set(false));
            with_engine(|engine| Box::pin(experiments::evaluate(id, engine, sae, request)))
                .await
                .map(Response::Evaluated)
        }
        // Acted on as it arrives (see `start`), never dispatched.
        Request::Stop => Err("a stop request is acted on as it arrives".into()),
        Request::LoseGpu => {
            let gpu = STATE.with(|s| s.borrow().gpu.clone()).ok_or("no WebGPU device is open")?;
            gpu.device.destroy();
            Ok(Response::Done)
        }
        Request::ListCache => Ok(Response::Cache { files: download::list().await? }),
        Request::DeleteCached { url } => {
            download::delete(&url).await?;
            Ok(Response::Cache { files: download::list().await? })
        }
        Request::ClearCache => Ok(Response::CacheCleared { entries: download::clear().await? }),
    }
}

/// Runs `task` with the model taken out of the state, and puts the model back whatever the task's outcome. While
/// another task has the model, this one waits its turn (the shipped SAE is put in use while the visitor may
/// already be generating); if another model is loaded meanwhile, it gives up.
async fn with_engine<T>(
    task: impl for<'a> FnOnce(&'a mut Engine) -> LocalBoxFuture<'a, Result<T, Failure>>,
) -> Result<T, Failure> {
    let model = MODELS_LOADED.with(|n| n.get());
    let mut engine = loop {
        if MODELS_LOADED.with(|n| n.get()) != model {
            return Err("another model was loaded meanwhile".into());
        }
        let (engine, loaded) = STATE.with(|s| {
            let mut s = s.borrow_mut();
            (s.engine.take(), s.tokenizer.is_some())
        });
        match engine {
            Some(engine) => break engine,
            None if !loaded => return Err("load a model first".into()),
            None => gloo::timers::future::TimeoutFuture::new(10).await,
        }
    };
    let result = task(&mut engine).await;
    STATE.with(|s| s.borrow_mut().engine = Some(engine));
    result
}

fn current_sae() -> Result<Rc<LoadedSae>, Failure> {
    STATE.with(|s| s.borrow().sae.clone()).ok_or_else(|| Failure::from("no SAE is in use for this model"))
}

fn current_lens() -> Option<Rc<LogitLens>> {
    STATE.with(|s| s.borrow().lens.clone())
}

/// The progress callback of a long task: reports as request `id`, lets other messages in, and says whether to go
/// on (false once Stop has arrived).
fn working(id: u32) -> impl FnMut(saif::progress::Progress) -> std::pin::Pin<Box<dyn Future<Output = bool>>> {
    let mut last = 0.0;
    move |p: saif::progress::Progress| {
        let now = now_ms();
        // At most every 100 ms, and at the end of each phase.
        if now - last > 100.0 || p.done >= p.total {
            last = now;
            post(id, Response::Working { phase: p.phase, done: p.done, total: p.total });
        }
        Box::pin(async {
            yield_to_messages().await;
            !STOP.with(|s| s.get())
        })
    }
}

fn token_views(tokenizer: &Tokenizer, text: &str, add_bos: bool) -> Result<Vec<TokenView>, EngineError> {
    let ids = if add_bos { tokenizer.encode_prompt(text)? } else { tokenizer.encode(text)? };
    Ok(ids.iter().map(|&id| token_view(tokenizer, id)).collect())
}

fn token_view(tokenizer: &Tokenizer, id: u32) -> TokenView {
    let shown = tokenizer.decode(&[id]).unwrap_or_default();
    let raw = tokenizer.token_text(id).unwrap_or_default();
    let special = shown.is_empty() && !raw.is_empty();
    let text = if shown.is_empty() || shown.contains('\u{fffd}') { raw } else { shown };
    TokenView { id, text, special }
}

async fn load_url(
    id: u32,
    url: &str,
    name: &str,
    backend: BackendChoice,
    expected: &Expected,
) -> Result<Response, Failure> {
    let started = now_ms();
    let (fetched, check) = download::fetch_then_check(id, url, expected).await?;
    let from_cache = fetched.from_cache;
    let read = vec![(if from_cache { Stage::ReadingCache } else { Stage::Downloading }, now_ms() - started)];
    let mut loaded = load(id, name, fetched.bytes, from_cache, backend, read).await;
    if let Some(check) = check {
        post(id, Response::Progress(Progress { stage: Stage::CheckingCache, done: 0, total: None }));
        let waited = now_ms();
        let outcome = check.outcome().await;
        if let Ok(summary) = &mut loaded {
            summary.load_steps.push((Stage::CheckingCache, now_ms() - waited));
        }
        if let Err(damaged) = outcome {
            // What was loaded came from a damaged copy: drop it, and load a fresh download instead.
            forget_model();
            drop(loaded);
            damaged.tell(id);
            let started = now_ms();
            let fetched = download::download(id, url, expected).await?;
            let read = vec![(Stage::Downloading, now_ms() - started)];
            return Ok(Response::Loaded(load(id, name, fetched.bytes, false, backend, read).await?));
        }
    }
    match loaded {
        Ok(summary) => Ok(Response::Loaded(summary)),
        Err(failure) if from_cache && !failure.gpu_lost => {
            // The cached copy passed its checksum but does not load: drop it so the next try downloads afresh.
            let _ = download::delete(url).await;
            Err(format!("{} (the cached copy was removed; loading again downloads it anew)", failure.message).into())
        }
        Err(failure) => Err(failure),
    }
}

/// Uses another SAE for the loaded model: `SaeLoaded`, or `SaeForAnotherModel` when it records another model and
/// `any_model` is not set (the page then asks the visitor).
async fn use_sae(id: u32, source: SaeSource, any_model: bool, files: &[File]) -> Result<Response, Failure> {
    let facts = STATE.with(|s| s.borrow().model.clone()).ok_or("load a model first")?;
    let model = MODELS_LOADED.with(|n| n.get());
    let (sae, lens, layer, label) = match source {
        SaeSource::Shipped { layer } => {
            if !facts.shipped.layers.contains(&layer) {
                return Err(format!("no SAE is shipped for {} at layer {layer}", facts.key).into());
            }
            let (sae, lens, label) = saes::shipped(id, &facts.key, &facts.shipped, layer).await?;
            (sae, lens, Some(layer), label)
        }
        SaeSource::Folder { url, layer, label } => (saes::folder_sae(id, &url).await?, None, Some(layer), label),
        SaeSource::Files { layer, label } => {
            let (sae, lens) = saes::files_sae(id, files).await?;
            (sae, lens, layer, label)
        }
    };
    // A Generate sent meanwhile goes first: attaching runs the model on a sentence (a quarter second in wasm).
    yield_to_messages().await;
    if MODELS_LOADED.with(|n| n.get()) != model {
        return Err("another model was loaded meanwhile".into());
    }
    if sae.info.d_in != facts.hidden {
        return Err(format!(
            "this SAE does not fit the model: it reads vectors of {} values but {}'s residual stream has {}",
            sae.info.d_in, facts.key, facts.hidden
        )
        .into());
    }
    let attached = with_engine(|engine| {
        Box::pin(async move { Ok(saes::attach(engine, sae, layer, lens, label, any_model).await) })
    })
    .await?;
    let loaded = match attached {
        Ok(loaded) => loaded,
        Err(saes::NotAttached::OtherModel(message)) => return Ok(Response::SaeForAnotherModel { message }),
        Err(saes::NotAttached::Failure(failure)) => return Err(failure),
    };
    let summary = loaded.summary.clone();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.sae = Some(Rc::new(loaded));
        s.discovery = None;
    });
    Ok(Response::SaeLoaded(summary))
}

/// The WebGPU device, opened on first use (and again after a failure).
async fn gpu() -> Result<Rc<Gpu>, EngineError> {
    if let Some(gpu) = STATE.with(|s| s.borrow().gpu.clone()).filter(|g| g.check().is_ok()) {
        return Ok(gpu);
    }
    let gpu = Rc::new(Gpu::new().await?);
    STATE.with(|s| s.borrow_mut().gpu = Some(gpu.clone()));
    Ok(gpu)
}

/// Forgets the model and everything made for it; the WebGPU device stays open.
fn forget_model() {
    MODELS_LOADED.with(|n| n.set(n.get() + 1));
    STATE.with(|s| {
        let gpu = s.borrow_mut().gpu.take();
        *s.borrow_mut() = WorkerState { gpu, ..WorkerState::default() };
    });
}

async fn load(
    id: u32,
    name: &str,
    bytes: Vec<u8>,
    from_cache: bool,
    backend: BackendChoice,
    mut load_steps: Vec<(Stage, f64)>,
) -> Result<ModelSummary, Failure> {
    threads::ready().await;
    let started = now_ms();
    // Drop the previous model first: two models at once may not fit in the tab's memory.
    forget_model();
    let int8_activations = backend == BackendChoice::CpuInt8;
    let options = LoadOptions { max_context: Some(BROWSER_CONTEXT), int8_activations, ..Default::default() };
    let mut weights = Reporter::new(id, Stage::LoadingWeights);
    // When each stage began, for `load_steps`.
    let mut began: Vec<(Stage, f64)> = Vec::new();
    let mut progress = |step: LoadStep| {
        let stage = match step {
            LoadStep::Header => Stage::Parsing,
            LoadStep::Tokenizer => Stage::BuildingTokenizer,
            LoadStep::Weights { .. } => Stage::LoadingWeights,
        };
        if began.last().map(|b| b.0) != Some(stage) {
            began.push((stage, now_ms()));
        }
        match step {
            LoadStep::Weights { done, total } => weights.report(done as u64, Some(total as u64)),
            _ => post(id, Response::Progress(Progress { stage, done: 0, total: None })),
        }
    };
    let cursor = || std::io::Cursor::new(bytes.as_slice());
    let on_cpu = |progress: &mut dyn FnMut(LoadStep)| Engine::load_cpu_with_progress(&mut cursor(), &options, progress);
    let (engine, note) = match backend {
        BackendChoice::Cpu | BackendChoice::CpuInt8 => (on_cpu(&mut progress)?, None),
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
                    STATE.with(|s| s.borrow_mut().gpu.take());
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
    let ends = began.iter().skip(1).map(|b| b.1).chain([now_ms()]);
    load_steps.extend(began.iter().zip(ends).map(|(&(stage, start), end)| (stage, end - start)));
    let c = engine.config().clone();
    let shipped = saes::shipped_index(id, &c.key).await.unwrap_or_default();
    // The SAE the page starts on (it asks for it once the model is in use): the layer whose SAE reproduces the
    // recorded SAIF results, else the last one.
    let recorded = saif::defaults::steering(&c.key, "*").map(|d| d.layer).filter(|l| shipped.layers.contains(l));
    let default_sae_layer = recorded.or(shipped.layers.last().copied());
    let summary = ModelSummary {
        name: if c.name.is_empty() { name.to_string() } else { c.name.clone() },
        key: c.key.clone(),
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
        instruction_tuned: engine.instruction_tuned(),
        backend: match engine.model.backend_name() {
            cpu if cpu == "cpu" && int8_activations => {
                format!("cpu ({}), activations rounded to 8 bits", threads::describe())
            }
            cpu if cpu == "cpu" => format!("cpu ({})", threads::describe()),
            other => other,
        },
        backend_note: note,
        bos: engine.tokenizer.bos(),
        eos: engine.tokenizer.eos(),
        adds_bos: engine.tokenizer.adds_bos(),
        file_bytes: engine.file_bytes,
        from_cache,
        load_ms: now_ms() - started,
        load_steps,
        metadata: engine.metadata.clone(),
        tensor_types: engine.tensor_types.clone(),
        shipped_layers: shipped.layers.clone(),
        default_sae_layer,
    };
    let lens = engine.model.readout().map(|r| Rc::new(LogitLens::from_readout(r)));
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.tokenizer = Some((engine.tokenizer.clone(), engine.chat.clone()));
        s.model = Some(ModelFacts { key: c.key.clone(), hidden: c.hidden, shipped });
        s.lens = lens;
        s.engine = Some(engine);
    });
    Ok(summary)
}

/// Lets the requests that arrived meanwhile in (a Stop, a tokenization): a message this worker sends itself through
/// a `MessageChannel`, which the browser delivers after the messages already waiting. A timer of 0 ms did the same,
/// but browsers hold nested timers to at least 4 ms, and a generation waited that long after every token of every
/// output (docs/benchmarks.md, stop 43). A channel per call, not one kept: two tasks that yield at once (a download
/// and a generation) each get their own answer.
async fn yield_to_messages() {
    let Ok(channel) = web_sys::MessageChannel::new() else {
        return gloo::timers::future::TimeoutFuture::new(0).await;
    };
    let delivered = js_sys::Promise::new(&mut |resolve, _| channel.port1().set_onmessage(Some(&resolve)));
    if channel.port2().post_message(&JsValue::UNDEFINED).is_err() {
        return gloo::timers::future::TimeoutFuture::new(0).await;
    }
    let _ = wasm_bindgen_futures::JsFuture::from(delivered).await;
}

fn now_ms() -> f64 {
    scope().performance().map(|p| p.now()).unwrap_or_else(|| js_sys::Date::now())
}

pub fn js_text(value: &JsValue) -> String {
    value
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| value.as_string())
        .unwrap_or_else(|| format!("{value:?}"))
}

//! The Web Worker that hosts the engine, so that downloading, parsing and running a model never blocks the page.
//!
//! Messages in: `{ request: { id, body: Request }, file?: File }` (the file for `LoadFile`); messages out:
//! `{ id, body: Response }`; both are plain JS objects (serde-wasm-bindgen). Downloads go through the browser's Cache API, so a model is fetched
//! once and read from disk on later visits; an entry that turns out damaged is deleted.

use std::cell::RefCell;

use js_sys::{Array, Reflect, Uint8Array};
use saif_engine::{Engine, EngineError, LoadOptions, LoadStep};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    Blob, Cache, DedicatedWorkerGlobalScope, File, MessageEvent, ReadableStreamDefaultReader, Response as WebResponse,
};

use crate::protocol::{Envelope, ModelSummary, Progress, Request, Response, Stage, TokenList, TokenView};

const CACHE_NAME: &str = "saif-models-v1";

thread_local! {
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
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
            Ok(Envelope { id, body }) => wasm_bindgen_futures::spawn_local(async move {
                if let Err(message) = handle(id, body, file).await {
                    post(id, Response::Error { message });
                }
            }),
            Err(e) => post(0, Response::Error { message: format!("the worker could not read a request: {e}") }),
        }
    });
    scope().set_onmessage(Some(onmessage.as_ref().unchecked_ref()));
    onmessage.forget();
    post(0, Response::Ready);
}

async fn handle(id: u32, request: Request, file: Option<File>) -> Result<(), String> {
    match request {
        Request::LoadUrl { url, name } => {
            let (bytes, from_cache) = download(id, &url).await?;
            match load(id, &name, bytes, from_cache) {
                Ok(summary) => post(id, Response::Loaded(summary)),
                Err(message) => {
                    if from_cache {
                        // A damaged cache entry would fail every visit: drop it so the next try downloads afresh.
                        let _ = delete_cached(&url).await;
                        return Err(format!(
                            "{message} (the cached copy was removed; loading again downloads it anew)"
                        ));
                    }
                    return Err(message);
                }
            }
        }
        Request::LoadFile { name } => {
            let file = file.ok_or("no file came with the request")?;
            let bytes = read_blob(id, &file, Stage::ReadingFile).await?;
            post(id, Response::Loaded(load(id, &name, bytes, false)?));
        }
        Request::Tokenize { text, add_bos } => {
            let tokens = ENGINE.with(|e| -> Result<TokenList, String> {
                let engine = e.borrow();
                let engine = engine.as_ref().ok_or("load a model first")?;
                tokenize(engine, &text, add_bos).map_err(|e| e.to_string())
            })?;
            post(id, Response::Tokens(tokens));
        }
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

fn tokenize(engine: &Engine, text: &str, add_bos: bool) -> Result<TokenList, EngineError> {
    let ids = if add_bos { engine.tokenizer.encode_prompt(text)? } else { engine.tokenizer.encode(text)? };
    let tokens = ids
        .iter()
        .map(|&id| {
            let shown = engine.tokenizer.decode(&[id]).unwrap_or_default();
            let raw = engine.tokenizer.token_text(id).unwrap_or_default();
            let special = shown.is_empty() && !raw.is_empty();
            let text = if shown.is_empty() || shown.contains('\u{fffd}') { raw } else { shown };
            TokenView { id, text, special }
        })
        .collect();
    Ok(TokenList { tokens })
}

fn load(id: u32, name: &str, bytes: Vec<u8>, from_cache: bool) -> Result<ModelSummary, String> {
    let started = now_ms();
    // Drop the previous model first: two models at once may not fit in the tab's memory.
    ENGINE.with(|e| e.borrow_mut().take());
    let mut weights = Reporter::new(id, Stage::LoadingWeights);
    let engine = Engine::from_bytes_cpu_with_progress(&bytes, &LoadOptions::default(), |step| match step {
        LoadStep::Header => post(id, Response::Progress(Progress { stage: Stage::Parsing, done: 0, total: None })),
        LoadStep::Tokenizer => {
            post(id, Response::Progress(Progress { stage: Stage::BuildingTokenizer, done: 0, total: None }))
        }
        LoadStep::Weights { done, total } => weights.report(done as u64, Some(total as u64)),
    })
    .map_err(|e| e.to_string())?;
    drop(bytes);
    let c = engine.config().clone();
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
        bos: engine.tokenizer.bos(),
        eos: engine.tokenizer.eos(),
        adds_bos: engine.tokenizer.adds_bos(),
        file_bytes: engine.file_bytes,
        from_cache,
        load_ms: now_ms() - started,
        metadata: engine.metadata.clone(),
        tensor_types: engine.tensor_types.clone(),
    };
    ENGINE.with(|e| *e.borrow_mut() = Some(engine));
    Ok(summary)
}

/// Fetches `url` through the Cache API, reporting progress. Returns the bytes and whether they came from the cache.
async fn download(id: u32, url: &str) -> Result<(Vec<u8>, bool), String> {
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
        return Err(format!("downloading {url} failed: HTTP {} {}", response.status(), response.status_text()));
    }
    let total = content_length(&response);
    let (bytes, chunks) = read_stream(id, &response, Stage::Downloading, total).await?;
    if let Some(total) = total {
        if bytes.len() as u64 != total {
            return Err(format!("the download of {url} stopped after {} of {total} bytes; try again", bytes.len()));
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

//! Downloads through the browser's Cache API, so that a file is fetched once and read from disk on later visits.
//!
//! Every cached file carries its size and sha256 (headers `x-saif-bytes`, `x-saif-sha256`, computed with the
//! browser's own SHA-256 when the file came in). A cached copy is checked against them, and against what the page
//! knows of the file (`Expected`), on every read; a copy that fails is deleted and downloaded again. A download
//! is cached only once it is complete and checked, so an interrupted one leaves nothing behind. A full storage
//! quota is reported, and the file is used uncached.

use js_sys::{Array, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Blob, Cache, Headers, Request as WebRequest, Response as WebResponse, ResponseInit};

use super::{js_text, post, scope, Failure, Reporter};
use crate::protocol::{CachedFile, Expected, Response, Stage};

pub const CACHE_NAME: &str = "saif-models-v1";
const BYTES_HEADER: &str = "x-saif-bytes";
const SHA_HEADER: &str = "x-saif-sha256";

/// A file's bytes and where they came from.
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub from_cache: bool,
}

async fn open_cache() -> Option<Cache> {
    // A page not served over https or localhost has no Cache API: everything still works, uncached.
    let caches = scope().caches().ok()?;
    JsFuture::from(caches.open(CACHE_NAME)).await.ok().map(|c| c.unchecked_into())
}

/// Fetches `url` (from the cache when a good copy is there), reporting progress as request `id`.
pub async fn fetch(id: u32, url: &str, expected: &Expected) -> Result<Fetched, Failure> {
    let cache = open_cache().await;
    if let Some(cache) = &cache {
        let hit = JsFuture::from(cache.match_with_str(url)).await.map_err(js_error)?;
        if let Ok(response) = hit.dyn_into::<WebResponse>() {
            let recorded = recorded(&response);
            let (bytes, _) = read_stream(id, &response, Stage::ReadingCache, recorded.bytes).await?;
            post(
                id,
                Response::Progress(crate::protocol::Progress { stage: Stage::CheckingCache, done: 0, total: None }),
            );
            match check(&bytes, &recorded, expected).await {
                Ok(()) => return Ok(Fetched { bytes, from_cache: true }),
                Err(why) => {
                    let _ = JsFuture::from(cache.delete_with_str(url)).await;
                    let text = format!(
                        "The cached copy of {} was damaged ({why}); it was deleted and is downloaded again.",
                        short(url)
                    );
                    post(id, Response::Notice { text });
                }
            }
        }
    }
    let response: WebResponse = JsFuture::from(scope().fetch_with_str(url))
        .await
        .map_err(|e| {
            format!("could not download {url}: {} (offline, or the server refuses cross-origin requests?)", js_text(&e))
        })?
        .unchecked_into();
    if !response.ok() {
        return Err(format!("downloading {url} failed: HTTP {} {}", response.status(), response.status_text()).into());
    }
    let total = content_length(&response);
    let (bytes, chunks) = read_stream(id, &response, Stage::Downloading, total.or(expected.bytes)).await?;
    if let Some(total) = total {
        if bytes.len() as u64 != total {
            return Err(
                format!("the download of {url} stopped after {} of {total} bytes; try again", bytes.len()).into()
            );
        }
    }
    let sha256 = sha256_hex(&bytes).await?;
    let this = Expected { bytes: Some(bytes.len() as u64), sha256: Some(sha256.clone()) };
    if let Err(why) = check(&bytes, &this, expected).await {
        return Err(format!("the download of {url} is not the file the page expects ({why}); try again").into());
    }
    if let Some(cache) = &cache {
        store(id, cache, url, &chunks, bytes.len() as u64, &sha256).await;
    }
    Ok(Fetched { bytes, from_cache: false })
}

/// Caches a complete download with its size and hash; a full quota becomes a notice.
async fn store(id: u32, cache: &Cache, url: &str, chunks: &Array, bytes: u64, sha256: &str) {
    let put = async {
        let blob = Blob::new_with_u8_array_sequence(chunks)?;
        let headers = Headers::new()?;
        headers.set(BYTES_HEADER, &bytes.to_string())?;
        headers.set(SHA_HEADER, sha256)?;
        headers.set("content-length", &bytes.to_string())?;
        let init = ResponseInit::new();
        init.set_headers(&headers);
        let cached = WebResponse::new_with_opt_blob_and_init(Some(&blob), &init)?;
        JsFuture::from(cache.put_with_str(url, &cached)).await
    };
    if let Err(e) = put.await {
        let quota = Reflect::get(&e, &"name".into())
            .ok()
            .and_then(|n| n.as_string())
            .is_some_and(|n| n == "QuotaExceededError");
        let why = if quota {
            "the browser's storage for this site is full: delete cached files below to make room".to_string()
        } else {
            js_text(&e)
        };
        let text = format!("{} works now but could not be kept for the next visit ({why}).", short(url));
        post(id, Response::Notice { text });
    }
}

/// What a cached copy says of itself.
fn recorded(response: &WebResponse) -> Expected {
    let header = |name: &str| response.headers().get(name).ok().flatten();
    Expected { bytes: header(BYTES_HEADER).and_then(|v| v.parse().ok()), sha256: header(SHA_HEADER) }
}

/// Checks bytes against what is recorded and what is expected of them.
async fn check(bytes: &[u8], recorded: &Expected, expected: &Expected) -> Result<(), String> {
    for e in [recorded, expected] {
        if let Some(n) = e.bytes {
            if bytes.len() as u64 != n {
                return Err(format!("{} bytes instead of {n}", bytes.len()));
            }
        }
    }
    let wanted: Vec<&String> = [&recorded.sha256, &expected.sha256].into_iter().flatten().collect();
    if recorded.bytes.is_none() && recorded.sha256.is_none() && expected.sha256.is_none() {
        return Err("it carries no size or checksum".into());
    }
    if !wanted.is_empty() {
        let got = sha256_hex(bytes).await.map_err(|f| f.message)?;
        if let Some(w) = wanted.iter().find(|w| !w.eq_ignore_ascii_case(&got)) {
            return Err(format!("sha256 {got} instead of {w}"));
        }
    }
    Ok(())
}

/// SHA-256 of `bytes` as lowercase hex, by the browser (`crypto.subtle`).
pub async fn sha256_hex(bytes: &[u8]) -> Result<String, Failure> {
    let subtle = scope().crypto().map_err(js_error)?.subtle();
    let view = Uint8Array::from(bytes);
    let digest = JsFuture::from(subtle.digest_with_str_and_buffer_source("SHA-256", &view).map_err(js_error)?)
        .await
        .map_err(js_error)?;
    let digest = Uint8Array::new(&digest).to_vec();
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// The cache's entries with their recorded size and hash.
pub async fn list() -> Result<Vec<CachedFile>, Failure> {
    let Some(cache) = open_cache().await else { return Ok(Vec::new()) };
    let keys: Array = JsFuture::from(cache.keys()).await.map_err(js_error)?.unchecked_into();
    let mut files = Vec::new();
    for key in keys.iter() {
        let request: WebRequest = key.unchecked_into();
        let url = request.url();
        let hit = JsFuture::from(cache.match_with_request(&request)).await.map_err(js_error)?;
        if let Ok(response) = hit.dyn_into::<WebResponse>() {
            let r = recorded(&response);
            files.push(CachedFile {
                url,
                bytes: r.bytes.or_else(|| content_length(&response)).unwrap_or(0),
                sha256: r.sha256,
            });
        }
    }
    Ok(files)
}

pub async fn delete(url: &str) -> Result<(), Failure> {
    if let Some(cache) = open_cache().await {
        JsFuture::from(cache.delete_with_str(url)).await.map_err(js_error)?;
    }
    Ok(())
}

/// Deletes every cached file; returns how many there were.
pub async fn clear() -> Result<u32, Failure> {
    let caches = scope().caches().map_err(js_error)?;
    let entries = list().await?.len() as u32;
    JsFuture::from(caches.delete(CACHE_NAME)).await.map_err(js_error)?;
    Ok(entries)
}

fn short(url: &str) -> &str {
    url.rsplit('/').next().filter(|s| !s.is_empty()).unwrap_or(url)
}

fn content_length(response: &WebResponse) -> Option<u64> {
    response.headers().get("content-length").ok().flatten().and_then(|v| v.parse().ok())
}

/// Reads a blob (a file the visitor picked) into memory, reporting progress.
pub async fn read_blob(id: u32, blob: &Blob, stage: Stage) -> Result<Vec<u8>, Failure> {
    let response = WebResponse::new_with_opt_blob(Some(blob)).map_err(js_error)?;
    Ok(read_stream(id, &response, stage, Some(blob.size() as u64)).await?.0)
}

/// Reads a response body chunk by chunk into memory, reporting progress; also returns the chunks as JS arrays.
async fn read_stream(
    id: u32,
    response: &WebResponse,
    stage: Stage,
    total: Option<u64>,
) -> Result<(Vec<u8>, Array), Failure> {
    let body = response.body().ok_or("the response has no body")?;
    let reader: web_sys::ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let mut bytes = Vec::with_capacity(total.unwrap_or(0).min(1 << 31) as usize);
    let chunks = Array::new();
    let mut reporter = Reporter::new(id, stage);
    reporter.report(0, total);
    loop {
        let result = JsFuture::from(reader.read())
            .await
            .map_err(|e| format!("reading failed after {} bytes: {}", bytes.len(), js_text(&e)))?;
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

fn js_error(value: JsValue) -> Failure {
    js_text(&value).into()
}

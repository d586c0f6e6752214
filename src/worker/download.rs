//! Downloads through the browser's Cache API, so that a file is fetched once and read from disk on later visits.
//!
//! Every cached file carries its size and sha256 (headers `x-saif-bytes`, `x-saif-sha256`, computed with the
//! browser's own SHA-256 when the file came in). A cached copy is checked against them, and against what the page
//! knows of the file (`Expected`), on every read; a copy that fails is deleted and downloaded again. The model's
//! hash is awaited only once its bytes are parsed (`fetch_then_check`), so the two overlap. A download
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
    let (fetched, check) = fetch_then_check(id, url, expected).await?;
    let Some(check) = check else { return Ok(fetched) };
    match check.outcome().await {
        Ok(()) => Ok(fetched),
        Err(damaged) => {
            drop(fetched);
            damaged.tell(id);
            download(id, url, expected).await
        }
    }
}

/// Fetches `url` like `fetch`, but returns a cached copy as soon as it is read, with its sha256 still being
/// computed by the browser (off this thread): the caller parses the bytes meanwhile, and awaits the
/// `PendingCheck` before it trusts what it made of them. This takes the hash (half a second for Gemma's 253 MB)
/// off a returning visitor's wait.
pub async fn fetch_then_check(
    id: u32,
    url: &str,
    expected: &Expected,
) -> Result<(Fetched, Option<PendingCheck>), Failure> {
    if let Some(cache) = open_cache().await {
        let hit = JsFuture::from(cache.match_with_str(url)).await.map_err(js_error)?;
        if let Ok(response) = hit.dyn_into::<WebResponse>() {
            let recorded = recorded(&response);
            let (bytes, js_bytes) = read_whole(id, &response).await?;
            let check = check_sizes(bytes.len(), &recorded, expected).and_then(|wanted| {
                if wanted.is_empty() {
                    return Ok(None);
                }
                Ok(Some(PendingCheck { url: url.to_string(), digest: digest(&js_bytes)?, wanted }))
            });
            match check {
                Ok(check) => return Ok((Fetched { bytes, from_cache: true }, check)),
                Err(why) => {
                    let _ = JsFuture::from(cache.delete_with_str(url)).await;
                    Damaged { url: url.to_string(), why }.tell(id);
                }
            }
        }
    }
    Ok((download(id, url, expected).await?, None))
}

/// A cached copy whose sha256 the browser is computing.
pub struct PendingCheck {
    url: String,
    digest: JsFuture,
    wanted: Vec<String>,
}

impl PendingCheck {
    /// Whether the copy is the file it should be; a damaged one is deleted from the cache.
    pub async fn outcome(self) -> Result<(), Damaged> {
        let why = match self.digest.await {
            Ok(digest) => {
                let got = hex(&Uint8Array::new(&digest).to_vec());
                match self.wanted.iter().find(|w| !w.eq_ignore_ascii_case(&got)) {
                    None => return Ok(()),
                    Some(w) => format!("sha256 {got} instead of {w}"),
                }
            }
            Err(e) => format!("its sha256 could not be computed: {}", js_text(&e)),
        };
        let _ = delete(&self.url).await;
        Err(Damaged { url: self.url, why })
    }
}

/// A cached copy that failed its check, and was deleted.
pub struct Damaged {
    url: String,
    why: String,
}

impl Damaged {
    /// Tells the visitor, as request `id`, that the file is downloaded again.
    pub fn tell(&self, id: u32) {
        let (file, why) = (short(&self.url), &self.why);
        let text = format!("The cached copy of {file} was damaged ({why}); it was deleted and is downloaded again.");
        post(id, Response::Notice { text });
    }
}

/// Downloads `url`, checks it against `expected`, and caches it (an interrupted download leaves nothing behind).
pub async fn download(id: u32, url: &str, expected: &Expected) -> Result<Fetched, Failure> {
    let cache = open_cache().await;
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
    let matches = check_sizes(bytes.len(), &this, expected).and_then(|wanted| {
        match wanted.iter().find(|w| !w.eq_ignore_ascii_case(&sha256)) {
            Some(w) => Err(format!("sha256 {sha256} instead of {w}")),
            None => Ok(()),
        }
    });
    if let Err(why) = matches {
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

/// Checks a file's size against what is recorded and what is expected of it, and returns the sha256 it must have.
/// A cached copy that records neither its size nor its hash, of a file whose hash the page does not know, is not
/// trusted.
fn check_sizes(len: usize, recorded: &Expected, expected: &Expected) -> Result<Vec<String>, String> {
    for e in [recorded, expected] {
        if let Some(n) = e.bytes {
            if len as u64 != n {
                return Err(format!("{len} bytes instead of {n}"));
            }
        }
    }
    if recorded.bytes.is_none() && recorded.sha256.is_none() && expected.sha256.is_none() {
        return Err("it carries no size or checksum".into());
    }
    Ok([&recorded.sha256, &expected.sha256].into_iter().flatten().cloned().collect())
}

/// Starts the browser's SHA-256 of `bytes` (`crypto.subtle`, which copies them and hashes them off this thread).
fn digest(bytes: &Uint8Array) -> Result<JsFuture, String> {
    let subtle = scope().crypto().map_err(|e| js_text(&e))?.subtle();
    Ok(JsFuture::from(subtle.digest_with_str_and_buffer_source("SHA-256", bytes).map_err(|e| js_text(&e))?))
}

/// SHA-256 of `bytes` as lowercase hex, by the browser.
pub async fn sha256_hex(bytes: &[u8]) -> Result<String, Failure> {
    let digest = digest(&Uint8Array::from(bytes))?.await.map_err(js_error)?;
    Ok(hex(&Uint8Array::new(&digest).to_vec()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// Reads a whole response body at once into memory; also returns it as a JS array, which the checksum reads
/// without another copy. For the cache, where a file on disk needs no progress bar of its own: in headless
/// Chromium on 2 cores, SmolLM2's 98 MB took 0.49-0.58 s this way against 0.59-0.68 s in chunks, and Gemma's 253 MB
/// 1.1 s either way (docs/benchmarks.md).
async fn read_whole(id: u32, response: &WebResponse) -> Result<(Vec<u8>, Uint8Array), Failure> {
    post(id, Response::Progress(crate::protocol::Progress { stage: Stage::ReadingCache, done: 0, total: None }));
    let buffer = JsFuture::from(response.array_buffer().map_err(js_error)?)
        .await
        .map_err(|e| format!("reading the cached copy failed: {}", js_text(&e)))?;
    let js_bytes = Uint8Array::new(&buffer);
    let mut bytes = vec![0; js_bytes.length() as usize];
    js_bytes.copy_to(&mut bytes);
    Ok((bytes, js_bytes))
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

//! Progress of the long SAIF tasks (discovery, evaluation, sweeps), reported to a callback that may also stop
//! them. The callback returns a future so that a browser worker can yield there and let a stop request in; native
//! callers return `std::future::ready(true)`.

use std::future::Future;

use saif_engine::EngineError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// What is being done, for a person ("reading positives and negatives", "generating: saif").
    pub phase: String,
    pub done: usize,
    pub total: usize,
}

/// Reports progress and turns a stop request into `EngineError::Stopped`.
pub async fn report<F, Fut>(progress: &mut F, phase: &str, done: usize, total: usize) -> Result<(), EngineError>
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = bool>,
{
    if progress(Progress { phase: phase.to_string(), done, total }).await {
        Ok(())
    } else {
        Err(EngineError::Stopped)
    }
}

/// A callback that ignores progress and never stops (tests, batch jobs that report elsewhere).
pub fn silent(_: Progress) -> std::future::Ready<bool> {
    std::future::ready(true)
}

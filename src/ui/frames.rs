//! The page's own responsiveness: the longest gap between animation frames while the model is busy (a frame longer
//! than ~50 ms is a visible stutter). Heavy work runs in the worker, so this stays near one frame; the benchmark
//! panel shows it, and `window.saifLongestFrameMs` exposes it to tests.

use std::cell::Cell;
use std::rc::Rc;

use leptos::prelude::*;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use super::state::AppState;

/// Starts watching frames for the life of the page.
pub fn watch(state: AppState) {
    let Some(window) = web_sys::window() else { return };
    let last = Rc::new(Cell::new(None::<f64>));
    let was_busy = Rc::new(Cell::new(false));
    let tick: Rc<Cell<Option<Closure<dyn FnMut(f64)>>>> = Rc::new(Cell::new(None));
    let next = tick.clone();
    let frame = Closure::<dyn FnMut(f64)>::new(move |now: f64| {
        let busy = state.busy.get_untracked() > 0 || state.loading.get_untracked().is_some();
        if busy && !was_busy.get() {
            state.longest_frame_ms.set(0.0);
            last.set(None);
        }
        if busy {
            if let Some(before) = last.get() {
                let gap = now - before;
                if gap > state.longest_frame_ms.get_untracked() {
                    state.longest_frame_ms.set(gap);
                    if let Some(w) = web_sys::window() {
                        let _ = js_sys::Reflect::set(&w, &"saifLongestFrameMs".into(), &gap.into());
                    }
                }
            }
            last.set(Some(now));
        }
        was_busy.set(busy);
        if let (Some(w), Some(f)) = (web_sys::window(), next.take()) {
            let _ = w.request_animation_frame(f.as_ref().unchecked_ref());
            next.set(Some(f));
        }
    });
    let _ = window.request_animation_frame(frame.as_ref().unchecked_ref());
    tick.set(Some(frame));
    std::mem::forget(tick);
}

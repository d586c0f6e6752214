//! A layer's attention block on the CPU: the query, key and value products over every call's rows at once; each
//! sequence's new rows made ready (Gemma 3's query and key norms, RoPE, the queries' scale) and appended to its KV
//! cache, then attended over its own cache rows, row by row as decoding steps do, so that a sequence gets the same
//! numbers in a prompt, a single step or a batch (the query heads that share a key-value head read each key and
//! value row once for all of them); then the output product.

use super::{rms_norm_in_place, CpuModel, Layer, Linear, Sequence};
use crate::config::{rope_cos_sin, RopeLayout};
use crate::error::Result;
use crate::model::kv_cache::{CacheRows, CacheView, KvCache};
use crate::model::{activations, value_sums, BatchCall};
use crate::quant::{self, RowForm};
use crate::team;

/// A prompt's rows per task of its attention (`CpuModel::attend`).
const ATTENDED_ROWS_PER_TASK: usize = 4;

impl CpuModel {
    /// The attention block of `layer` over the rows of every call (`a`: the calls' rows, one after the other):
    /// the projections on all rows at once, attention per sequence against its own cache.
    pub(super) fn attention(
        &mut self,
        layer: usize,
        a: &[f32],
        calls: &[BatchCall],
        row_form: RowForm,
    ) -> Result<Vec<f32>> {
        let end = calls.iter().map(|c| self.sequences[c.sequence].position + c.tokens.len()).max().unwrap_or(0);
        let (base, head_dim) = (self.config.layers[layer].rope_base, self.config.head_dim);
        self.rope.cover(base, head_dim, self.rope_factors.as_deref(), end, self.max_context);
        if calls.iter().all(|c| c.tokens.len() == 1) {
            return self.attention_steps(layer, a, calls, row_form);
        }
        let (c, l) = (&self.config, &self.layers[layer]);
        let [mut q, mut k, v] = Linear::values_each([&l.attn_q, &l.attn_k, &l.attn_v], a, row_form)?;
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let mut out = vec![0f32; q.len()];
        // Each call's rows (its queries and keys made ready in place), its part of the output and its sequence,
        // taken out of `self` for the time of the step so that the sequences' attention (a fifth of a batched step
        // on SmolLM2) runs in parallel, each task writing its own cache.
        let mut sequences = std::mem::take(&mut self.sequences);
        let mut by_index: Vec<Option<&mut Sequence>> = sequences.iter_mut().map(Some).collect();
        let mut tasks = Vec::with_capacity(calls.len());
        let (mut rest_q, mut rest_k, mut rest_v, mut rest_out) = (&mut q[..], &mut k[..], &v[..], &mut out[..]);
        for call in calls {
            let sequence = by_index[call.sequence].take().expect("distinct sequences, checked by forward_calls");
            let n = call.tokens.len();
            let (q, after_q) = std::mem::take(&mut rest_q).split_at_mut(n * q_dim);
            let (k, after_k) = std::mem::take(&mut rest_k).split_at_mut(n * kv_dim);
            let (v, after_v) = rest_v.split_at(n * kv_dim);
            let (out, after_out) = std::mem::take(&mut rest_out).split_at_mut(n * q_dim);
            tasks.push((q, k, v, out, sequence));
            (rest_q, rest_k, rest_v, rest_out) = (after_q, after_k, after_v, after_out);
        }
        let this = &*self;
        // One sequence's rows on the pass's threads; several sequences each on a task of their own.
        let rows_in_parallel = tasks.len() == 1;
        let attend = |(q, k, v, out, sequence): (&mut [f32], &mut [f32], &[f32], &mut [f32], &mut Sequence)| {
            this.attend(layer, q, k, v, sequence, rows_in_parallel, out)
        };
        team::for_each_part_if(!rows_in_parallel, tasks, |_, task| attend(task));
        self.sequences = sequences;
        self.layers[layer].attn_output.values(&out, row_form)
    }

    /// `attention` for a decoding step of each call's sequence (one new row each), on plain rows of values: the
    /// queries, keys and values come from the products as they are, and the only tensors are the layer's input and
    /// output. Per sequence and layer, the tensor operations around each step's little arithmetic took longer than
    /// the arithmetic itself. Each sequence's new row goes into its cache (`step_row`), then its heads attend
    /// (`attend_heads_of`), on the pass's threads, each task writing its own part of the output: a single sequence's
    /// heads each on a task (on one thread, they left the others idle for a tenth of a SmolLM2 step), several
    /// sequences a task each.
    fn attention_steps(&mut self, layer: usize, a: &[f32], calls: &[BatchCall], row_form: RowForm) -> Result<Vec<f32>> {
        let (c, l) = (&self.config, &self.layers[layer]);
        let [q, k, v] = Linear::values_each([&l.attn_q, &l.attn_k, &l.attn_v], a, row_form)?;
        let (q_dim, kv_dim, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let norms = qk_norms(l);
        let mut sequences = std::mem::take(&mut self.sequences);
        let mut by_index: Vec<Option<&mut Sequence>> = sequences.iter_mut().map(Some).collect();
        let mut tasks: Vec<&mut Sequence> = calls
            .iter()
            .map(|call| by_index[call.sequence].take().expect("distinct sequences, checked by forward_calls"))
            .collect();
        let this = &*self;
        let step = |i: usize, sequence: &mut Sequence| {
            // The first head's keys asked for while the new row is made (`CacheRows::prefetch_start`).
            let len = sequence.position + 1;
            sequence.caches[layer].keys().prefetch_start(0, this.first_attended(layer, len)..len - 1);
            let rows = |x: &[f32], d: usize| x[i * d..(i + 1) * d].to_vec();
            this.step_row(layer, rows(&q, q_dim), rows(&k, kv_dim), &v[i * kv_dim..(i + 1) * kv_dim], norms, sequence)
        };
        let mut out = vec![0f32; calls.len() * q_dim];
        match tasks.as_mut_slice() {
            // One sequence: its step, then each of its heads on a task of its own.
            [sequence] => {
                let stepped = step(0, sequence);
                let cache = &sequence.caches[layer];
                team::for_each_part(out.chunks_exact_mut(hd), |h, out| {
                    let queries = &stepped.queries[h * hd..(h + 1) * hd];
                    this.attend_heads_of(layer, h..h + 1, queries, cache, stepped.len, out)
                });
            }
            // Several: a task per sequence, its step and then all its heads, in one round of tasks (as many tasks
            // as heads, each with its own scores to allocate, were slower).
            _ => team::for_each_part(tasks.into_iter().zip(out.chunks_exact_mut(q_dim)), |i, (sequence, out)| {
                let stepped = step(i, sequence);
                let heads = 0..c.n_heads;
                this.attend_heads_of(layer, heads, &stepped.queries, &sequence.caches[layer], stepped.len, out);
            }),
        }
        self.sequences = sequences;
        self.layers[layer].attn_output.values(&out, row_form)
    }

    /// The query heads `heads` of a sequence's decoding step at `layer` (`queries`: theirs, rotated and scaled) over
    /// the first `len` rows of its cache, into `out` (theirs, head after head): the heads that share a key-value head
    /// attended together (`attend_heads`).
    fn attend_heads_of(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        queries: &[f32],
        cache: &KvCache,
        len: usize,
        out: &mut [f32],
    ) {
        let (hd, group) = (self.config.head_dim, self.config.n_heads / self.config.n_kv_heads);
        let (keys, values) = (cache.keys(), cache.values());
        let mut h = heads.start;
        while h < heads.end {
            let end = ((h / group + 1) * group).min(heads.end);
            let at = (h - heads.start) * hd..(end - heads.start) * hd;
            self.attend_heads(layer, h..end, &queries[at.clone()], &keys, &values, len, &mut out[at]);
            h = end;
        }
    }

    /// Attention of one sequence's `n` new rows at `layer` (`queries`, `keys`, `v`: theirs, each [n, heads * hd];
    /// the queries and keys made ready in place) into `out` ([n, heads * hd]), appending the keys and values to the
    /// sequence's cache: each row as a decoding step at its position would be, bit for bit (`prepare_row`, then
    /// `attend_heads_of` over the rows up to its own), the causal mask being where each row's attention stops. The
    /// rows are prepared, then attend, a few at a time on the pass's threads where `rows_in_parallel` (a single
    /// prompt's attention took 17-26% of a 128-token prefill on one thread while the others waited). Candle's products
    /// per head, which this replaced, also computed the masked half of the scores.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        queries: &mut [f32],
        keys: &mut [f32],
        v: &[f32],
        sequence: &mut Sequence,
        rows_in_parallel: bool,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let start = sequence.position;
        let norms = qk_norms(&self.layers[layer]);
        let parts =
            queries.chunks_mut(ATTENDED_ROWS_PER_TASK * q_dim).zip(keys.chunks_mut(ATTENDED_ROWS_PER_TASK * kv_dim));
        let prepare = |part: usize, (queries, keys): (&mut [f32], &mut [f32])| {
            for (i, (q, k)) in queries.chunks_exact_mut(q_dim).zip(keys.chunks_exact_mut(kv_dim)).enumerate() {
                self.prepare_row(layer, q, k, norms, start + part * ATTENDED_ROWS_PER_TASK + i);
            }
        };
        team::for_each_part_if(rows_in_parallel, parts, prepare);
        let cache = &mut sequence.caches[layer];
        for (k, v) in keys.chunks_exact(kv_dim).zip(v.chunks_exact(kv_dim)) {
            cache.append_row(k, v, nkv);
        }
        let cache = &*cache;
        let attend = |part: usize, out: &mut [f32]| {
            for (i, out) in out.chunks_exact_mut(q_dim).enumerate() {
                let row = part * ATTENDED_ROWS_PER_TASK + i;
                let queries = &queries[row * q_dim..(row + 1) * q_dim];
                self.attend_heads_of(layer, 0..nh, queries, cache, start + row + 1, out);
            }
        };
        let parts = out.chunks_mut(ATTENDED_ROWS_PER_TASK * q_dim);
        team::for_each_part_if(rows_in_parallel, parts, attend);
    }

    /// One row's queries `q` and keys `k` at `layer`, at `position`, made ready for attention in place: Gemma 3's
    /// norms (`qk_norms`), RoPE, and the queries' scale.
    fn prepare_row(
        &self,
        layer: usize,
        q: &mut [f32],
        k: &mut [f32],
        qk_norms: Option<(&[f32], &[f32])>,
        position: usize,
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        if let Some((qn, kn)) = qk_norms {
            q.chunks_exact_mut(hd).for_each(|head| rms_norm_in_place(head, qn, c.rms_eps));
            k.chunks_exact_mut(hd).for_each(|head| rms_norm_in_place(head, kn, c.rms_eps));
        }
        let (cos, sin) = self.rope.get(c.layers[layer].rope_base, hd / 2, position..position + 1);
        for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
            rotate(head, cos, sin, c.rope_layout);
        }
        // The queries scaled once for all heads.
        q.iter_mut().for_each(|x| *x *= c.attention_scale);
    }

    /// A decoding step's new row of one sequence at `layer` (`q`, `k`, `v`: its queries, keys and values;
    /// `qk_norms`: Gemma 3's query and key norm weights): made ready (`prepare_row`), the keys and values appended to
    /// the sequence's cache. The attention itself is `attend_heads`'. Batched and single-sequence steps both come
    /// here, and a prompt's rows take the same arithmetic (`attend`), so a sequence gets the same attention in any of
    /// them.
    fn step_row(
        &self,
        layer: usize,
        mut q: Vec<f32>,
        mut k: Vec<f32>,
        v: &[f32],
        qk_norms: Option<(&[f32], &[f32])>,
        sequence: &mut Sequence,
    ) -> Step {
        let position = sequence.position;
        self.prepare_row(layer, &mut q, &mut k, qk_norms, position);
        sequence.caches[layer].append_row(&k, v, self.config.n_kv_heads);
        Step { queries: q, len: position + 1 }
    }

    /// Attention at `layer` of the query heads `heads`, which share one key-value head (`queries`: theirs, rotated
    /// and scaled, head after head), over the first `len` rows of their sequence's cache (`keys`, `values`), or the
    /// last `window` of them, into `out` (head_dim values per head): each head's numbers as alone, bit for bit, with
    /// each key and value row read once for all.
    #[allow(clippy::too_many_arguments)]
    fn attend_heads(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        queries: &[f32],
        keys: &CacheView,
        values: &CacheView,
        len: usize,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let kv_head = heads.start / (c.n_heads / c.n_kv_heads);
        debug_assert_eq!((heads.end - 1) / (c.n_heads / c.n_kv_heads), kv_head, "heads of one key-value head");
        match (keys, values) {
            (CacheView::F32(keys), CacheView::F32(values)) => {
                self.attend_heads_in(layer, heads, kv_head, queries, keys, values, len, out)
            }
            (CacheView::F16(keys), CacheView::F16(values)) => {
                self.attend_heads_in(layer, heads, kv_head, queries, keys, values, len, out)
            }
            _ => unreachable!("a cache's keys and values are of one type (`KvCache`)"),
        }
    }

    /// The first of the `len` rows of a sequence's cache that a new row attends to at `layer`: all of them, or the
    /// last `window` (sliding-window layers).
    fn first_attended(&self, layer: usize, len: usize) -> usize {
        self.config.layers[layer].window.map_or(0, |w| len.saturating_sub(w))
    }

    /// `attend_heads` on a cache of f32 or f16 values (an f16 cache's values widened as the kernels load them).
    #[allow(clippy::too_many_arguments)]
    fn attend_heads_in<V: quant::CacheValue>(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        kv_head: usize,
        queries: &[f32],
        keys: &CacheRows<V>,
        values: &CacheRows<V>,
        len: usize,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (hd, n) = (c.head_dim, heads.len());
        let first = self.first_attended(layer, len);
        let rows = len - first;
        let mut weights = vec![0f32; n * rows];
        // Each run of the cache asked for while the one before it is read (`CacheRows::prefetch_start`): the values
        // during the scores, the next head's keys during the sums.
        values.prefetch_start(kv_head, first..len);
        // Every head against every key, each score `dot`'s bit for bit, each key read once for all the heads.
        quant::dots_rows(queries, hd, first..len, |j| keys.row(kv_head, j), &mut weights);
        if let Some(cap) = c.attn_softcap {
            weights.iter_mut().for_each(|w| *w = (*w / cap).tanh() * cap);
        }
        softmax_rows(&mut weights, rows);
        if kv_head + 1 < c.n_kv_heads {
            keys.prefetch_start(kv_head + 1, first..len);
        }
        out.fill(0.0);
        value_sums::weighted_sums(out, hd, &weights, |j| values.row(kv_head, first + j));
    }
}

/// A sequence's decoding step at one layer, its new row in the cache (`CpuModel::step_row`): the row's rotated,
/// scaled queries, and how many rows the cache holds.
struct Step {
    queries: Vec<f32>,
    len: usize,
}

/// RoPE's cos and sin for positions `0..len` ([len, head_dim / 2] each, row-major), one pair of tables per base,
/// grown (at least doubled) as sequences reach further. Recomputing them for every layer and call took 1.1% of a
/// Gemma prompt, in f64 `sin` and `cos`; each value is `rope_cos_sin`'s, whatever the range it was made in.
#[derive(Default)]
pub(super) struct RopeTables {
    /// (base, cos, sin)
    bases: Vec<(f32, Vec<f32>, Vec<f32>)>,
}

impl RopeTables {
    /// Makes sure the tables of `base` cover positions `0..end` (growing them no further than `max_context`).
    fn cover(&mut self, base: f32, head_dim: usize, factors: Option<&[f32]>, end: usize, max_context: usize) {
        let at = match self.bases.iter().position(|b| b.0 == base) {
            Some(at) => at,
            None => {
                self.bases.push((base, Vec::new(), Vec::new()));
                self.bases.len() - 1
            }
        };
        let (_, cos, sin) = &mut self.bases[at];
        let have = cos.len() / (head_dim / 2).max(1);
        if end <= have {
            return;
        }
        let (more_cos, more_sin) = rope_cos_sin(head_dim, base, factors, have..end.max((2 * have).min(max_context)));
        cos.extend(more_cos);
        sin.extend(more_sin);
    }

    /// cos and sin of `base` for `positions` (`half` values each), which `cover` made.
    fn get(&self, base: f32, half: usize, positions: std::ops::Range<usize>) -> (&[f32], &[f32]) {
        let (_, cos, sin) = self.bases.iter().find(|b| b.0 == base).expect("RopeTables::cover first");
        let range = positions.start * half..positions.end * half;
        (&cos[range.clone()], &sin[range])
    }
}

/// RoPE of one head at one position (`cos`, `sin`: head_dim / 2 values), as candle's `rope` (halves) and
/// `rope_i` (interleaved) compute it.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let half = head.len() / 2;
    for i in 0..half {
        let (a, b) = match layout {
            RopeLayout::Halves => (i, i + half),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x, y) = (head[a], head[b]);
        head[a] = x * cos[i] - y * sin[i];
        head[b] = x * sin[i] + y * cos[i];
    }
}

/// candle's `softmax_last_dim` of each row of `x` (rows of `len` values), with `activations::exp` (within a few ulp
/// of the C library's `expf`, which was a call per score; vectorized here, the sum then taken in order). Scores more
/// than 87.3 below the largest get e^-87.3 (about 1e-38) instead of less, which the sum, at least 1, cannot show.
/// Up to four rows side by side: the heads that share a key-value head (SmolLM2's 3, Gemma 3's 4). Each row's
/// maximum and sum are still one chain in the row's order (the same numbers bit for bit), and the rows' chains
/// overlap.
fn softmax_rows(x: &mut [f32], len: usize) {
    for group in x.chunks_mut(4 * len.max(1)) {
        let mut rows = group.chunks_exact_mut(len.max(1));
        match (rows.next(), rows.next(), rows.next(), rows.next()) {
            (Some(a), Some(b), Some(c), Some(d)) => softmax_side_by_side([a, b, c, d]),
            (Some(a), Some(b), Some(c), None) => softmax_side_by_side([a, b, c]),
            (Some(a), Some(b), None, _) => softmax_side_by_side([a, b]),
            (Some(a), None, ..) => softmax_side_by_side([a]),
            _ => {}
        }
    }
}

/// `softmax_rows`' arithmetic on `N` rows of one length at once.
fn softmax_side_by_side<const N: usize>(mut rows: [&mut [f32]; N]) {
    let len = rows[0].len();
    assert!(rows.iter().all(|row| row.len() == len), "rows of one length");
    let mut max = [f32::NEG_INFINITY; N];
    for i in 0..len {
        for (m, row) in max.iter_mut().zip(&rows) {
            *m = m.max(row[i]);
        }
    }
    for (row, m) in rows.iter_mut().zip(max) {
        row.iter_mut().for_each(|v| *v = activations::exp(*v - m));
    }
    let mut sum = [0f32; N];
    for i in 0..len {
        for (s, row) in sum.iter_mut().zip(&rows) {
            *s += row[i];
        }
    }
    for (row, s) in rows.iter_mut().zip(sum) {
        row.iter_mut().for_each(|v| *v /= s);
    }
}

/// Gemma 3's query and key norm weights of layer `l`, the form `step_row` takes; `None` for models without them.
fn qk_norms(l: &Layer) -> Option<(&[f32], &[f32])> {
    l.qk_norms.as_ref().map(|(q, k)| (&q[..], &k[..]))
}

#[cfg(test)]
mod tests {
    use super::{qk_norms, softmax_rows, RopeLayout};
    use crate::config::ModelConfig;
    use crate::gguf::GgufFile;
    use crate::model::activations;
    use crate::model::cpu::tests::rows;
    use crate::model::cpu::{CpuModel, LoadOptions, Sequence};
    use crate::model::kv_cache::{CacheView, KvCache};
    use candle_core::DType;

    /// `softmax_rows` gives each row the plain one-row loop's weights bit for bit (its maximum, then each
    /// exponential, then the sum in order, then each division): 1 to 9 rows, so groups of four and every smaller
    /// group, of 1, 5 and 64 values.
    #[test]
    fn softmax_rows_are_each_rows_softmax_bit_for_bit() {
        for len in [1, 5, 64] {
            for n in 1..=9 {
                let mut got = rows(n, len);
                let mut want = got.clone();
                for row in want.chunks_exact_mut(len) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    row.iter_mut().for_each(|v| *v = activations::exp(*v - max));
                    let sum = row.iter().fold(0f32, |sum, v| sum + v);
                    row.iter_mut().for_each(|v| *v /= sum);
                }
                softmax_rows(&mut got, len);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{n} rows of {len}");
            }
        }
    }

    /// The softmax against the f64 formula on scores spread from far below the largest (weights that underflow)
    /// to ties: weights above 1e-6 within 2e-7 of their size, smaller ones within 1e-5 of theirs plus 1e-30. (With
    /// the C library's `expf` the worst were 1.1e-7 and 3.9e-6; with `activations::exp`, 1.4e-7 and 3.9e-6: the
    /// small weights' error is the f32 difference `score - max`'s.)
    #[test]
    fn softmax_is_the_f64_formula() {
        let scores: Vec<f32> = (0..300).map(|i| ((i * 7919 % 613) as f32 - 500.0) * 0.37).collect();
        let max = scores.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let exps: Vec<f64> = scores.iter().map(|&v| (v as f64 - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        let mut got = scores.clone();
        softmax_rows(&mut got, scores.len());
        for (i, (&g, e)) in got.iter().zip(&exps).enumerate() {
            let want = e / total;
            let bound = if want > 1e-6 { 2e-7 * want } else { 1e-5 * want + 1e-30 };
            assert!((g as f64 - want).abs() <= bound, "weight {i}: {g} against {want}");
        }
    }

    /// A cache row of head `head` as f64 (an f16 cache's values widened).
    fn cache_row(view: &CacheView, head: usize, row: usize) -> Vec<f64> {
        match view {
            CacheView::F32(rows) => rows.row(head, row).iter().map(|&x| x as f64).collect(),
            CacheView::F16(rows) => rows.row(head, row).iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// Attention of one decoding step in f64, by the formulas, from its prepared queries (`queries`: rotated and
    /// scaled, head after head) and the sequence's cache at `layer` as it holds its first `len` rows: per head, the
    /// scores against the keys of its key-value head over the layer's window (the last `window` rows), Gemma 2's
    /// softcap, the softmax, and the values weighted by it. Beside each value, the sum of its terms' magnitudes,
    /// which scales its rounding in f32.
    fn attention_in_f64(
        config: &ModelConfig,
        layer: usize,
        queries: &[f32],
        cache: &KvCache,
        len: usize,
    ) -> Vec<(f64, f64)> {
        let (hd, group) = (config.head_dim, config.n_heads / config.n_kv_heads);
        let first = config.layers[layer].window.map_or(0, |w| len.saturating_sub(w));
        let (keys, values) = (cache.keys(), cache.values());
        let mut out = Vec::new();
        for h in 0..config.n_heads {
            let q = &queries[h * hd..(h + 1) * hd];
            let scores: Vec<f64> = (first..len)
                .map(|j| {
                    let s: f64 = cache_row(&keys, h / group, j).iter().zip(q).map(|(k, &q)| k * q as f64).sum();
                    config.attn_softcap.map_or(s, |cap| (s / cap as f64).tanh() * cap as f64)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let rows: Vec<Vec<f64>> = (first..len).map(|j| cache_row(&values, h / group, j)).collect();
            for d in 0..hd {
                let terms = exps.iter().zip(&rows).map(|(e, v)| e / total * v[d]);
                out.push((terms.clone().sum(), terms.map(f64::abs).sum()));
            }
        }
        out
    }

    /// The engine's random test models, one per architecture.
    const FIXTURES: [&str; 3] = ["tiny-gemma3", "tiny-gemma2", "tiny-llama"];

    /// Test model `name` on the CPU, its KV cache of `cache`'s type.
    fn fixture(name: &str, cache: DType) -> CpuModel {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let bytes = std::fs::read(fixtures.join(format!("{name}.gguf"))).unwrap();
        let mut reader = std::io::Cursor::new(bytes.as_slice());
        let gguf = GgufFile::read(&mut reader).unwrap();
        let options = LoadOptions { f16_cache: cache == DType::F16, ..Default::default() };
        CpuModel::load(&gguf, &mut reader, &options).unwrap()
    }

    /// One row's queries or keys (`x`, head after head) made ready for attention at `layer` and `position`, in f64
    /// by the formulas: each head's RMS norm where the layer has `norm` (Gemma 3), RoPE by angles `position *
    /// base^(-2i / head_dim) / factor_i` taken in f64 (halves or interleaved, as the model lays its heads out), then
    /// `scale`. Beside each value, the magnitude of the rotated pair it comes from, times `scale`, which scales its
    /// rounding in f32.
    fn made_ready_in_f64(
        model: &CpuModel,
        layer: usize,
        x: &[f32],
        norm: Option<&[f32]>,
        position: usize,
        scale: f32,
    ) -> Vec<(f64, f64)> {
        let c = &model.config;
        let (hd, half, base) = (c.head_dim, c.head_dim / 2, c.layers[layer].rope_base as f64);
        let mut out = Vec::new();
        for head in x.chunks_exact(hd) {
            let mut h: Vec<f64> = head.iter().map(|&v| v as f64).collect();
            if let Some(w) = norm {
                let mean = h.iter().map(|v| v * v).sum::<f64>() / hd as f64;
                let r = (mean + c.rms_eps as f64).sqrt();
                h.iter_mut().zip(w).for_each(|(v, &w)| *v = *v / r * w as f64);
            }
            let mut rotated = vec![(0f64, 0f64); hd];
            for i in 0..half {
                let factor = model.rope_factors.as_ref().map_or(1.0, |f| f[i] as f64);
                let angle = position as f64 * base.powf(-2.0 * i as f64 / hd as f64) / factor;
                let (a, b) = match c.rope_layout {
                    RopeLayout::Halves => (i, i + half),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let size = (h[a].abs() + h[b].abs()) * scale as f64;
                rotated[a] = ((h[a] * angle.cos() - h[b] * angle.sin()) * scale as f64, size);
                rotated[b] = ((h[a] * angle.sin() + h[b] * angle.cos()) * scale as f64, size);
            }
            out.extend(rotated);
        }
        out
    }

    /// A row's queries and keys made ready (`prepare_row`: Gemma 3's norms, RoPE, the queries' scale) against the
    /// formulas in f64 (`made_ready_in_f64`), on the fixtures' first and last layers (the Gemmas' local and global
    /// RoPE bases) at positions 0 to 63: each value within 1e-6 of its pair's magnitude. The largest seen: 2.7e-7
    /// (tiny-gemma3; the f32 tables' cos and sin are rounded from f64, the norm's sum of squares taken in f32).
    /// No fixture has RoPE frequency factors (a Llama 3 file's `rope_freqs`), so each model also runs with factors
    /// of its own, which the tables divide each frequency by.
    #[test]
    fn rows_are_made_ready_as_the_formulas_say() {
        for (name, with_factors) in FIXTURES.into_iter().flat_map(|name| [(name, false), (name, true)]) {
            let mut model = fixture(name, DType::F32);
            let c = model.config.clone();
            assert!(model.rope_factors.is_none(), "{name}: the fixtures have no RoPE factors");
            if with_factors {
                model.rope_factors = Some((0..c.head_dim / 2).map(|i| 1.0 + 0.37 * i as f32).collect());
            }
            let (q_dim, kv_dim, n_layers) = (c.q_dim(), c.kv_dim(), c.n_layers);
            for layer in [0, n_layers - 1] {
                model.rope.cover(c.layers[layer].rope_base, c.head_dim, model.rope_factors.as_deref(), 64, 64);
                for position in 0..64 {
                    // Other values at each position.
                    let raw_q = rows(1, q_dim + position)[position..].to_vec();
                    let raw_k = rows(1, kv_dim + 3 * position)[3 * position..].to_vec();
                    let (mut q, mut k) = (raw_q.clone(), raw_k.clone());
                    let norms = qk_norms(&model.layers[layer]);
                    model.prepare_row(layer, &mut q, &mut k, norms, position);
                    let want_q =
                        made_ready_in_f64(&model, layer, &raw_q, norms.map(|n| n.0), position, c.attention_scale);
                    let want_k = made_ready_in_f64(&model, layer, &raw_k, norms.map(|n| n.1), position, 1.0);
                    for (what, got, want) in [("query", &q, want_q), ("key", &k, want_k)] {
                        for (d, (&got, (want, size))) in got.iter().zip(want).enumerate() {
                            let off = (got as f64 - want).abs();
                            assert!(
                                off <= 1e-6 * size,
                                "{name}, factors {with_factors}, layer {layer}, position {position}, {what} value {d}: \
                                 {got} against {want} (a pair of {size})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A prompt's rows attend as decoding steps at their positions would, bit for bit: `attend` on 11 rows after a
    /// first 3 (on the pass's threads and on one), against `step_row` and `attend_heads_of` row by row. On the
    /// fixtures' first and last layers, with f32 and f16 caches: the Gemmas' first layers have 4-token sliding
    /// windows, which the rows cross (Gemma 2's with its softcap); the last layers are global.
    /// The steps themselves against the formulas in f64 (`attention_in_f64`), from their prepared queries and the
    /// cache's rows: each value within 4e-6 of its terms' magnitudes.
    #[test]
    fn a_prompts_rows_attend_as_decoding_steps() {
        for (name, cache) in FIXTURES.into_iter().flat_map(|name| [(name, DType::F32), (name, DType::F16)]) {
            let mut model = fixture(name, cache);
            let c = model.config.clone();
            let (q_dim, kv_dim, n_layers) = (c.q_dim(), c.kv_dim(), c.n_layers);
            // The first layer (the Gemmas' windowed) and the last (a global one in all three).
            assert_eq!(c.layers[0].window.is_some(), name != "tiny-llama", "{name}: the first layer's window");
            assert_eq!(c.layers[n_layers - 1].window, None, "{name}: the last layer's window");
            for layer in [0, n_layers - 1] {
                model.rope.cover(c.layers[layer].rope_base, c.head_dim, model.rope_factors.as_deref(), 14, 64);
                let values = |n: usize, d: usize, seed: usize| -> Vec<f32> {
                    (0..n * d).map(|i| (((i + seed) * 7919 % 1013) as f32 / 506.5 - 1.0) * 2.0).collect()
                };
                let (q, k, v) = (values(14, q_dim, 1), values(14, kv_dim, 2), values(14, kv_dim, 3));
                let rows = |x: &[f32], d: usize, r: std::ops::Range<usize>| x[r.start * d..r.end * d].to_vec();
                // Row by row, as decoding steps.
                let mut stepped = Sequence::new(n_layers, cache);
                let mut want = vec![0f32; 14 * q_dim];
                for (i, out) in want.chunks_exact_mut(q_dim).enumerate() {
                    let (qi, ki) = (rows(&q, q_dim, i..i + 1), rows(&k, kv_dim, i..i + 1));
                    let norms = super::qk_norms(&model.layers[layer]);
                    let step = model.step_row(layer, qi, ki, &v[i * kv_dim..(i + 1) * kv_dim], norms, &mut stepped);
                    let held = &stepped.caches[layer];
                    model.attend_heads_of(layer, 0..c.n_heads, &step.queries, held, step.len, out);
                    let reference = attention_in_f64(&c, layer, &step.queries, held, step.len);
                    for (d, (&got, (want, size))) in out.iter().zip(reference).enumerate() {
                        // The largest seen: 8.7e-7 of the terms' magnitudes (an f16 cache on tiny-gemma3).
                        assert!(
                            (got as f64 - want).abs() <= 4e-6 * size,
                            "{name}, {cache:?} cache, layer {layer}: row {i}, value {d}: {got} against {want} (terms \
                             of {size})"
                        );
                    }
                    stepped.position += 1;
                }
                for in_parallel in [true, false] {
                    let mut prompt = Sequence::new(n_layers, cache);
                    let mut got = vec![0f32; 14 * q_dim];
                    let (first, rest) = got.split_at_mut(3 * q_dim);
                    for (r, out) in [(0..3, first), (3..14, rest)] {
                        let (mut qr, mut kr) = (rows(&q, q_dim, r.clone()), rows(&k, kv_dim, r.clone()));
                        let vr = rows(&v, kv_dim, r.clone());
                        model.attend(layer, &mut qr, &mut kr, &vr, &mut prompt, in_parallel, out);
                        prompt.position += r.len();
                    }
                    let differs = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                    assert_eq!(
                        differs, None,
                        "first value that differs: {name}, {cache:?} cache, layer {layer}, in parallel: {in_parallel}"
                    );
                }
            }
        }
    }
}

//! One sequence's keys and values at one layer, in storage kept from one generation to the next: a reset only
//! forgets the rows (candle's `KvCache` dropped its storage, so each batch of an evaluation allocated and zeroed its
//! sixteen sequences' caches again, page faults included), and the storage grows in chunks of rows.
//!
//! The rows are plain values, head after head (`[heads, capacity, head_dim]`), which attention reads in place
//! (`CacheView`) and each new row, a decoding step's or a prompt's, is appended to directly (`append_row`). Held in
//! candle tensors, each step's row went through two tensors, a write lock and a copy per layer and sequence, and the
//! readers through a read lock each: in a batched SmolLM2 step, the sequences' new rows took half as long as their
//! attention.
//!
//! The rows are held in f32, or in f16 where the model was loaded so (`LoadOptions::f16_cache`, as llama.cpp keeps
//! its cache by default): half the bytes for attention to read, each key and value rounded once on its way in.

use candle_core::DType;
use half::f16;

use crate::quant::CacheValue;

/// Rows the storage grows by.
const CHUNK: usize = 256;

/// A layer's keys and values of one sequence.
pub struct KvCache {
    keys: Rows,
    values: Rows,
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new(DType::F32)
    }
}

impl KvCache {
    /// An empty cache that holds its rows in `dtype` (F32 or F16).
    pub fn new(dtype: DType) -> Self {
        Self { keys: Rows::new(dtype), values: Rows::new(dtype) }
    }

    /// Appends one position's key and value rows (`k`, `v`: `heads` rows of `head_dim` values, head after head),
    /// rounded to the cache's type.
    pub fn append_row(&mut self, k: &[f32], v: &[f32], heads: usize) {
        assert_eq!(v.len(), k.len(), "a key and a value per head");
        self.keys.append_row(heads, k);
        self.values.append_row(heads, v);
    }

    /// The keys held so far, read in place.
    pub fn keys(&self) -> CacheView<'_> {
        self.keys.view()
    }

    /// The values held so far, read in place.
    pub fn values(&self) -> CacheView<'_> {
        self.values.view()
    }

    /// Forgets the rows and keeps the storage.
    pub fn reset(&mut self) {
        self.keys.len = 0;
        self.values.len = 0;
    }
}

/// A cache's rows in their type, read in place.
pub enum CacheView<'a> {
    F32(CacheRows<'a, f32>),
    F16(CacheRows<'a, f16>),
}

/// A cache's rows of values of type `V`, read in place.
pub struct CacheRows<'a, V> {
    data: &'a [V],
    head_stride: usize,
    head_dim: usize,
}

impl<V> CacheRows<'_, V> {
    /// Row `row` of head `head` (`head_dim` values).
    pub fn row(&self, head: usize, row: usize) -> &[V] {
        let at = head * self.head_stride + row * self.head_dim;
        &self.data[at..at + self.head_dim]
    }
}

impl<V: CacheValue> CacheRows<'_, V> {
    /// Asks for the first of the rows `rows` of head `head` from memory (`CacheValue::rows_ahead` of them), ahead of a
    /// kernel that reads them in order. A head's keys, and its values, are a run of memory of their own; the
    /// kernels ask for the rows ahead of the one they read, but nothing asked for a run's first rows, and each run
    /// began with a wait on memory. Asked for one run earlier (a head's values before its scores, the next head's
    /// keys before the values' sums), a batched SmolLM2 step's attention kernels took 2-7% less time on an f32 cache
    /// read from memory and 9-16% less on an f16 one (`examples/attention_speed.rs`, passes alternated with and
    /// without, three runs; on caches the L3 cache held, from 5% less to 6% more), and whole batched steps 1.2-1.6%
    /// and 2.3-5.1% less (runs alternated step by step).
    pub fn prefetch_start(&self, head: usize, rows: std::ops::Range<usize>) {
        let first = rows.start;
        (first..rows.end.min(first + V::rows_ahead(self.head_dim))).for_each(|j| V::prefetch(self.row(head, j)));
    }
}

impl CacheView<'_> {
    /// `CacheRows::prefetch_start` in the cache's type.
    pub fn prefetch_start(&self, head: usize, rows: std::ops::Range<usize>) {
        match self {
            Self::F32(r) => r.prefetch_start(head, rows),
            Self::F16(r) => r.prefetch_start(head, rows),
        }
    }
}

/// The rows' storage, in the cache's type.
enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// Keys or values: `len` rows of each of `heads` heads, head h's row r at `(h * capacity + r) * head_dim`.
struct Rows {
    values: Values,
    heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl Rows {
    fn new(dtype: DType) -> Self {
        let values = match dtype {
            DType::F16 => Values::F16(Vec::new()),
            _ => Values::F32(Vec::new()),
        };
        Self { values, heads: 0, head_dim: 0, capacity: 0, len: 0 }
    }

    /// Appends one row of each of `heads` heads (`row`: head after head). One layer's heads and head size never
    /// change; only the rows grow.
    fn append_row(&mut self, heads: usize, row: &[f32]) {
        let head_dim = row.len() / heads.max(1);
        if self.capacity == 0 {
            (self.heads, self.head_dim) = (heads, head_dim);
        }
        assert_eq!((heads, head_dim), (self.heads, self.head_dim), "a layer's cache keeps its shape");
        if self.len == self.capacity {
            self.grow(self.capacity + CHUNK);
        }
        let (capacity, len) = (self.capacity, self.len);
        // Head h's new row, in the storage.
        let rows =
            row.chunks_exact(head_dim.max(1)).enumerate().map(|(h, part)| ((h * capacity + len) * head_dim, part));
        match &mut self.values {
            Values::F32(data) => rows.for_each(|(at, part)| data[at..at + head_dim].copy_from_slice(part)),
            Values::F16(data) => rows.for_each(|(at, part)| {
                data[at..at + head_dim].iter_mut().zip(part).for_each(|(out, &x)| *out = f16::from_f32(x))
            }),
        }
        self.len += 1;
    }

    /// Room for `capacity` rows of each head: a new storage, each head's rows copied to their new place.
    fn grow(&mut self, capacity: usize) {
        let (heads, head_dim, old, len) = (self.heads, self.head_dim, self.capacity, self.len);
        fn regrown<V: Copy + Default>(
            data: &[V],
            heads: usize,
            head_dim: usize,
            old: usize,
            new: usize,
            len: usize,
        ) -> Vec<V> {
            let mut grown = vec![V::default(); heads * new * head_dim];
            for h in 0..heads {
                let rows = &data[h * old * head_dim..(h * old + len) * head_dim];
                grown[h * new * head_dim..(h * new + len) * head_dim].copy_from_slice(rows);
            }
            grown
        }
        self.values = match &self.values {
            Values::F32(data) => Values::F32(regrown(data, heads, head_dim, old, capacity, len)),
            Values::F16(data) => Values::F16(regrown(data, heads, head_dim, old, capacity, len)),
        };
        self.capacity = capacity;
    }

    fn view(&self) -> CacheView<'_> {
        let (head_stride, head_dim) = (self.capacity * self.head_dim, self.head_dim);
        match &self.values {
            Values::F32(data) => CacheView::F32(CacheRows { data, head_stride, head_dim }),
            Values::F16(data) => CacheView::F16(CacheRows { data, head_stride, head_dim }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row a view reads, head after head.
    fn read(view: CacheView, heads: usize, len: usize) -> Vec<f32> {
        let CacheView::F32(rows) = view else { panic!("an f32 cache") };
        let mut all = Vec::new();
        for h in 0..heads {
            (0..len).for_each(|r| all.extend_from_slice(rows.row(h, r)));
        }
        all
    }

    /// Appending row by row across a growth gives the rows in order; a reset keeps the storage and starts over.
    #[test]
    fn appends_across_growth_and_resets_without_reallocating() {
        let mut cache = KvCache::default();
        for i in 0..300 {
            let row = [i as f32, (i + 1000) as f32];
            cache.append_row(&row, &row, 2);
        }
        assert_eq!(cache.keys.capacity, 2 * CHUNK);
        let want: Vec<f32> = (0..2).flat_map(|h| (0..300).map(move |i| (i + 1000 * h) as f32)).collect();
        assert_eq!(read(cache.keys(), 2, 300), want);
        assert_eq!(read(cache.values(), 2, 300), want);
        cache.reset();
        cache.append_row(&[7.0, 1007.0], &[7.0, 1007.0], 2);
        assert_eq!(read(cache.keys(), 2, 1), vec![7.0, 1007.0]);
        assert_eq!(cache.keys.capacity, 2 * CHUNK, "the storage was kept");
    }

    /// An f16 cache holds each appended value rounded to f16 once (to nearest, as `half` rounds): 2049 is halfway
    /// between f16's neighbours 2048 and 2050 and goes to the even one, 1/3 to its nearest f16.
    #[test]
    fn an_f16_cache_rounds_each_value_once() {
        let mut cache = KvCache::new(DType::F16);
        cache.append_row(&[2049.0, 1.0 / 3.0, -0.5], &[1.0, 2.0, 3.0], 1);
        cache.append_row(&[2051.0, 0.1, 7.0], &[4.0, 5.0, 6.0], 1);
        let f16 = |x: f32| half::f16::from_f32(x).to_f32();
        let want = [2048.0, f16(1.0 / 3.0), -0.5, 2052.0, f16(0.1), 7.0];
        let CacheView::F16(keys) = cache.keys() else { panic!("an f16 cache") };
        let held: Vec<f32> = (0..2).flat_map(|r| keys.row(0, r).iter().map(|x| x.to_f32())).collect();
        assert_eq!(held, want);
        assert_eq!(f16(1.0 / 3.0), 0.333_251_95, "1/3's nearest f16");
    }
}

//! One sequence's keys and values at one layer, in storage kept from one generation to the next. candle's
//! `KvCache` drops its storage on `reset`, so each batch of an evaluation allocated and zeroed its sixteen
//! sequences' caches again (about 190 MB for SmolLM2 at 256 tokens), page faults included; here a reset only
//! forgets the rows, and the storage grows in chunks as candle's does.
//!
//! The rows are held in f32, or in f16 where the model was loaded so (`LoadOptions::f16_cache`, as llama.cpp keeps
//! its cache by default): half the bytes for attention to read, each key and value rounded once on its way in.

use candle_core::{DType, Result, Tensor};

/// Rows the storage grows by.
const CHUNK: usize = 256;

/// Keys and values of shape [1, heads, rows, head_dim], rows along dimension 2.
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

    /// Appends `k` and `v` ([1, heads, n, head_dim], any float type: converted to the cache's); returns every row
    /// held so far, keys then values (views of the storage, not copies).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.keys.append(k)?, self.values.append(v)?))
    }

    /// Forgets the rows and keeps the storage.
    pub fn reset(&mut self) {
        self.keys.len = 0;
        self.values.len = 0;
    }
}

struct Rows {
    storage: Option<Tensor>,
    len: usize,
    dtype: DType,
}

impl Rows {
    fn new(dtype: DType) -> Self {
        Self { storage: None, len: 0, dtype }
    }

    fn append(&mut self, src: &Tensor) -> Result<Tensor> {
        let src = &src.to_dtype(self.dtype)?;
        const DIM: usize = 2;
        let n = src.dim(DIM)?;
        // One layer's heads and head size never change, so only the rows grow (`slice_set` refuses another shape).
        let capacity = self.storage.as_ref().map_or(Ok(0), |s| s.dim(DIM))?;
        if self.len + n > capacity {
            let mut shape = src.dims().to_vec();
            shape[DIM] = (self.len + n).next_multiple_of(CHUNK) - capacity;
            let more = Tensor::zeros(shape, self.dtype, src.device())?;
            self.storage = Some(match self.storage.take() {
                Some(old) => Tensor::cat(&[&old, &more], DIM)?,
                None => more,
            });
        }
        let storage = self.storage.as_ref().expect("allocated above");
        storage.slice_set(&src.contiguous()?, DIM, self.len)?;
        self.len += n;
        storage.narrow(DIM, 0, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(values: std::ops::Range<usize>, heads: usize) -> Tensor {
        let n = values.len();
        let data: Vec<f32> = (0..heads).flat_map(|h| values.clone().map(move |v| (v + 1000 * h) as f32)).collect();
        Tensor::from_vec(data, (1, heads, n, 1), &Device::Cpu).unwrap()
    }

    /// Appending in pieces across a growth gives the rows in order; a reset keeps the storage and starts over.
    #[test]
    fn appends_across_growth_and_resets_without_reallocating() {
        let mut cache = KvCache::default();
        let (k, _) = cache.append(&rows(0..200, 2), &rows(0..200, 2)).unwrap();
        assert_eq!(k.dims(), &[1, 2, 200, 1]);
        let (k, v) = cache.append(&rows(200..300, 2), &rows(200..300, 2)).unwrap();
        assert_eq!(k.dims(), &[1, 2, 300, 1]);
        assert_eq!(cache.keys.storage.as_ref().unwrap().dim(2).unwrap(), 2 * CHUNK);
        for t in [&k, &v] {
            let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want: Vec<f32> = (0..2).flat_map(|h| (0..300).map(move |i| (i + 1000 * h) as f32)).collect();
            assert_eq!(got, want);
        }
        cache.reset();
        let (again, _) = cache.append(&rows(7..8, 2), &rows(7..8, 2)).unwrap();
        assert_eq!(again.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![7.0, 1007.0]);
        // The view taken before the reset sees the new first row: the same storage, written in place.
        let old_view = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((old_view[0], old_view[300]), (7.0, 1007.0), "the storage was kept");
        assert_eq!(cache.keys.storage.as_ref().unwrap().dim(2).unwrap(), 2 * CHUNK);
    }

    /// An f16 cache holds each appended value rounded to f16 once (to nearest, as `half` rounds): 2049 is halfway
    /// between f16's neighbours 2048 and 2050 and goes to the even one, 1/3 to its nearest f16.
    #[test]
    fn an_f16_cache_rounds_each_value_once() {
        let mut cache = KvCache::new(DType::F16);
        let row = |x: [f32; 3]| Tensor::from_vec(x.to_vec(), (1, 1, 1, 3), &Device::Cpu).unwrap();
        cache.append(&row([2049.0, 1.0 / 3.0, -0.5]), &row([1.0, 2.0, 3.0])).unwrap();
        let (k, v) = cache.append(&row([2051.0, 0.1, 7.0]), &row([4.0, 5.0, 6.0])).unwrap();
        assert_eq!((k.dtype(), v.dtype()), (DType::F16, DType::F16));
        let got = k.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f16 = |x: f32| half::f16::from_f32(x).to_f32();
        assert_eq!(got, vec![2048.0, f16(1.0 / 3.0), -0.5, 2052.0, f16(0.1), 7.0]);
        assert_eq!(f16(1.0 / 3.0), 0.333_251_95, "1/3's nearest f16");
    }
}

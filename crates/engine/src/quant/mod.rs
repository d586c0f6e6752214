//! Quantized weight matrices multiplied by f32 activations, exactly: each GGUF block is decoded (`blocks`) and
//! dotted with the activations in f32, so the result is that of the float32 reference up to the
//! order of summation. candle's own `QMatMul` first rounds the activations to 8 bits, which moves Gemma's logits by
//! up to a quarter and flips greedy tokens; this is the engine's CPU product and the reference the GPU kernels
//! must match. The one departure is opt-in: `int8` and `int8_rows`, with the activations rounded to 8 bits.
//! `greedy_screen` uses 8-bit approximations (`int8_rows` natively, simd128's 16-bit products in wasm) to skip most
//! of the exact output product where only its highest row is wanted, and still gives that row.
//!
//! This file holds the matrix and its entry points; `bands` runs a product in bands of rows on the pass's threads,
//! and `f32_dots` holds the f32 dot products the exact kernels and attention share.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{EngineError, Result, TensorContext};
use crate::gguf::type_name;

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx2;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
pub(crate) mod avx512;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx512_blocks;
mod bands;
pub mod blocks;
mod cache_value;
mod f32_dots;
pub mod greedy_screen;
pub mod int8;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod int8_amx;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod int8_avx2;
pub mod int8_rows;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod int8_vnni;
pub mod lanes;
pub mod q4_1_lanes;
pub mod q8_0_lanes;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128;

use bands::products;
pub use blocks::dequantize;
pub use cache_value::CacheValue;
pub use f32_dots::{dot, dot4, dots_rows, portable_dot, portable_dot4};

/// A `rows x cols` matrix in a GGUF quantization; row r holds output r's weights.
#[derive(Clone)]
pub struct QuantMatrix {
    tensor: Arc<QTensor>,
    rows: usize,
    cols: usize,
    /// Whether decoding products round the activations to 8 bits (`int8`, opt-in, not exact).
    int8_activations: bool,
    /// The weights' type in the file, which decides the 8-bit products' coverage (`int8::supports`): in wasm,
    /// `for_decoding` stores Q5_0 rows as Q8_0 (`dtype`), and those still round as Q5_0's did.
    file_dtype: GgmlDType,
    /// For a Q8_0 matrix multiplied in `Form::Int8Rows`: its blocks' terms, made at the first such product
    /// (`int8_rows::Q8Terms`). Shared by clones.
    q8_terms: Arc<OnceLock<int8_rows::Q8Terms>>,
    /// For a Q8_0 matrix whose greedy picks are screened: each row's largest scale and their sum
    /// (`greedy_screen::RowScales`), made at the first screened step. Shared by clones.
    row_scales: Arc<OnceLock<greedy_screen::RowScales>>,
    /// Where the CPU has kernels for it: the rows repacked for single sequences' decoding steps (`for_decoding`).
    /// As large as the matrix; shared by clones.
    lanes: Option<Arc<DecodingLanes>>,
}

/// A matrix's rows in groups of sixteen, for the kernels with a weight row in each lane (`q4_1_lanes`,
/// `q8_0_lanes`).
enum DecodingLanes {
    Q4_1(q4_1_lanes::Q4_1Lanes),
    Q8_0(q8_0_lanes::Q8_0Lanes),
}

impl DecodingLanes {
    fn groups(&self) -> usize {
        match self {
            Self::Q4_1(lanes) => lanes.groups(),
            Self::Q8_0(lanes) => lanes.groups(),
        }
    }

    /// The 8-bit products of the groups `groups` with the activation rows of `x` on AMX tiles
    /// (`int8_amx::lanes_products`), bit for bit `int8_rows`' values (for Q4_1, `Q4_1Lanes::int8_group`'s): row i's
    /// values of the groups at `out + i * stride`, one group after another. Only where
    /// `int8_rows::tiles_available()`.
    ///
    /// # Safety
    /// As `int8_amx::lanes_products`: `out` has room for `x.rows` rows `stride` values apart, each of `16 *
    /// groups.len()` values, which nothing else touches meanwhile.
    unsafe fn int8_tiles(&self, groups: std::ops::Range<usize>, x: &int8_rows::TileRows, out: *mut f32, stride: usize) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        match self {
            Self::Q4_1(lanes) => int8_amx::lanes_products::<false>(&lanes.0, groups, x, out, stride),
            Self::Q8_0(lanes) => int8_amx::lanes_products::<true>(&lanes.0, groups, x, out, stride),
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        {
            let _ = (groups, x, out, stride);
            unreachable!("AMX tiles are x86-64's only (`int8_rows::tiles_available`)")
        }
    }
}

/// How the rows of a product may be computed (`QuantMatrix::matmul_each`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowForm {
    /// In the fastest form for their number (`matmul`): a row's numbers may depend on the rows beside it.
    Fastest,
    /// Each row exactly as it would be alone (`Form::Rows`): a batch with prompts shorter than
    /// `BATCH_INVARIANT_ROWS`, or prompts and decoding steps together.
    Independent,
    /// Each row as it would be alone, one decoding step of its sequence (`matmul_exact_rows`): with the
    /// activations rounded to 8 bits where the matrix was told to round them.
    IndependentSteps,
}

/// Whether `for_decoding` rewrites Q5_0 rows as Q8_0: in wasm, where spreading Q5_0's fifth bits costs more than
/// reading Q8_0's larger rows. Not natively: there, with AVX2, `batch_speed`'s exact rows of a 2048 x 640 matrix ran
/// at the same pace in either type (16 rows: 59 and 61 G multiply-adds a second on two threads).
const REWRITES_Q5_0: bool = cfg!(all(target_arch = "wasm32", target_feature = "simd128"));

/// The fewest rows of output one task computes: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 64;

/// Up to this many activation rows, blocks are decoded inside each dot product rather than once per band.
const FUSED_MAX_ROWS: usize = 2;

/// From this many activation rows on, `matmul` gives each row the same numbers whatever rows share the product
/// (`band_product`); with fewer, the fused form or `gemm`'s small kernels sum in another order.
pub const BATCH_INVARIANT_ROWS: usize = 5;

impl QuantMatrix {
    pub fn new(name: &str, tensor: Arc<QTensor>) -> Result<Self> {
        let dims = tensor.shape().dims().to_vec();
        let [rows, cols] = dims[..] else {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("expected a matrix, found shape {dims:?}"),
            });
        };
        let block = tensor.dtype().block_size();
        if cols % block != 0 {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("rows of {cols} values do not split into {} blocks of {block}", type_name(tensor.dtype())),
            });
        }
        Ok(Self {
            file_dtype: tensor.dtype(),
            tensor,
            rows,
            cols,
            int8_activations: false,
            q8_terms: Arc::default(),
            row_scales: Arc::default(),
            lanes: None,
        })
    }

    /// Products with the activations rounded to 8 bits and integer arithmetic, as llama.cpp computes them: faster,
    /// not exact. Single sequences' decoding steps (`matmul` of one or two activation rows) where `int8` covers the
    /// weight type; prompts (`matmul` of more rows) and batched steps (`matmul_exact_rows`) where `int8_rows` does.
    pub fn with_int8_activations(mut self, on: bool) -> Self {
        self.int8_activations = on;
        self
    }

    /// Repacks the rows as single sequences' decoding steps read them fastest, where the CPU has kernels for that
    /// (Q4_1 and Q8_0 with AVX-512, `q4_1_lanes` and `q8_0_lanes`): a copy of the matrix, made once, for weights
    /// read at every token. In wasm, Q5_0 rows are rewritten as Q8_0 rows of the same values instead
    /// (`blocks::q5_0_as_q8_0`): the same products bit for bit in 1.5x the memory, a single row's 1.6-2.1x faster
    /// in Chromium and batches of 4 or 8 rows as fast (docs/benchmarks.md, stop 49).
    pub fn for_decoding(mut self) -> Result<Self> {
        if REWRITES_Q5_0 && self.dtype() == GgmlDType::Q5_0 {
            let raw = self.raw()?;
            let q8 = crate::gguf::q8_0_matrix(self.rows, self.cols, |out| blocks::q5_0_as_q8_0(&raw, out))?;
            drop(raw);
            self.tensor = Arc::new(q8);
        }
        if !lanes::available() {
            return Ok(self);
        }
        let (raw, rows, cols) = (self.raw()?, self.rows, self.cols);
        let lanes = match self.dtype() {
            GgmlDType::Q4_1 => Some(DecodingLanes::Q4_1(q4_1_lanes::Q4_1Lanes::new(&raw, rows, cols))),
            GgmlDType::Q8_0 => Some(DecodingLanes::Q8_0(q8_0_lanes::Q8_0Lanes::new(&raw, rows, cols))),
            _ => None,
        };
        drop(raw);
        self.lanes = lanes.map(Arc::new);
        Ok(self)
    }

    /// The repacked rows where `form` reads them (`for_decoding`): a single sequence's exact products, and the 8-bit
    /// ones of Q4_1 where the CPU has VNNI, batched and prompts' too.
    fn lanes_for(&self, form: Form) -> Option<&DecodingLanes> {
        self.lanes.as_deref().filter(|lanes| match (form, lanes) {
            (Form::Fused, _) => true,
            (Form::Int8 | Form::Int8Rows, DecodingLanes::Q4_1(_)) => q4_1_lanes::int8_available(),
            (Form::Int8Tiles, _) => int8_rows::tiles_available(),
            _ => false,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlDType {
        self.tensor.dtype()
    }

    /// The raw GGUF blocks, row after row.
    pub fn raw(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        self.tensor.data().context("reading quantized blocks")
    }

    /// Bytes of one row's blocks.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype().block_size() * self.dtype().type_size()
    }

    /// Dequantizes rows `first..first + out.len() / cols` into `out`.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) -> Result<()> {
        let raw = self.raw()?;
        let count = out.len() / self.cols;
        let bytes = &raw[first * self.row_bytes()..(first + count) * self.row_bytes()];
        dequantize(self.dtype(), bytes, out);
        Ok(())
    }

    /// `x` is `m x cols` (row-major); returns `m x rows`: `out[i][r] = sum_c x[i][c] * W[r][c]`. The fastest
    /// form: blocks decoded inside the dot products for one or two rows, a decoded band and `gemm` for more.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(products(&[(self, self.fastest_form(x))], x)?.pop().expect("one product"))
    }

    /// As `matmul`, with each row's result independent of the other rows, so a sequence of a batched decoding step
    /// gets the same numbers in any batch. (`matmul`'s forms differ in the order of their sums, hence this one.)
    /// Exact: every weight row is decoded once to f32 and dotted with each activation row (`dot`). With 8-bit
    /// activations, where `int8_rows` covers the type: each weight row unpacked once to bytes and multiplied with
    /// sixteen activation rows at a time in integers.
    pub fn matmul_exact_rows(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(products(&[(self, self.rows_form())], x)?.pop().expect("one product"))
    }

    /// `matmul` or `matmul_exact_rows`, as `row_form` says, of several matrices of the same width on the same
    /// activations, in one parallel region: a layer's query, key and value, or its gate and up. One fork and join
    /// where there were one per matrix, and each product's numbers unchanged.
    pub fn matmul_each(matrices: &[&QuantMatrix], x: &[f32], row_form: RowForm) -> Result<Vec<Vec<f32>>> {
        let form = |q: &QuantMatrix| match row_form {
            RowForm::Fastest => q.fastest_form(x),
            RowForm::Independent => Form::Rows,
            RowForm::IndependentSteps => q.rows_form(),
        };
        products(&matrices.iter().map(|&q| (q, form(q))).collect::<Vec<_>>(), x)
    }

    /// `matmul`'s form for activations `x`.
    fn fastest_form(&self, x: &[f32]) -> Form {
        let m = x.len() / self.cols.max(1);
        if m > FUSED_MAX_ROWS {
            // Prompts: in 8-bit integers where asked (as llama.cpp computes them), else a decoded band and gemm.
            self.rows_form_if(Form::Band)
        } else if self.int8_activations && int8::supports(self.file_dtype) {
            Form::Int8
        } else {
            Form::Fused
        }
    }

    /// `matmul_exact_rows`' form.
    fn rows_form(&self) -> Form {
        self.rows_form_if(Form::Rows)
    }

    /// `Form::Int8Rows` where this matrix rounds its activations and `int8_rows` covers its type, else `exact`.
    /// In wasm, a batched step's rows rounded to 8 bits take `Form::Int8`, a decoding step's own form, row by row
    /// (`int8::dot_row` in simd128), and prompts stay with `gemm`: `int8_rows`' kernels are native, and its
    /// portable twin's fused multiply-adds are a library call in wasm, which has none.
    fn rows_form_if(&self, exact: Form) -> Form {
        if !self.int8_activations {
            return exact;
        }
        if cfg!(target_arch = "wasm32") {
            return match exact == Form::Rows && int8::supports(self.file_dtype) {
                true => Form::Int8,
                false => exact,
            };
        }
        match int8_rows::layout(self.dtype()).is_some() {
            true => Form::Int8Rows,
            false => exact,
        }
    }
}

/// How far ahead of the row being multiplied a decoding step's products ask for the weights (and attention's
/// kernels for the cache's rows, `CacheValue::rows_ahead`).
const PREFETCH_AHEAD_BYTES: usize = 2048;

/// Asks the CPU to bring the row that comes about `PREFETCH_AHEAD_BYTES` after row `r` of `rows` into its cache.
/// A decoding step reads each weight row once, in order; on a Xeon of this kind the hardware prefetcher fell
/// behind: the Q8_0 integer kernel read 5.8 GB/s of rows where a plain stream reads 14, and 10.5 with the rows
/// 1.5-3 KB ahead prefetched (docs/benchmarks.md). Into L1 or L2 measured the same.
#[inline(always)]
fn prefetch_row_ahead(rows: &[u8], r: usize, row_bytes: usize) {
    let ahead = r + PREFETCH_AHEAD_BYTES.div_ceil(row_bytes);
    prefetch(rows.get(ahead * row_bytes..(ahead + 1) * row_bytes));
}

/// Asks the CPU to bring `bytes` into its L2 cache, where it can be asked (x86-64); nothing elsewhere. Asked into L1,
/// four weight rows' lines at once stalled the core in a batched step: Gemma's 16-row output product took 21 ms
/// against 15 (`int8_rows`).
#[inline(always)]
fn prefetch(bytes: Option<&[u8]>) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.unwrap_or_default().chunks(64) {
        // SAFETY: a prefetch reads nothing the program sees and cannot fault; the address is inside `bytes`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// `prefetch` for rows of f32 values: the cache rows that decoding attention reads next (`dots_rows`,
/// `model::value_sums`).
#[inline(always)]
pub fn prefetch_values(values: &[f32]) {
    prefetch(Some(bytemuck::cast_slice(values)))
}

/// How a product is computed (all but `Int8`, `Int8Rows`, `Int8Tiles` and `Widened` exact up to the order of the
/// f32 sums).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// Blocks decoded inside each dot product: fastest for one or two activation rows.
    Fused,
    /// Each weight row decoded to f32 once, then dotted with every activation row alone.
    Rows,
    /// A band of weight rows decoded, then one `gemm` product: fastest for many rows.
    Band,
    /// Activations rounded to 8 bits, integer products (`int8`): not exact.
    Int8,
    /// `Rows` with the activations rounded to 8 bits (`int8_rows`): not exact.
    Int8Rows,
    /// `Int8Rows` on AMX tiles (`int8_amx`), the same values: for products of at least `TILE_MIN_ROWS` activation
    /// rows, where the CPU has the tiles.
    Int8Tiles,
    /// Q8_0 only: the activations rounded to 8 bits and widened to i16, each weight row against up to four of them
    /// at a time (`greedy_screen::rounded_dots`): the greedy screen's approximation in wasm. Not exact.
    Widened,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Quantizes a random matrix with candle, then checks the product against dequantize-then-multiply in f64,
    /// for one activation row (decoding inside the dot product) and several (decoding the band first).
    #[test]
    fn matmul_equals_dequantized_product_for_every_type() {
        let (n, k) = (70, 512); // n not a multiple of a task's rows; k a multiple of 256 for K-quants
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        for dtype in crate::gguf::SUPPORTED_TYPES {
            let q = Arc::new(QTensor::quantize(&wt, dtype).unwrap());
            let deq = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let qm = QuantMatrix::new("w", q).unwrap();
            for m in [1, FUSED_MAX_ROWS + 1, 7] {
                let x: Vec<f32> = (0..m * k).map(|i| (i * 104729 % 997) as f32 / 498.5 - 1.0).collect();
                let got = qm.matmul(&x).unwrap();
                // Exact rows: each row bit for bit what it gives alone, and as close to the reference.
                let exact = qm.matmul_exact_rows(&x).unwrap();
                for i in 0..m {
                    let alone = qm.matmul_exact_rows(&x[i * k..(i + 1) * k]).unwrap();
                    assert_eq!(&exact[i * n..(i + 1) * n], &alone[..], "{dtype:?}: row {i} of {m} rows");
                    for r in 0..n {
                        let want: f64 = (0..k).map(|c| x[i * k + c] as f64 * deq[r][c] as f64).sum();
                        let g = exact[i * n + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{dtype:?} exact [{i},{r}]: {g} vs {want}"
                        );
                    }
                }
                for i in 0..m {
                    for r in 0..n {
                        let want: f64 = (0..k).map(|c| x[i * k + c] as f64 * deq[r][c] as f64).sum();
                        let g = got[i * n + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{dtype:?} m={m} [{i},{r}]: {g} vs {want}"
                        );
                    }
                }
            }
            let mut row = vec![0f32; k];
            qm.dequantize_rows(n - 1, &mut row).unwrap();
            assert_eq!(row, deq[n - 1]);
        }
    }

    /// Several matrices in one parallel region give each product's numbers bit for bit, in every form: matrices
    /// of different heights and types, one with 8-bit activations and one without.
    #[test]
    fn matmul_each_equals_the_products_one_by_one() {
        let k = 256;
        let matrix = |n: usize, dtype, int8| {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
            let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            QuantMatrix::new("w", Arc::new(QTensor::quantize(&wt, dtype).unwrap())).unwrap().with_int8_activations(int8)
        };
        let ms =
            [matrix(70, GgmlDType::Q4_1, true), matrix(300, GgmlDType::Q8_0, false), matrix(5, GgmlDType::Q4K, false)];
        for m in [1, 2, 5] {
            let x: Vec<f32> = (0..m * k).map(|i| (i * 104729 % 997) as f32 / 498.5 - 1.0).collect();
            for row_form in [RowForm::Fastest, RowForm::IndependentSteps] {
                let each = QuantMatrix::matmul_each(&[&ms[0], &ms[1], &ms[2]], &x, row_form).unwrap();
                for (q, got) in ms.iter().zip(&each) {
                    let alone = match row_form {
                        RowForm::Fastest => q.matmul(&x),
                        _ => q.matmul_exact_rows(&x),
                    };
                    assert_eq!(got, &alone.unwrap(), "{:?}, {m} rows, {row_form:?}", q.dtype());
                }
            }
            // Independent rows without rounding: each row the exact rows' product, bit for bit, in 8-bit matrices
            // too.
            let each = QuantMatrix::matmul_each(&[&ms[0], &ms[1], &ms[2]], &x, RowForm::Independent).unwrap();
            for (q, got) in ms.iter().zip(&each) {
                let exact = q.clone().with_int8_activations(false).matmul_exact_rows(&x).unwrap();
                assert_eq!(got, &exact, "{:?}, {m} rows, independent", q.dtype());
            }
        }
    }

    /// With 8-bit activations, a batched step of 19 rows (on AMX tiles where the CPU has them, `TILE_MIN_ROWS`)
    /// gives each row the values it gets alone (the repacked rows' kernels, or `int8_rows`'), bit for bit: Q4_1 and
    /// Q8_0 repacked for decoding (two groups of sixteen and eight rows outside them), Q4_K from its blocks.
    #[test]
    fn int8_rows_of_a_large_batch_are_each_row_alone() {
        let (n, k, m) = (40, 512, 19);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let x: Vec<f32> =
            (0..m * k).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let q = QuantMatrix::new("w", Arc::new(QTensor::quantize(&wt, dtype).unwrap()))
                .unwrap()
                .with_int8_activations(true)
                .for_decoding()
                .unwrap();
            let all = q.matmul_exact_rows(&x).unwrap();
            for i in 0..m {
                let alone = q.matmul_exact_rows(&x[i * k..(i + 1) * k]).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&all[i * n..(i + 1) * n]), bits(&alone), "{dtype:?}: row {i}");
            }
        }
        eprintln!("AMX tiles: {}", if int8_rows::tiles_available() { "used" } else { "not on this CPU" });
    }

    /// Decoding's products (one or two activation rows) are `blocks::dot_row` bit for bit, also where the
    /// activations' block sums are taken once per product (Q4_1 and Q4_K in AVX2). Q4_1 and Q8_0 repacked for
    /// decoding (`for_decoding`, where the CPU has AVX-512): the rows of whole groups of sixteen are the lanes'
    /// portable twin's bit for bit, exactly and with 8-bit activations (where they are the batched step's, which
    /// reads them too), and the 6 rows past the last group `dot_row`'s.
    #[test]
    fn decoding_products_are_dot_row_bit_for_bit() {
        let (n, k) = (70, 768);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..2 * k).map(|i| (i * 104729 % 997) as f32 / 498.5 - 1.0).collect();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let plain = QuantMatrix::new("w", Arc::new(QTensor::quantize(&wt, dtype).unwrap())).unwrap();
            let repacked = plain.clone().for_decoding().unwrap();
            assert_eq!(repacked.lanes.is_some(), dtype != GgmlDType::Q4K && lanes::available());
            let raw = plain.raw().unwrap();
            for (qm, m) in [(&plain, 1), (&plain, 2), (&repacked, 1), (&repacked, 2)] {
                let got = qm.matmul(&x[..m * k]).unwrap();
                for i in 0..m {
                    let xi = &x[i * k..(i + 1) * k];
                    let mut want: Vec<f32> = (0..n)
                        .map(|r| blocks::dot_row(dtype, &raw[r * qm.row_bytes()..(r + 1) * qm.row_bytes()], xi))
                        .collect();
                    for g in 0..qm.lanes.as_ref().map_or(0, |lanes| lanes.groups()) {
                        let values: &mut [f32; 16] = (&mut want[16 * g..16 * g + 16]).try_into().unwrap();
                        match qm.lanes.as_deref() {
                            Some(DecodingLanes::Q4_1(lanes)) => {
                                lanes.portable_exact_group(g, xi, &q4_1_lanes::block_totals(xi), values)
                            }
                            Some(DecodingLanes::Q8_0(lanes)) => lanes.portable_exact_group(g, xi, values),
                            None => unreachable!(),
                        }
                    }
                    for r in 0..n {
                        let (got, want) = (got[i * n + r], want[r]);
                        assert_eq!(got.to_bits(), want.to_bits(), "{dtype:?} m={m} row {i} col {r}: {got} vs {want}");
                    }
                }
            }
            // With 8-bit activations: a single sequence's step is the batched step's, row for row, where the rows
            // are repacked and the CPU has VNNI.
            if dtype == GgmlDType::Q4_1 && q4_1_lanes::int8_available() {
                let int8 = repacked.with_int8_activations(true);
                let (alone, batched) = (int8.matmul(&x[..k]).unwrap(), int8.matmul_exact_rows(&x[..k]).unwrap());
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&alone[..64]), bits(&batched[..64]));
                // Batched steps on the repacked rows (the 6 past the last group in `int8_rows`) are the file's
                // blocks' batched products.
                let from_blocks = plain.clone().with_int8_activations(true).matmul_exact_rows(&x).unwrap();
                assert_eq!(bits(&int8.matmul_exact_rows(&x).unwrap()), bits(&from_blocks));
            }
        }
    }

    /// The prompt form (`matmul` of more than two rows: a decoded band and `gemm`) gives each row the same
    /// numbers whatever rows share the product, from five rows on. Before, a row of a 256-row matrix (64-row
    /// bands: gemm's small-product path, which split the 640 columns 512 + 128) changed once 65 rows shared it,
    /// and the last, shorter band of a 300-row matrix took gemm's horizontal kernel with five rows.
    #[test]
    fn band_rows_do_not_depend_on_the_batch() {
        for (n, k) in [(256, 640), (640, 576), (300, 1536), (64, 2048)] {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
            let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            let qm = QuantMatrix::new("w", Arc::new(QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap())).unwrap();
            let x: Vec<f32> = (0..150 * k).map(|i| (i * 104729 % 997) as f32 / 498.5 - 1.0).collect();
            let all = qm.matmul(&x).unwrap();
            for m in [BATCH_INVARIANT_ROWS, 8, 35, 64, 65, 100] {
                let part = qm.matmul(&x[..m * k]).unwrap();
                assert_eq!(part, all[..m * n], "{n}x{k}: the first {m} rows alone and among 150");
            }
        }
    }
}

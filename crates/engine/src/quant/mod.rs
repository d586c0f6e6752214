//! Quantized weight matrices multiplied by f32 activations, exactly: each GGUF block is decoded (`blocks`) and
//! dotted with the activations in f32, so the result is that of the float32 reference up to the
//! order of summation. candle's own `QMatMul` first rounds the activations to 8 bits, which moves Gemma's logits by
//! up to a quarter and flips greedy tokens; this is the engine's CPU product and the reference the GPU kernels
//! must match. The one departure is opt-in: `int8` and `int8_rows`, with the activations rounded to 8 bits.
//! `greedy_screen` uses 8-bit approximations (`int8_rows` natively, simd128's 16-bit products in wasm) to skip most
//! of the exact output product where only its highest row is wanted, and still gives that row.

use std::cell::RefCell;
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

pub use blocks::dequantize;
pub use cache_value::CacheValue;
use f32_dots::dot4_each;
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

    /// Rows `first..first + count` of the product (`rows`: their blocks) for the `m` activation rows of `x`
    /// (`prepared`: the same as the form reads them), written into `out`: the band's columns of the output.
    fn band(&self, rows: &[u8], x: &[f32], m: usize, prepared: &Prepared, form: Form, out: &mut Columns) {
        let (k, row_bytes, dtype, count) = (self.cols, self.row_bytes(), self.dtype(), out.count);
        match form {
            Form::Fused => {
                let grouped = self.each_group(out, form, |lanes, g, put| {
                    let mut values = [0f32; lanes::LANES];
                    for i in 0..m {
                        let xi = &x[i * k..(i + 1) * k];
                        match lanes {
                            DecodingLanes::Q4_1(lanes) => lanes.exact_group(g, xi, &prepared.totals[i], &mut values),
                            DecodingLanes::Q8_0(lanes) => lanes.exact_group(g, xi, &mut values),
                        }
                        put(i, &values);
                    }
                });
                for r in (0..count).filter(|r| !grouped.contains(r)) {
                    prefetch_row_ahead(rows, r, row_bytes);
                    let row = &rows[r * row_bytes..(r + 1) * row_bytes];
                    for i in 0..m {
                        let sums = prepared.block_sums.get(i).map(Vec::as_slice);
                        out.write(i, r, &[dot_row_with(dtype, row, &x[i * k..(i + 1) * k], sums)]);
                    }
                }
            }
            // In wasm: each weight row's blocks unpacked once for up to four activation rows and dotted there
            // (`simd128::dot_rows`), with the activations' block sums made once per product. Every value is then a
            // decoding step's fused product bit for bit, so a sequence gets in a batch what its own steps give it.
            // Against the rows decoded to f32 first, this is faster for one or two activation rows (the page's
            // generations) and up to 1.4x slower for eight on Q4_K; a page evaluation took as long either way
            // (docs/benchmarks.md, stops 43 and 44).
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Form::Rows if simd128::covers(dtype) => {
                // `M` activation rows from row `i` on, dotted with the weight row `row`, with their block sums where
                // the product made them (`sums`, else empty).
                fn dots<const M: usize>(
                    dtype: GgmlDType,
                    row: &[u8],
                    x: &[f32],
                    k: usize,
                    sums: &[Vec<f32>],
                    i: usize,
                ) -> [f32; M] {
                    let xs = std::array::from_fn(|j| &x[(i + j) * k..(i + j + 1) * k]);
                    let sums = (!sums.is_empty()).then(|| std::array::from_fn(|j| sums[i + j].as_slice()));
                    simd128::dot_rows(dtype, row, xs, sums).expect("a type simd128 covers")
                }
                for r in 0..count {
                    let row = &rows[r * row_bytes..(r + 1) * row_bytes];
                    let mut i = 0;
                    while i < m {
                        let values: &[f32] = match m - i {
                            1 => &dots::<1>(dtype, row, x, k, &prepared.block_sums, i),
                            2 => &dots::<2>(dtype, row, x, k, &prepared.block_sums, i),
                            3 => &dots::<3>(dtype, row, x, k, &prepared.block_sums, i),
                            _ => &dots::<4>(dtype, row, x, k, &prepared.block_sums, i),
                        };
                        for (j, value) in values.iter().enumerate() {
                            out.write(i + j, r, &[*value]);
                        }
                        i += values.len();
                    }
                }
            }
            Form::Rows => {
                // Four weight rows decoded at a time (they stay in the L1 cache), each activation row read
                // once against all four (`dot4_each`); the rows past a multiple of four one by one. `dot(x, w)` is
                // `dot(w, x)` bit for bit (the same products, summed in the same lanes), so every value is
                // `dot`'s of its own row and activation whatever the group sizes.
                let mut w = vec![0f32; 4 * k];
                let mut r = 0;
                while r < count {
                    let group = if r + 4 <= count { 4 } else { 1 };
                    // The group after next asked for from memory: decoding a group waited on its bytes (a fifth of
                    // an exact batched step on SmolLM2, as long with AVX-512 as with AVX2).
                    prefetch(rows.get((r + 8) * row_bytes..(r + 12) * row_bytes));
                    dequantize(dtype, &rows[r * row_bytes..(r + group) * row_bytes], &mut w[..group * k]);
                    if group == 4 {
                        let ws = [0, 1, 2, 3].map(|j| &w[j * k..(j + 1) * k]);
                        dot4_each(x, k, ws, |i, values| out.write(i, r, &values));
                    } else {
                        for i in 0..m {
                            out.write(i, r, &[dot(&w[..k], &x[i * k..(i + 1) * k])]);
                        }
                    }
                    r += group;
                }
            }
            Form::Int8 => {
                let grouped = self.each_group(out, form, |lanes, g, put| match lanes {
                    DecodingLanes::Q4_1(lanes) => lanes.int8_group_each(g, &prepared.rounded, put),
                    DecodingLanes::Q8_0(_) => unreachable!("Q8_0's decoding steps are exact (`lanes_for`)"),
                });
                for r in (0..count).filter(|r| !grouped.contains(r)) {
                    prefetch_row_ahead(rows, r, row_bytes);
                    let row = &rows[r * row_bytes..(r + 1) * row_bytes];
                    for (i, xi) in prepared.rounded.iter().enumerate() {
                        let widened = prepared.widened.get(i).map_or(&[][..], |w| &w[..]);
                        out.write(i, r, &[int8::dot_row_widened(dtype, row, xi, widened)]);
                    }
                }
            }
            Form::Int8Rows | Form::Int8Tiles => {
                let grouped = match self.lanes_for(form) {
                    // On tiles, the band's groups in one run of the kernel per sixteen activation rows.
                    Some(lanes) if form == Form::Int8Tiles => {
                        const LANES: usize = lanes::LANES;
                        let (groups, first) = (self.band_groups(out, lanes.groups()), out.first);
                        for (c, rows) in prepared.tile_rows.iter().enumerate() {
                            let at = groups.start * LANES - first;
                            let (start, stride) = out.block(LANES * c, rows.rows, at, groups.len() * LANES);
                            // SAFETY: `block` gave room for the tile's rows of the groups' values, in this band's
                            // columns.
                            unsafe { lanes.int8_tiles(groups.clone(), rows, start, stride) };
                        }
                        groups.start * LANES - first..groups.end * LANES - first
                    }
                    _ => self.each_group(out, form, |lanes, g, put| match lanes {
                        DecodingLanes::Q4_1(lanes) => lanes.int8_group_each(g, &prepared.rounded, put),
                        DecodingLanes::Q8_0(_) => unreachable!("Q8_0's batched steps read its blocks (`lanes_for`)"),
                    }),
                };
                // The rows outside whole groups, or all of them, in `int8_rows`.
                let parts = match grouped.is_empty() {
                    true => [0..count, count..count],
                    false => [0..grouped.start, grouped.end..count],
                };
                let len = int8_rows::layout(dtype).expect("the form of the types `int8_rows` covers").len;
                let lanes = if len == 16 { &prepared.lanes16 } else { &prepared.lanes32 };
                // Q8_0's terms (set for Q8_0 matrices only), for this band's blocks of 32.
                let q8 = self.q8_terms.get().map(|t| {
                    let blocks = out.first * k / 32..(out.first + count) * k / 32;
                    (&t.scale[blocks.clone()], &t.minus_128_sum[blocks])
                });
                for part in parts.into_iter().filter(|part| !part.is_empty()) {
                    let (first, part_rows) = (part.start, &rows[part.start * row_bytes..part.end * row_bytes]);
                    let q8 = q8.filter(|_| part == (0..count));
                    let tiles = form == Form::Int8Tiles;
                    int8_rows::band(dtype, part_rows, k, lanes, q8, tiles, |i, r, values| {
                        out.write(i, first + r, values)
                    });
                }
            }
            Form::Widened => {
                assert_eq!(dtype, GgmlDType::Q8_0, "the widened form is Q8_0's");
                // `M` activation rows from row `i` on against the weight row `row`, its blocks widened once for them.
                fn dots<const M: usize>(row: &[u8], prepared: &Prepared, i: usize) -> [f32; M] {
                    let xs = std::array::from_fn(|j| &prepared.widened[i + j][..]);
                    greedy_screen::rounded_dots(row, xs, std::array::from_fn(|j| &prepared.rounded[i + j].scale[..]))
                }
                for r in 0..count {
                    let row = &rows[r * row_bytes..(r + 1) * row_bytes];
                    let mut i = 0;
                    while i < m {
                        let values: &[f32] = match m - i {
                            1 => &dots::<1>(row, prepared, i),
                            2 => &dots::<2>(row, prepared, i),
                            3 => &dots::<3>(row, prepared, i),
                            _ => &dots::<4>(row, prepared, i),
                        };
                        for (j, value) in values.iter().enumerate() {
                            out.write(i + j, r, &[*value]);
                        }
                        i += values.len();
                    }
                }
            }
            Form::Band => {
                with_band_scratch(count * k, count * m, |w, out_t| {
                    dequantize(dtype, rows, w);
                    band_product(&prepared.transposed, w, m, k, count, out_t);
                    out.transpose_from(out_t);
                });
            }
        }
    }

    /// The whole groups of sixteen rows in the band `out` (of a matrix with `groups` whole groups).
    fn band_groups(&self, out: &Columns, groups: usize) -> std::ops::Range<usize> {
        const LANES: usize = lanes::LANES;
        out.first.div_ceil(LANES)..((out.first + out.count) / LANES).min(groups).max(out.first.div_ceil(LANES))
    }

    /// The band's whole groups of sixteen rows where `form` reads them repacked (`lanes_for`): `group(lanes, g,
    /// put)` for each group g, which puts each activation row's values. Returns the band's rows it wrote (the others
    /// are left to the form's other kernels).
    fn each_group(
        &self,
        out: &mut Columns,
        form: Form,
        group: impl Fn(&DecodingLanes, usize, &mut dyn FnMut(usize, &[f32; lanes::LANES])),
    ) -> std::ops::Range<usize> {
        const LANES: usize = lanes::LANES;
        let Some(lanes) = self.lanes_for(form) else {
            return 0..0;
        };
        let groups = self.band_groups(out, lanes.groups());
        for g in groups.clone() {
            let at = g * LANES - out.first;
            group(lanes, g, &mut |i, values| out.write(i, at, values));
        }
        groups.start * LANES - out.first..groups.end * LANES - out.first
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

/// The products of `jobs` (matrices of the same width, each in its form) on the activations `x`, in one parallel
/// region. Each task covers a band of one matrix's rows. Few activation rows (decoding): decode inside each dot
/// product. Many (a prompt): decode the band once into f32 and reuse it for every activation row.
fn products(jobs: &[(&QuantMatrix, Form)], x: &[f32]) -> Result<Vec<Vec<f32>>> {
    let Some(k) = jobs.first().map(|(q, _)| q.cols) else {
        return Ok(Vec::new());
    };
    if !x.len().is_multiple_of(k) || jobs.iter().any(|(q, _)| q.cols != k) {
        return Err(EngineError::InvalidRequest(format!("activations of {} values for rows of {k}", x.len())));
    }
    let m = x.len() / k;
    let tiles = m >= TILE_MIN_ROWS && int8_rows::tiles_available();
    let jobs: Vec<(&QuantMatrix, Form)> = jobs
        .iter()
        .map(|&(q, form)| (q, if form == Form::Int8Rows && tiles { Form::Int8Tiles } else { form }))
        .collect();
    let raws = jobs.iter().map(|(q, _)| q.raw()).collect::<Result<Vec<_>>>()?;
    // What the bands share, made once: the activation rows rounded to 8 bits, transposed for gemm, or their
    // block sums.
    let uses = |wanted: fn(&Form) -> bool| jobs.iter().any(|(_, form)| wanted(form));
    // The rows rounded one by one, for the forms that read them so (on AMX tiles, only the rows outside whole
    // groups of sixteen do). A batched step's rows are rounded on the pass's threads (each row alone, so the same
    // in any split).
    let reads_rounded = |(q, form): &(&QuantMatrix, Form)| match form {
        Form::Int8 | Form::Int8Rows | Form::Widened => true,
        Form::Int8Tiles => q.lanes_for(*form).is_none() || q.rows % lanes::LANES != 0,
        _ => false,
    };
    let rounded: Vec<int8::Q8Row> = match jobs.iter().any(reads_rounded) {
        true if m >= 4 => crate::team::map(m, |i| int8::quantize(&x[i * k..(i + 1) * k])),
        true => x.chunks_exact(k).map(int8::quantize).collect(),
        false => Vec::new(),
    };
    // The rounded rows in lanes, for the block lengths the `Int8Rows` jobs' types use.
    let lanes_of = |len| match jobs.iter().any(|(q, form)| {
        matches!(form, Form::Int8Rows | Form::Int8Tiles)
            && int8_rows::layout(q.dtype()).is_some_and(|l| l.len == len)
            && (q.lanes_for(*form).is_none() || q.rows % lanes::LANES != 0)
    }) {
        true => int8_rows::lanes(&rounded, len),
        false => Vec::new(),
    };
    let prepared = Prepared {
        widened: match uses(|form| *form == Form::Widened || (*form == Form::Int8 && int8::READS_WIDENED)) {
            true => rounded.iter().map(|row| int8::widen(&row.values)).collect(),
            false => Vec::new(),
        },
        tile_rows: match jobs.iter().any(|(q, form)| *form == Form::Int8Tiles && q.lanes_for(*form).is_some()) {
            true => x.chunks(lanes::LANES * k).map(|rows| int8_rows::TileRows::round(rows, k)).collect(),
            false => Vec::new(),
        },
        lanes16: lanes_of(16),
        lanes32: lanes_of(32),
        rounded,
        transposed: match uses(|form| matches!(form, Form::Band)) {
            true => transpose(x, m, k),
            false => Vec::new(),
        },
        block_sums: match jobs.iter().any(|(q, form)| reads_block_sums(*form) && takes_block_sums(q.dtype())) {
            true => x.chunks_exact(k).map(block_sums).collect(),
            false => Vec::new(),
        },
        totals: match jobs
            .iter()
            .any(|(q, form)| matches!(form, Form::Fused) && matches!(q.lanes_for(*form), Some(DecodingLanes::Q4_1(_))))
        {
            true => x.chunks_exact(k).map(q4_1_lanes::block_totals).collect(),
            false => Vec::new(),
        },
    };
    for ((q, form), raw) in jobs.iter().zip(&raws) {
        if matches!(form, Form::Int8Rows | Form::Int8Tiles)
            && q.dtype() == GgmlDType::Q8_0
            && int8_rows::reads_q8_0_in_place()
        {
            q.q8_terms.get_or_init(|| int8_rows::Q8Terms::new(raw));
        }
    }
    // A few bands per thread and matrix balance the load; more only add scheduling. The rows are shared out
    // evenly, so that no band is shorter than `ROWS_PER_TASK` (in the prompt form, a short band with few
    // activation rows would take gemm's small-product kernel, whose sums run in another order).
    let threads = rayon::current_num_threads();
    let tasks: Vec<(usize, usize, usize)> = (0..jobs.len())
        .flat_map(|j| {
            let rows = jobs[j].0.rows;
            let per = ROWS_PER_TASK.max(rows.div_ceil(4 * threads));
            let bands = (rows / per).max(1);
            // Bands of whole groups where the rows are read in groups of sixteen (`q4_1_lanes`, `int8_amx`).
            let grouped = jobs[j].0.lanes_for(jobs[j].1).is_some() || jobs[j].1 == Form::Int8Tiles;
            let step = if grouped { lanes::LANES } else { 1 };
            let start = move |b: usize| if b == bands { rows } else { b * rows / bands / step * step };
            apart(bands, threads).map(move |b| (j, start(b), start(b + 1) - start(b)))
        })
        .collect();
    // Each band writes its columns of its matrix's output rows in place: no band result to allocate, zero and
    // copy again (the copies were 2-4% of a Gemma prompt). The outputs are allocated without zeroing, and every
    // value is written once: the bands of a matrix cover its rows. Two bands side by side share the cache line at
    // their edge in every output row; `apart` keeps them from running at the same time.
    let mut outs: Vec<Vec<f32>> = jobs.iter().map(|(q, _)| Vec::with_capacity(m * q.rows)).collect();
    let starts: Vec<SendPtr> = outs.iter_mut().map(|out| SendPtr(out.as_mut_ptr())).collect();
    crate::team::for_each(tasks.len(), |task| {
        let (j, first, count) = tasks[task];
        let (q, form) = jobs[j];
        let rows = &raws[j][first * q.row_bytes()..(first + count) * q.row_bytes()];
        // SAFETY: `outs[j]` has room for `m x q.rows` values; this task alone writes columns `first..first +
        // count` (the tasks' bands of one matrix are disjoint), and nothing reads `outs` until the tasks end.
        let mut columns = unsafe { Columns::new(starts[j].0, q.rows, first, count, m) };
        q.band(rows, x, m, &prepared, form, &mut columns);
    });
    for (out, (q, _)) in outs.iter_mut().zip(jobs) {
        // SAFETY: every one of the values was written above (the bands partition the rows).
        unsafe { out.set_len(m * q.rows) };
    }
    Ok(outs)
}

/// The order in which a matrix's `bands` are handed to `threads` threads: 0, s, 2s, ... then 1, s + 1, ... (s =
/// `bands / threads`, rounded down, so that each round has a band for every thread), so that the bands that run at
/// the same time lie apart. Side by side, two bands running together passed the cache line at their edge back and
/// forth between the cores for every output row. Written from a 64-byte boundary and moved to the output's start
/// afterwards instead, a batched SmolLM2 `--int8` step took about 2% longer than in this order without the move
/// (alternated runs, docs/benchmarks.md).
fn apart(bands: usize, threads: usize) -> impl Iterator<Item = usize> {
    let stride = (bands / threads.max(1)).max(1);
    (0..stride).flat_map(move |first| (first..bands).step_by(stride))
}

/// A pointer the bands share across rayon's threads; each writes only its own columns (`Columns`).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to build `Columns` over disjoint columns of an output, written by one task each, and for the
// disjoint rows of `transpose`'s parts.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `offset` values on (a method, so that closures take the whole `SendPtr`, which is `Sync`).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Columns `first..first + count` of the `m` rows of an `m x n` row-major output: where one band writes.
struct Columns {
    start: *mut f32,
    n: usize,
    first: usize,
    count: usize,
    m: usize,
}

impl Columns {
    /// # Safety
    /// `start` points to room for `m x n` values that no one else reads or writes in columns `first..first +
    /// count` while this lives.
    unsafe fn new(start: *mut f32, n: usize, first: usize, count: usize, m: usize) -> Self {
        assert!(first + count <= n);
        Self { start, n, first, count, m }
    }

    /// Writes `values` into row `i` from the band's column `r` on. Through a pointer, not a slice: the output is
    /// not initialized until every band has written it, and no reference is made to memory before it is.
    fn write(&mut self, i: usize, r: usize, values: &[f32]) {
        assert!(i < self.m && r + values.len() <= self.count);
        // SAFETY: inside the room `new` was given, in this band's own columns (asserted above).
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.start.add(i * self.n + self.first + r), values.len())
        }
    }

    /// Where rows `i..i + rows` get their values from the band's column `r` on, for a kernel that stores `len`
    /// values of each itself: row `i + j`'s at the pointer plus `j` times the returned stride.
    fn block(&mut self, i: usize, rows: usize, r: usize, len: usize) -> (*mut f32, usize) {
        assert!(i + rows <= self.m && r + len <= self.count);
        // SAFETY: row i's column r is inside the room `new` was given (asserted above).
        (unsafe { self.start.add(i * self.n + self.first + r) }, self.n)
    }

    /// The band's values from `t`, their transpose (`count x m`, row-major; see `band_product`).
    fn transpose_from(&mut self, t: &[f32]) {
        assert_eq!(t.len(), self.count * self.m);
        // SAFETY: `transpose_raw` writes (i, r) at `i * n + r` from this band's first column, for i < m and
        // r < count: inside the room and the columns `new` was given.
        unsafe { transpose_raw(t, self.m, self.count, self.m, self.start.add(self.first), self.n) }
    }
}

/// The activations as some forms read them, made once per product and shared by its bands.
struct Prepared {
    /// Each row rounded to 8 bits (`Form::Int8`, `Form::Int8Rows`, `Form::Int8Tiles`, `Form::Widened`).
    rounded: Vec<int8::Q8Row>,
    /// The rounded rows' values widened to i16 (`Form::Widened`; in wasm, `Form::Int8`).
    widened: Vec<Vec<i16>>,
    /// The rounded rows sixteen at a time as AMX tiles read them (`Form::Int8Tiles` on repacked rows).
    tile_rows: Vec<int8_rows::TileRows>,
    /// The rounded rows in sets of sixteen lanes, in blocks of 16 and of 32 values (`Form::Int8Rows`).
    lanes16: Vec<int8_rows::Lanes>,
    lanes32: Vec<int8_rows::Lanes>,
    /// `k x m` (`Form::Band`, see `band_product`).
    transposed: Vec<f32>,
    /// Each row's block sums (the forms `reads_block_sums` names, on the types `takes_block_sums` names).
    block_sums: Vec<Vec<f32>>,
    /// Each row's block totals (`Form::Fused` on repacked rows, `q4_1_lanes::block_totals`).
    totals: Vec<Vec<f32>>,
}

/// Whether `dot_row_with` (and in wasm, the rows form) reuses an activation row's block sums for `dtype`: Q4_1
/// and Q4_K in AVX2 and in simd128.
fn takes_block_sums(dtype: GgmlDType) -> bool {
    cfg!(any(
        all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"),
        all(target_arch = "wasm32", target_feature = "simd128")
    )) && matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q4K)
}

/// Whether `form` reads the activations' block sums (for the types `takes_block_sums` names): the fused products,
/// and in wasm the rows form's too (`simd128::dot_rows`).
fn reads_block_sums(form: Form) -> bool {
    form == Form::Fused || (cfg!(all(target_arch = "wasm32", target_feature = "simd128")) && form == Form::Rows)
}

/// An activation row's block sums, for `dot_row_with`.
fn block_sums(x: &[f32]) -> Vec<f32> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return avx2::block_sums(x);
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return simd128::block_sums(x);
    #[cfg(not(any(
        all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"),
        all(target_arch = "wasm32", target_feature = "simd128")
    )))]
    unreachable!("block sums only where `takes_block_sums`: {}", x.len())
}

/// `blocks::dot_row`, bit for bit, taking the activations' block sums where they were made.
fn dot_row_with(dtype: GgmlDType, row: &[u8], x: &[f32], sums: Option<&[f32]>) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if let Some(dot) = sums.and_then(|sums| avx2::dot_row_with_sums(dtype, row, x, sums)) {
        return dot;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if let Some([dot]) = sums.and_then(|sums| simd128::dot_rows(dtype, row, [x], Some([sums]))) {
        return dot;
    }
    let _ = sums;
    blocks::dot_row(dtype, row, x)
}

/// The largest band scratch (in values) a thread keeps between products: a layer's bands fit; the bands of an
/// output matrix read for every token (scoring) are allocated and freed each time.
const KEPT_SCRATCH: usize = 1 << 20;

thread_local! {
    /// Each thread's decoded band and transposed result, kept between prompt products: allocating them afresh
    /// took a tenth of a Gemma prompt, in zeroing and in the kernel's page faults.
    static BAND_SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` on scratch slices of `w_len` and `out_len` values, whose contents are stale: `f` overwrites them.
fn with_band_scratch(w_len: usize, out_len: usize, f: impl FnOnce(&mut [f32], &mut [f32])) {
    if w_len + out_len > KEPT_SCRATCH {
        return f(&mut vec![0f32; w_len], &mut vec![0f32; out_len]);
    }
    BAND_SCRATCH.with(|scratch| {
        let (w, out) = &mut *scratch.borrow_mut();
        for (buffer, len) in [(&mut *w, w_len), (&mut *out, out_len)] {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
        }
        f(&mut w[..w_len], &mut out[..out_len])
    })
}

/// `x` (`m x k`, row-major) as `k x m`: on the pass's threads, a run of columns each, from
/// `PARALLEL_TRANSPOSE_VALUES` values on (on one thread, a 128-token prompt's transposes took 4% of a Gemma prefill
/// while the other threads waited).
fn transpose(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "m rows of k values");
    if x.is_empty() {
        return Vec::new();
    }
    let mut t = Vec::with_capacity(m * k);
    let start = SendPtr(t.as_mut_ptr());
    let columns = |part: usize| {
        let first = part * TRANSPOSED_COLUMNS_PER_TASK;
        let count = TRANSPOSED_COLUMNS_PER_TASK.min(k - first);
        // SAFETY: `t` has room for the `k x m` values; this part writes its rows `first..first + count` of them.
        unsafe { transpose_raw(&x[first..], k, m, count, start.at(first * m), m) }
    };
    let parts = k.div_ceil(TRANSPOSED_COLUMNS_PER_TASK);
    match m * k >= PARALLEL_TRANSPOSE_VALUES {
        true => crate::team::for_each(parts, columns),
        false => (0..parts).for_each(columns),
    }
    // SAFETY: the parts wrote all `k x m` values.
    unsafe { t.set_len(m * k) };
    t
}

/// Columns of `x` per task of `transpose` (a multiple of its tiles' 8).
const TRANSPOSED_COLUMNS_PER_TASK: usize = 64;

/// From this many values on, `transpose` runs on the pass's threads.
const PARALLEL_TRANSPOSE_VALUES: usize = 1 << 14;

/// Writes `x` (`rows x cols`, row-major, rows `x_stride` values apart) transposed: value (r, c) at `t + c * stride +
/// r`. In tiles of 8 x 8 (in registers with AVX2), so that the reads and the writes each stay within a few cache
/// lines, eight rows of `t` at a time, each written from start to end: the rows of a band's output are a whole output
/// row apart (8 KB for 2,048 columns), and hopping between them from tile to tile was slower (3.6% of a Gemma prompt's
/// samples against 2.0%; a value-by-value scatter down the columns had taken 4.5%).
///
/// # Safety
/// `t` must be valid for writes at `c * stride + r` for every r < rows and c < cols, and `stride >= rows`.
unsafe fn transpose_raw(x: &[f32], x_stride: usize, rows: usize, cols: usize, t: *mut f32, stride: usize) {
    const TILE: usize = 8;
    assert!(stride >= rows && cols <= x_stride && (rows == 0 || x.len() >= (rows - 1) * x_stride + cols));
    for c0 in (0..cols).step_by(TILE) {
        for r0 in (0..rows).step_by(TILE) {
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
            if r0 + TILE <= rows && c0 + TILE <= cols {
                avx2::transpose8x8(x[r0 * x_stride + c0..].as_ptr(), x_stride, t.add(c0 * stride + r0), stride);
                continue;
            }
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    *t.add(c * stride + r) = x[r * x_stride + c];
                }
            }
        }
    }
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

/// From this many activation rows on, `Form::Int8Rows` takes the tiles where the CPU has them: a tile's sums are
/// scaled for sixteen activation rows whatever their number. At 8 rows (`batch_speed 1 int8`, AMX on and off, two
/// runs each) the tiles ran Q8_0 at 101.8-102.9 G multiply-adds a second against 51.0-54.2 and Q4_K at 41.4-45.7
/// against 17.0-31.5, and Q4_1 about even (78.9-96.6 against 74.5-109.9); at 16 rows, 154-184 against 95-127 for
/// Q4_1.
const TILE_MIN_ROWS: usize = 8;

/// The longest run of columns one `gemm` call sums (see `band_product`).
const GEMM_DEPTH: usize = 512;

/// `out_t[r][i] = sum_c x[i][c] * w[r][c]` for `x_t` of `k x m` (`x` transposed), `w` of `count x k` and `out_t`
/// of `count x m`, all row-major: a plain f32 matrix product, handed to the `gemm` crate (cache-blocked SIMD
/// kernels; the parallelism is across bands, so none inside). The activations and the result are transposed
/// because gemm's kernels run down columns: laid out so, it reads the weights in place and copies the activations
/// (its packing) as whole vectors, where with row-major operands it gathered a transposed copy of each band's
/// weights value by value (a fifth of a Gemma prompt's time in `perf`).
///
/// The columns are summed in equal runs of at most `GEMM_DEPTH`, one `gemm` call each, the later ones added to
/// `out_t`. `gemm` splits a long sum into runs of its own, of a length that depends on the shape (512 for small
/// products, cache-derived otherwise), so that a row's numbers changed with the number of rows beside it; with
/// runs this short it never splits. With bands of at least `ROWS_PER_TASK` rows (`products`), gemm's horizontal
/// kernel (products of at most 256 values) is not used either, so every row's value is the same in any batch of
/// `BATCH_INVARIANT_ROWS` rows or more: batched prompt reads (`LanguageModel::read_prompts`) rely on it (test
/// `band_rows_do_not_depend_on_the_batch`).
fn band_product(x_t: &[f32], w: &[f32], m: usize, k: usize, count: usize, out_t: &mut [f32]) {
    assert!(x_t.len() == m * k && w.len() == count * k && out_t.len() == m * count);
    let depth = k.div_ceil(k.div_ceil(GEMM_DEPTH).max(1)).max(1);
    for (run, c0) in (0..k).step_by(depth).enumerate() {
        let width = depth.min(k - c0);
        // SAFETY: the three buffers have the sizes asserted above, and the strides below stay inside them:
        // dst (i, r) = out_t[r][i] at r * m + i; lhs (i, c) = x_t[c0 + c][i] at (c0 + c) * m + i; rhs (c, r) =
        // w[r][c0 + c] at r * k + c0 + c, for c < width <= k - c0.
        unsafe {
            gemm::gemm(
                m,
                count,
                width,
                out_t.as_mut_ptr(),
                m as isize,
                1,
                run > 0,
                x_t.as_ptr().add(c0 * m),
                m as isize,
                1,
                w.as_ptr().add(c0),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// `apart` hands out every band once, and the bands handed out one after another to the threads lie apart.
    #[test]
    fn bands_are_handed_out_once_each_and_apart() {
        assert_eq!(apart(8, 2).collect::<Vec<_>>(), [0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(apart(3, 2).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(apart(9, 2).collect::<Vec<_>>(), [0, 4, 8, 1, 5, 2, 6, 3, 7]);
        for bands in 1..40 {
            for threads in 1..9 {
                let order: Vec<usize> = apart(bands, threads).collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..bands).collect::<Vec<_>>(), "{bands} bands, {threads} threads");
                // With the four bands per thread `products` makes where the rows allow, no two of any `threads`
                // handed out in a row are side by side.
                if bands >= 4 * threads {
                    for window in order.windows(threads) {
                        for (i, a) in window.iter().enumerate() {
                            assert!(
                                window[i + 1..].iter().all(|b| a.abs_diff(*b) != 1),
                                "{order:?}, {threads} threads"
                            );
                        }
                    }
                }
            }
        }
    }

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

    #[test]
    fn transpose_by_hand_and_across_tiles() {
        // [[1, 2, 3], [4, 5, 6]] is [[1, 4], [2, 5], [3, 6]].
        assert_eq!(transpose(&[1., 2., 3., 4., 5., 6.], 2, 3), vec![1., 4., 2., 5., 3., 6.]);
        // No rows of many columns: nothing to write, no part past the end.
        assert!(transpose(&[], 0, 3 * TRANSPOSED_COLUMNS_PER_TASK).is_empty());
        // Shapes that end mid-tile, on one thread and (from `PARALLEL_TRANSPOSE_VALUES` on) in parts, the last of
        // them ending mid-tile too: every value lands at (c, r).
        for (rows, cols) in [(17, 33), (131, 3 * TRANSPOSED_COLUMNS_PER_TASK + 13)] {
            let x: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let t = transpose(&x, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], x[r * cols + c]);
                }
            }
        }
        const { assert!(131 * (3 * TRANSPOSED_COLUMNS_PER_TASK + 13) >= PARALLEL_TRANSPOSE_VALUES) };
        let (rows, cols) = (17, 33);
        let x: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let t = transpose(&x, rows, cols);
        // Into rows wider than the transpose (a band's columns of an output): the values at (c, r), nothing
        // written beside them.
        let stride = rows + 5;
        let mut wide = vec![-1f32; cols * stride];
        // SAFETY: `wide` holds `cols` rows of `stride` values.
        unsafe { transpose_raw(&x, cols, rows, cols, wide.as_mut_ptr(), stride) };
        for c in 0..cols {
            assert_eq!(wide[c * stride..c * stride + rows], t[c * rows..(c + 1) * rows]);
            assert!(wide[c * stride + rows..(c + 1) * stride].iter().all(|&v| v == -1.0), "row {c}'s padding");
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

//! How a product runs: the rows of each matrix cut into bands, handed to the pass's threads (`products`); the
//! activations prepared once for every band in the forms their kernels read (`Prepared`); each band computed in
//! its form (`QuantMatrix::band`: blocks decoded inside each dot product, rows decoded once, a band decoded for
//! `gemm`, or the 8-bit kernels) and written into its own columns of the output (`Columns`), or into a buffer of
//! its own and reduced there, on its thread (`reduce_bands`, for the greedy screen).

use std::cell::RefCell;

use super::f32_dots::dot4_each;
use super::*;

/// The products of `jobs` (matrices of the same width, each in its form) on the activations `x`, in one parallel
/// region. Each task covers a band of one matrix's rows. Few activation rows (decoding): decode inside each dot
/// product. Many (a prompt): decode the band once into f32 and reuse it for every activation row.
pub(super) fn products(jobs: &[(&QuantMatrix, Form)], x: &[f32]) -> Result<Vec<Vec<f32>>> {
    let Some(k) = jobs.first().map(|(q, _)| q.cols) else {
        return Ok(Vec::new());
    };
    if !x.len().is_multiple_of(k) || jobs.iter().any(|(q, _)| q.cols != k) {
        return Err(EngineError::InvalidRequest(format!("activations of {} values for rows of {k}", x.len())));
    }
    let m = x.len() / k;
    let jobs = on_tiles(jobs, m);
    let raws = jobs.iter().map(|(q, _)| q.raw()).collect::<Result<Vec<_>>>()?;
    let prepared = Prepared::new(&jobs, &raws, x, m, k);
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
        let mut columns = unsafe { Columns::new(starts[j].0, q.rows, first, count, m, first) };
        q.band(rows, x, m, &prepared, form, &mut columns);
    });
    for (out, (q, _)) in outs.iter_mut().zip(jobs) {
        // SAFETY: every one of the values was written above (the bands partition the rows).
        unsafe { out.set_len(m * q.rows) };
    }
    Ok(outs)
}

/// `jobs` with `Form::Int8Rows` run on AMX tiles where the CPU has them and there are enough activation rows.
fn on_tiles<'a>(jobs: &[(&'a QuantMatrix, Form)], m: usize) -> Vec<(&'a QuantMatrix, Form)> {
    let tiles = m >= TILE_MIN_ROWS && int8_rows::tiles_available();
    jobs.iter().map(|&(q, form)| (q, if form == Form::Int8Rows && tiles { Form::Int8Tiles } else { form })).collect()
}

/// The product of `q` in `form` with the activations `x`, band after band of `band_rows` rows (a multiple of
/// sixteen; the last band shorter), each band's values handed to `reduce(first, count, values)` on the thread that
/// made them, while they are in its cache (`values`: `m x count`, activation row i's from `i * count`). Returns what
/// `reduce` made of each band, in the rows' order. For products that are reduced as soon as they are made: the
/// greedy screen's approximations of Gemma's 262,144 rows, which `products` would write out whole (16 MB for a
/// batched step) for the screen to read back twice.
pub(super) fn reduce_bands<T: Send>(
    q: &QuantMatrix,
    form: Form,
    x: &[f32],
    band_rows: usize,
    reduce: impl Fn(usize, usize, &[f32]) -> T + Sync,
) -> Result<Vec<T>> {
    let k = q.cols;
    if !x.len().is_multiple_of(k) || !band_rows.is_multiple_of(lanes::LANES) || band_rows == 0 {
        return Err(EngineError::InvalidRequest(format!(
            "activations of {} values for rows of {k}, in bands of {band_rows} rows",
            x.len()
        )));
    }
    let m = x.len() / k;
    let jobs = on_tiles(&[(q, form)], m);
    let form = jobs[0].1;
    let raws = [q.raw()?];
    let prepared = Prepared::new(&jobs, &raws, x, m, k);
    let row_bytes = q.row_bytes();
    Ok(crate::team::map(q.rows.div_ceil(band_rows), |b| {
        let (first, count) = (b * band_rows, band_rows.min(q.rows - b * band_rows));
        REDUCED_BAND.with(|band| {
            let values = &mut *band.borrow_mut();
            if values.len() < m * count {
                values.resize(m * count, 0.0);
            }
            // SAFETY: `values` has room for `m x count` values, this task's alone.
            let mut columns = unsafe { Columns::new(values.as_mut_ptr(), count, first, count, m, 0) };
            q.band(&raws[0][first * row_bytes..(first + count) * row_bytes], x, m, &prepared, form, &mut columns);
            reduce(first, count, &values[..m * count])
        })
    }))
}

thread_local! {
    /// Each thread's band of `reduce_bands`, kept between products (a batched step's screen reduces 64 of them).
    static REDUCED_BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl QuantMatrix {
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

/// Where the band of a matrix's rows `first..first + count` writes its values: columns `column..column + count` of
/// the `m` rows of an `m x n` row-major output (the product's whole output, where `column` is `first`; or the
/// band's own, where it is 0).
struct Columns {
    start: *mut f32,
    n: usize,
    first: usize,
    count: usize,
    m: usize,
    column: usize,
}

impl Columns {
    /// # Safety
    /// `start` points to room for `m x n` values that no one else reads or writes in columns `column..column +
    /// count` while this lives.
    unsafe fn new(start: *mut f32, n: usize, first: usize, count: usize, m: usize, column: usize) -> Self {
        assert!(column + count <= n);
        Self { start, n, first, count, m, column }
    }

    /// Writes `values` into row `i` from the band's column `r` on. Through a pointer, not a slice: the output is
    /// not initialized until every band has written it, and no reference is made to memory before it is.
    fn write(&mut self, i: usize, r: usize, values: &[f32]) {
        assert!(i < self.m && r + values.len() <= self.count);
        // SAFETY: inside the room `new` was given, in this band's own columns (asserted above).
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.start.add(i * self.n + self.column + r), values.len())
        }
    }

    /// Where rows `i..i + rows` get their values from the band's column `r` on, for a kernel that stores `len`
    /// values of each itself: row `i + j`'s at the pointer plus `j` times the returned stride.
    fn block(&mut self, i: usize, rows: usize, r: usize, len: usize) -> (*mut f32, usize) {
        assert!(i + rows <= self.m && r + len <= self.count);
        // SAFETY: row i's column r is inside the room `new` was given (asserted above).
        (unsafe { self.start.add(i * self.n + self.column + r) }, self.n)
    }

    /// The band's values from `t`, their transpose (`count x m`, row-major; see `band_product`).
    fn transpose_from(&mut self, t: &[f32]) {
        assert_eq!(t.len(), self.count * self.m);
        // SAFETY: `transpose_raw` writes (i, r) at `i * n + r` from this band's first column, for i < m and
        // r < count: inside the room and the columns `new` was given.
        unsafe { transpose_raw(t, self.m, self.count, self.m, self.start.add(self.column), self.n) }
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

impl Prepared {
    /// What the bands of `jobs` share, made once: the activation rows rounded to 8 bits, transposed for gemm, or
    /// their block sums; and each Q8_0 matrix's terms for `int8_rows`, at its first such product.
    fn new(jobs: &[(&QuantMatrix, Form)], raws: &[std::borrow::Cow<'_, [u8]>], x: &[f32], m: usize, k: usize) -> Self {
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
            totals: match jobs.iter().any(|(q, form)| {
                matches!(form, Form::Fused) && matches!(q.lanes_for(*form), Some(DecodingLanes::Q4_1(_)))
            }) {
                true => x.chunks_exact(k).map(q4_1_lanes::block_totals).collect(),
                false => Vec::new(),
            },
        };
        for ((q, form), raw) in jobs.iter().zip(raws) {
            if matches!(form, Form::Int8Rows | Form::Int8Tiles)
                && q.dtype() == GgmlDType::Q8_0
                && int8_rows::reads_q8_0_in_place()
            {
                q.q8_terms.get_or_init(|| int8_rows::Q8Terms::new(raw));
            }
        }
        prepared
    }
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

    /// `reduce_bands` hands each band's values to `reduce` exactly as `products` writes them, bit for bit, with the
    /// band's first row and length: on Q8_0 rows (the screen's type, 100 rows: bands of 32 and a last of 4) and on
    /// Q4_1 rows repacked in groups of sixteen where the CPU reads them so (104 rows: whole groups in every band, and
    /// 8 rows outside them), in each form that runs here, for 1, 5 and 16 activation rows.
    #[test]
    fn reduced_bands_are_the_products_columns() {
        use std::sync::Arc;

        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};

        let k = 64;
        let matrix = |dtype, rows: usize, int8| {
            let w: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
            let t = Tensor::from_vec(w, (rows, k), &Device::Cpu).unwrap();
            QuantMatrix::new("w", Arc::new(QTensor::quantize(&t, dtype).unwrap()))
                .unwrap()
                .with_int8_activations(int8)
                .for_decoding()
                .unwrap()
        };
        let mut cases = vec![(matrix(GgmlDType::Q8_0, 100, false), Form::Rows)];
        cases.push((matrix(GgmlDType::Q8_0, 100, false), Form::Widened));
        if int8_rows::layout(GgmlDType::Q8_0).is_some() {
            cases.push((matrix(GgmlDType::Q8_0, 100, true), Form::Int8Rows));
        }
        cases.push((matrix(GgmlDType::Q4_1, 104, false), Form::Fused));
        cases.push((matrix(GgmlDType::Q4_1, 104, true), Form::Int8));
        cases.push((matrix(GgmlDType::Q4_1, 104, true), Form::Int8Rows));
        for (q, form) in &cases {
            for m in [1, 5, 16] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * 3.0).collect();
                let whole = products(&[(q, *form)], &x).unwrap().pop().unwrap();
                let n = q.rows;
                let bands = reduce_bands(q, *form, &x, 32, |first, count, values| {
                    for i in 0..m {
                        let (got, want) =
                            (&values[i * count..(i + 1) * count], &whole[i * n + first..i * n + first + count]);
                        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(got), bits(want), "{form:?}, {m} rows: row {i}, band from {first}");
                    }
                    (first, count)
                })
                .unwrap();
                let expected: Vec<(usize, usize)> = (0..n).step_by(32).map(|f| (f, 32.min(n - f))).collect();
                assert_eq!(bands, expected, "{form:?}: the bands in order, covering the rows");
            }
        }
        assert!(reduce_bands(&cases[0].0, Form::Rows, &[0.0; 64], 24, |_, _, _| ()).is_err(), "bands of 24 rows");
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
}

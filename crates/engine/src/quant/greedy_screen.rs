//! The greedy token of a decoding step (natively, a batched one) without the whole exact output product. The output
//! matrix is half of an exact batched step's arithmetic on Gemma 3 (262,144 rows), but greedy decoding wants one row
//! of it per sequence: the highest. So every row is first approximated with the activations rounded to 8 bits
//! (natively `Form::Int8Rows`, `int8_rows`' integer kernels, several times faster than f32; in wasm
//! `Form::Widened`, simd128's products of pairs of 16-bit integers in `rounded_dots`), each approximation with a
//! rigorous bound on its distance from the exact value; then only the rows whose bound reaches the best row's lower
//! bound are computed exactly, in the form `matmul_exact_rows` computes them, and the highest of those wins, the
//! first among equals. That is `sampler::argmax` of the exact product, token for token.
//!
//! The bound, for weight row r and activation row x (blocks b of 32 columns; the weights `d_b * q` with `|q| <=
//! 128`; x rounded to `s_b * p`):
//! - rounding x moves the value by `sum_b |d_b| * 128 * E_b`, where `E_b = sum_j |x_j - s_b * p_j|` over the block;
//! - each of the two computations in f32 is within `c * sum |terms|` of its real value, `c = (k + k/32 + 8) * 2^-24`
//!   (at most that many roundings touch a term, in any order of summation: the exact dot product's k, and the
//!   approximation's few per block, its scaling, and its sum over the blocks), and `sum |terms| <= sum_b |d_b| *
//!   128 * (S_b + E_b)` with `S_b = sum_j |x_j|`. A block's integer sum is exact in either approximation.
//!
//! So `|approximate - exact| <= 128 * sum_b |d_b| * T_b`, `T_b = E_b * (1 + c) + 2 * c * S_b`, computed in f64.
//! Each row's largest `|d_b|` and their sum, made once per matrix, bound every row cheaply (`RowScales`) and leave a
//! short list; the listed rows' bounds block by block shorten it.
//!
//! The approximations are never written out whole: each band of rows is reduced to its candidates on the thread
//! that made it, while it is in that thread's cache (`bands::reduce_bands`, `Candidates`), against a lower bound
//! the bands share and raise as they go (`SharedFloor`). Written out, a batched step's approximations of Gemma's
//! rows were 16 MB, read back twice (an `argmax`, then the bounds); a batched exact Gemma 3 step of 16 sequences
//! ran about 13% faster without them (docs/benchmarks.md, stop 51).

use std::sync::atomic::{AtomicU32, Ordering};

use candle_core::quantized::GgmlDType;

use super::bands::reduce_bands;
use super::{blocks::half, dequantize, dot, int8, int8_rows, Form, QuantMatrix};
use crate::error::Result;

/// Bytes of a Q8_0 block: an f16 scale, then 32 signed bytes.
const Q8_0_BLOCK_BYTES: usize = 34;

/// The largest magnitude of a Q8_0 weight (`i8::MIN`).
const LARGEST_WEIGHT: f64 = 128.0;

/// The form in which this build approximates every row, where its integer kernels beat the exact products:
/// `Form::Widened` in wasm (simd128), `Form::Int8Rows` natively with VNNI or AMX; `None` natively without them.
/// (`Form::Widened` runs natively too, in `rounded_dots`' portable twin, which only the tests use.)
fn screen_form() -> Option<Form> {
    if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
        Some(Form::Widened)
    } else if int8_rows::reads_q8_0_in_place() || int8_rows::tiles_available() {
        Some(Form::Int8Rows)
    } else {
        None
    }
}

/// The fewest activation rows a step screens in `form` (docs/benchmarks.md, stops 45 and 46). Natively, where the
/// CPU has AMX tiles, 8: the integer products run on the tiles from 8 rows on (`TILE_MIN_ROWS`), and below that a
/// Xeon's batched steps of 4 ran at 0.81-0.93 of the unscreened speed (of 8: 1.07-1.35), its f32 products being
/// fast. With VNNI and no tiles, 4: on an AMD EPYC, whose f32 products are slower, steps of 4 ran at 1.0-1.1x, of 2
/// at 0.96-1.0x. In wasm, `WIDENED_MIN_ROWS`.
fn min_rows(form: Form) -> usize {
    match form {
        Form::Widened => WIDENED_MIN_ROWS,
        _ if int8_rows::tiles_available() => 8,
        _ => 4,
    }
}

/// Whether a single activation row is screened here (in wasm, `WIDENED_MIN_ROWS`; natively never, its fewest rows
/// being 4 or 8): where it is, a single sequence's greedy step may pick through the screen too
/// (`CpuModel::forward_pick`).
pub fn screens_single_rows() -> bool {
    screen_form().is_some_and(|form| min_rows(form) <= 1)
}

/// `Form::Widened`'s fewest rows: every step. In Chromium on one thread (a 65,536 x 640 Q8_0 matrix,
/// best of 5 times 10), the screen took 0.92 of the exact rows form's time for one activation row, where both are
/// bound by reading the weights, and 0.61-0.65 for 2, 4 and 8; the page's greedy generations of one sequence on
/// Gemma 3 ran 1.18-1.25x faster with it (docs/benchmarks.md).
const WIDENED_MIN_ROWS: usize = 1;

/// f32 arithmetic's relative rounding, with room: the first filter's bounds are made and compared in f32, each
/// value a few roundings away from its real value (2^-24 each).
const F32_ROOM: f32 = 1.0 / (1 << 20) as f32;

/// For each row of a Q8_0 matrix, the largest `|scale|` of its blocks and their sum, rounded up: with an
/// activation row's largest `T_b` and their sum, a bound of the row's error in two multiplications (Hölder's
/// inequality), looser than the per-block bound but cheap enough for every row. Made once per matrix (8 bytes a
/// row), at its first screened step.
pub(super) struct RowScales {
    largest: Vec<f32>,
    total: Vec<f32>,
}

impl RowScales {
    fn new(raw: &[u8], row_bytes: usize) -> Self {
        let (mut largest, mut total) = (Vec::new(), Vec::new());
        for row in raw.chunks_exact(row_bytes) {
            let scales = row.chunks_exact(Q8_0_BLOCK_BYTES).map(|block| half(block, 0).abs());
            largest.push(scales.clone().fold(0f32, f32::max));
            total.push((scales.map(f64::from).sum::<f64>() as f32) * (1.0 + F32_ROOM));
        }
        Self { largest, total }
    }
}

/// One activation row's terms of the bound: `T_b` per block (see the module's doc).
fn bound_terms(x: &[f32]) -> Vec<f64> {
    let rounded = int8::quantize(x);
    let k = x.len();
    let c = (k + k / 32 + 8) as f64 * f64::powi(2.0, -24);
    x.chunks_exact(32)
        .zip(rounded.values.chunks_exact(32))
        .zip(&rounded.scale)
        .map(|((xb, pb), &s)| {
            let (mut e, mut total) = (0f64, 0f64);
            for (&x, &p) in xb.iter().zip(pb) {
                e += (x as f64 - s as f64 * p as f64).abs();
                total += (x as f64).abs();
            }
            e * (1.0 + c) + 2.0 * c * total
        })
        .collect()
}

/// `128 * sum_b scale_b * terms_b`, with room for this sum's own rounding.
fn bound(scales: impl Iterator<Item = f64>, terms: &[f64]) -> f64 {
    let sum: f64 = scales.zip(terms).map(|(d, t)| d * t).sum();
    LARGEST_WEIGHT * sum * (1.0 + 1e-9)
}

/// One Q8_0 weight row's approximation against each of `M` activation rows rounded to 8 bits (`int8::quantize`):
/// their values widened to i16 (`xs`) and their blocks' scales. In simd128 where the target has it
/// (`simd128::q8_0_rounded`), else in its portable twin, `portable_rounded_dot`; the same values bit for bit
/// (tests/wasm.rs).
pub fn rounded_dots<const M: usize>(row: &[u8], xs: [&[i16]; M], scales: [&[f32]; M]) -> [f32; M] {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return super::simd128::q8_0_rounded(row, xs, scales);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    std::array::from_fn(|j| portable_rounded_dot(row, xs[j], scales[j]))
}

/// `rounded_dots` for one activation row in portable Rust: per block, four i32 lanes, lane l summing values `8v +
/// 2l` and `8v + 2l + 1` over v in 0..4 (simd128's `i32x4_dot_i16x8` on the block's four vectors of eight), then
/// `lane += isum * (d * scale)` in f32; the four lanes summed in order at the end.
pub fn portable_rounded_dot(row: &[u8], x: &[i16], scale: &[f32]) -> f32 {
    let mut lanes = [0f32; 4];
    for (n, block) in row.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
        let step = half(block, 0) * scale[n];
        let (q, xb) = (&block[2..], &x[32 * n..32 * n + 32]);
        for (l, lane) in lanes.iter_mut().enumerate() {
            let isum: i32 = (0..4)
                .flat_map(|v| [8 * v + 2 * l, 8 * v + 2 * l + 1])
                .map(|j| i32::from(q[j] as i8) * i32::from(xb[j]))
                .sum();
            *lane += isum as f32 * step;
        }
    }
    lanes.iter().sum()
}

/// Rows per band of the screen's product (`reduce_bands`): a batched step's approximations of a band (16 activation
/// rows) take 256 KB, read back from the L2 cache.
const SCREEN_BAND_ROWS: usize = 4096;

/// The cheap bound of every row's error against one activation row (`RowScales`): with the activation row's `T_b`
/// summed and their largest, each rounded up.
struct CheapBound {
    terms_total: f32,
    terms_largest: f32,
}

impl CheapBound {
    fn new(terms: &[f64]) -> Self {
        let up = |t: f64| (t as f32) * (1.0 + F32_ROOM);
        Self { terms_total: up(terms.iter().sum()), terms_largest: up(terms.iter().copied().fold(0.0, f64::max)) }
    }

    /// How far the exact value of a row (its scales' `largest` and `total`) can be from its approximation `value`,
    /// with room for this bound's own rounding and the approximation's.
    fn bound(&self, value: f32, largest: f32, total: f32) -> f32 {
        let bound =
            LARGEST_WEIGHT as f32 * (largest * self.terms_total).min(total * self.terms_largest) * (1.0 + F32_ROOM);
        bound + value.abs() * F32_ROOM
    }

    /// Whether the row's upper bound reaches `floor`, a lower bound of the highest exact value.
    fn reaches(&self, value: f32, largest: f32, total: f32, floor: f32) -> bool {
        value + self.bound(value, largest, total) >= floor
    }
}

/// The highest lower bound of an exact value that the bands of one activation row have found so far, shared by the
/// threads: a band lists only the rows that reach it, and a band that runs late lists few. It only rises, and each
/// value is a lower bound of the highest exact value, so no row that can be the highest is ever left out. (Against
/// its own floor alone, each of Gemma's 64 bands listed some 250 rows of a batched step.)
struct SharedFloor(AtomicU32);

impl SharedFloor {
    fn new() -> Self {
        Self(AtomicU32::new(Self::key(f32::NEG_INFINITY)))
    }

    /// `floor`'s bits as an unsigned integer in the floats' order (for finite values and infinities).
    fn key(floor: f32) -> u32 {
        let bits = floor.to_bits();
        if bits >> 31 == 0 {
            bits | 1 << 31
        } else {
            !bits
        }
    }

    fn value(key: u32) -> f32 {
        f32::from_bits(if key >> 31 == 1 { key & !(1 << 31) } else { !key })
    }

    /// Raises the floor to `floor` where that is higher; returns the floor now.
    fn raise(&self, floor: f32) -> f32 {
        let key = Self::key(floor);
        Self::value(self.0.fetch_max(key, Ordering::Relaxed).max(key))
    }

    /// The floor now: once the bands are done, the highest of their floors.
    fn current(&self) -> f32 {
        Self::value(self.0.load(Ordering::Relaxed))
    }
}

/// What one band of the screen's approximations leaves for one activation row: the band's rows whose upper bounds
/// reach the shared floor once the band's highest lower bound of an exact value (rounded down) has raised it, with
/// their approximations. The highest of the bands' floors (the shared floor at the end) bounds the highest exact
/// value of all rows from below, so every row that can reach it is among some band's candidates.
struct Candidates {
    rows: Vec<(u32, f32)>,
}

impl Candidates {
    /// The candidates of rows `first..first + values.len()` with approximations `values`; `None` where one is not far
    /// from overflow (or not finite), so that an exact value could be infinite where its approximation is not.
    fn of_band(
        values: &[f32],
        first: usize,
        scales: &RowScales,
        cheap: &CheapBound,
        shared: &SharedFloor,
    ) -> Option<Self> {
        // Sixteen rows at a time in lanes of their own, so that the compiler vectorizes the bounds.
        const LANES: usize = 16;
        let at = first..first + values.len();
        let (largest, total) = (&scales.largest[at.clone()], &scales.total[at]);
        let groups = || values.chunks_exact(LANES).zip(largest.chunks_exact(LANES)).zip(total.chunks_exact(LANES));
        let whole = values.len() / LANES * LANES;
        let (mut floors, mut finite) = ([f32::NEG_INFINITY; LANES], [true; LANES]);
        for ((v, l), t) in groups() {
            for j in 0..LANES {
                // A comparison, not `f32::max`, whose care for NaN costs the loop two instructions a lane (a NaN is
                // caught by `finite`).
                let low = v[j] - cheap.bound(v[j], l[j], t[j]);
                floors[j] = if low > floors[j] { low } else { floors[j] };
                finite[j] &= v[j].abs() < 1e30;
            }
        }
        let mut floor = floors.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for r in whole..values.len() {
            floor = floor.max(values[r] - cheap.bound(values[r], largest[r], total[r]));
        }
        if !finite.iter().all(|&f| f) || !values[whole..].iter().all(|v| v.abs() < 1e30) {
            return None;
        }
        // Each bound is made again below rather than kept from above: kept (in a buffer per thread), a batched
        // Gemma 3 step took as long (`perf`: these lines about 2.5% of the samples either way; stop 52).
        let reached = shared.raise(floor - floor.abs() * F32_ROOM);
        let mut rows = Vec::new();
        for (g, ((v, l), t)) in groups().enumerate() {
            let reach: [bool; LANES] = std::array::from_fn(|j| cheap.reaches(v[j], l[j], t[j], reached));
            // Without `contains`' early exit, which the compiler leaves as a loop over the sixteen.
            if reach.iter().fold(false, |any, &r| any | r) {
                rows.extend((0..LANES).filter(|&j| reach[j]).map(|j| ((first + g * LANES + j) as u32, v[j])));
            }
        }
        let rest = (whole..values.len()).filter(|&r| cheap.reaches(values[r], largest[r], total[r], reached));
        rows.extend(rest.map(|r| ((first + r) as u32, values[r])));
        Some(Self { rows })
    }
}

impl QuantMatrix {
    /// For each activation row of `x`, the index `sampler::argmax` gives for that row of `matmul_exact_rows(x)`,
    /// from an 8-bit approximation of every row and exact products of the few that can still be the highest (see
    /// the module's doc). `None` where there is no screen for this matrix here (Q8_0 only, exact rows only, in wasm
    /// or with VNNI or AMX, `min_rows` activation rows at least) or the values are not all finite: the caller
    /// computes the product.
    pub fn argmax_exact_rows(&self, x: &[f32]) -> Result<Option<Vec<u32>>> {
        let Some(form) = screen_form() else { return Ok(None) };
        if x.len() < min_rows(form) * self.cols {
            return Ok(None);
        }
        Ok(self.screened_argmax(x, form)?.map(|picks| picks.into_iter().map(|(token, _)| token).collect()))
    }

    /// `argmax_exact_rows` approximated in `form`, with, for each activation row, how many rows it computed exactly.
    fn screened_argmax(&self, x: &[f32], form: Form) -> Result<Option<Vec<(u32, usize)>>> {
        let k = self.cols;
        if self.dtype() != GgmlDType::Q8_0 || self.rows_form() != Form::Rows || x.is_empty() {
            return Ok(None);
        }
        if !x.iter().all(|v| v.is_finite()) {
            return Ok(None);
        }
        let raw = self.raw()?;
        let row_bytes = self.row_bytes();
        let scales = self.row_scales.get_or_init(|| RowScales::new(&raw, row_bytes));
        let m = x.len() / k;
        let terms: Vec<Vec<f64>> = x.chunks_exact(k).map(bound_terms).collect();
        let cheap: Vec<CheapBound> = terms.iter().map(|terms| CheapBound::new(terms)).collect();
        // The approximations, band by band, each reduced to its candidates while it is in the cache.
        let band_rows = SCREEN_BAND_ROWS.min(self.rows.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(16));
        let floors: Vec<SharedFloor> = (0..m).map(|_| SharedFloor::new()).collect();
        let bands = reduce_bands(self, form, x, band_rows, |first, count, values| {
            (0..m)
                .map(|i| Candidates::of_band(&values[i * count..(i + 1) * count], first, scales, &cheap[i], &floors[i]))
                .collect::<Option<Vec<_>>>()
        })?;
        // Far from overflow, so that no exact value can be infinite where its approximation is finite.
        let Some(bands) = bands.into_iter().collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let scales_of = |r: usize| {
            let row = &raw[r * row_bytes..(r + 1) * row_bytes];
            row.chunks_exact(Q8_0_BLOCK_BYTES).map(|block| half(block, 0).abs() as f64)
        };
        let pick = |i: usize| {
            let xi = &x[i * k..(i + 1) * k];
            // The rows that can still reach the highest exact value, first by the shared floor (the bands' highest
            // lower bound).
            let floor = floors[i].current();
            let listed = bands.iter().flat_map(|band| &band[i].rows).filter(|&&(r, value)| {
                let r = r as usize;
                cheap[i].reaches(value, scales.largest[r], scales.total[r], floor)
            });
            // Then with their bounds block by block.
            let near: Vec<(usize, f64, f64)> =
                listed.map(|&(r, value)| (r as usize, value as f64, bound(scales_of(r as usize), &terms[i]))).collect();
            let floor = near.iter().map(|&(_, v, b)| v - b).fold(f64::NEG_INFINITY, f64::max);
            let mut best = (f32::NEG_INFINITY, 0u32);
            let mut exact = 0;
            let mut w = vec![0f32; k];
            for &(r, v, b) in &near {
                if v + b < floor {
                    continue;
                }
                exact += 1;
                let value = self.exact_row_value(&raw[r * row_bytes..(r + 1) * row_bytes], &mut w, xi);
                // `sampler::argmax`'s rule: strictly higher wins, so the first among equals stays.
                if value > best.0 {
                    best = (value, r as u32);
                }
            }
            (best.1, exact)
        };
        Ok(Some(if m > 1 { crate::team::map(m, pick) } else { vec![pick(0)] }))
    }

    /// Weight row `row`'s value against `x` as `matmul_exact_rows` computes it (`Form::Rows`): in wasm with simd128,
    /// `simd128::dot_rows` of the blocks; elsewhere the row decoded to f32 (into `w`), then `dot`.
    fn exact_row_value(&self, row: &[u8], w: &mut [f32], x: &[f32]) -> f32 {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        if let Some([value]) = super::simd128::dot_rows(self.dtype(), row, [x], None) {
            return value;
        }
        dequantize(self.dtype(), row, w);
        dot(w, x)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::quant::bands::products;
    use crate::sampler::argmax;

    /// A Q8_0 matrix of `rows x k` from `values` (row after row).
    fn q8_0(values: Vec<f32>, rows: usize, k: usize) -> QuantMatrix {
        let t = Tensor::from_vec(values, (rows, k), &Device::Cpu).unwrap();
        QuantMatrix::new("w", Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0).unwrap())).unwrap()
    }

    /// A deterministic value in [-1, 1) from a seed (splitmix64).
    fn noise(seed: u64) -> f32 {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Random weights and activation rows, with an outlier column in each activation row as models have.
    fn random_case(rows: usize, k: usize, m: usize) -> (Vec<f32>, Vec<f32>) {
        let mut x: Vec<f32> = (0..m * k).map(|i| noise(i as u64 + (1 << 40))).collect();
        for i in 0..m {
            x[i * k + (i * 37) % k] *= 40.0;
        }
        let w: Vec<f32> = (0..rows * k).map(|i| noise(i as u64) * 0.05).collect();
        (w, x)
    }

    /// The approximations this CPU can run: the widened one (its portable twin, natively) everywhere, and
    /// `int8_rows`' where the CPU has VNNI or AMX.
    fn approximations() -> Vec<Form> {
        let native = screen_form().filter(|&form| form == Form::Int8Rows);
        if native.is_none() {
            eprintln!("no VNNI or AMX on this CPU: only the widened approximation is tested");
        }
        native.into_iter().chain([Form::Widened]).collect()
    }

    /// Every row's approximation in `form` for every activation row of `x`.
    fn approximation(matrix: &QuantMatrix, x: &[f32], form: Form) -> Vec<f32> {
        products(&[(matrix, form)], x).unwrap().pop().unwrap()
    }

    /// The bound holds for every weight row and activation row: each 8-bit approximation is within it of the exact
    /// value.
    #[test]
    fn approximation_is_within_its_bound() {
        let (rows, k, m) = (2048, 256, 8);
        let (w, x) = random_case(rows, k, m);
        let matrix = q8_0(w, rows, k);
        let exact = matrix.matmul_exact_rows(&x).unwrap();
        let raw = matrix.raw().unwrap();
        for form in approximations() {
            let approximate = approximation(&matrix, &x, form);
            let mut tightest = 0f64;
            for i in 0..m {
                let terms = bound_terms(&x[i * k..(i + 1) * k]);
                for r in 0..rows {
                    let row = &raw[r * matrix.row_bytes()..(r + 1) * matrix.row_bytes()];
                    let b = bound(row.chunks_exact(Q8_0_BLOCK_BYTES).map(|blk| half(blk, 0).abs() as f64), &terms);
                    let error = (approximate[i * rows + r] as f64 - exact[i * rows + r] as f64).abs();
                    assert!(error <= b, "{form:?}: row {r}, activation row {i}: {error} beyond {b}");
                    tightest = tightest.max(error / b);
                }
            }
            // A bound far looser than the errors would screen nothing out.
            assert!(tightest > 0.2, "{form:?}: largest error {tightest} of the bound");
        }
    }

    /// The screen picks `argmax` of the exact product on every activation row, and computes few rows exactly, or it
    /// would save nothing. On random weights, where the highest rows are close. With planted rows that tie exactly:
    /// copies of a row made to win, one before it and one after. And with families of near ties where rounding the
    /// activations reorders the highest rows: copies of the winning row, each a weight step up or down in a few
    /// columns.
    #[test]
    fn screened_pick_is_argmax_of_the_exact_product() {
        let (rows, k, m) = (4096, 256, 12);
        let (mut w, x) = random_case(rows, k, m);
        let random = q8_0(w.clone(), rows, k);
        let copies_at = |i: usize| [100 + 300 * i, 40 + 300 * i, 200 + 300 * i];
        let family = |i: usize| 300 * i + 50..300 * i + 80;
        for i in 0..m {
            let own: Vec<f32> = x[i * k..(i + 1) * k].iter().map(|v| v * 0.03).collect();
            for r in copies_at(i).into_iter().chain(family(i)) {
                w[r * k..(r + 1) * k].copy_from_slice(&own);
            }
        }
        let planted = q8_0(w, rows, k);
        // The families' rows as the file holds them, then one weight step up or down in three columns each (never
        // a block's largest weight, so every other weight keeps its value).
        let mut stepped = vec![0f32; rows * k];
        planted.dequantize_rows(0, &mut stepped).unwrap();
        let raw = planted.raw().unwrap();
        for r in (0..m).flat_map(family) {
            for t in 0..3u64 {
                let j = (noise((r as u64) << 8 | t).abs() * k as f32) as usize % k;
                let d = half(&raw[r * planted.row_bytes() + j / 32 * Q8_0_BLOCK_BYTES..], 0);
                if (stepped[r * k + j] / d).abs() < 120.0 {
                    stepped[r * k + j] += d * noise((r as u64) << 8 | (t + 4)).signum();
                }
            }
        }
        let near_ties = q8_0(stepped, rows, k);
        for form in approximations() {
            let mut reordered = 0;
            for (name, matrix) in [("random", &random), ("planted", &planted), ("near ties", &near_ties)] {
                let exact = matrix.matmul_exact_rows(&x).unwrap();
                let approximate = approximation(matrix, &x, form);
                for count in [1, 3, m] {
                    let screened = matrix.screened_argmax(&x[..count * k], form).unwrap().expect("a Q8_0 screen");
                    for (i, &(token, computed)) in screened.iter().enumerate() {
                        let expected = argmax(&exact[i * rows..(i + 1) * rows]);
                        assert_eq!(token, expected, "{form:?}, {name}: activation row {i} of {count}");
                        assert!(
                            computed < rows / 50,
                            "{form:?}, {name}: activation row {i}: {computed} computed exactly"
                        );
                        if name == "planted" {
                            // The copy before the row made to win ties it and comes first.
                            assert_eq!(token as usize, copies_at(i)[1], "{form:?}: activation row {i}");
                        }
                        if count == m {
                            reordered += usize::from(argmax(&approximate[i * rows..(i + 1) * rows]) != expected);
                        }
                    }
                }
            }
            // The approximations' own highest rows are wrong somewhere, so the exact products decided.
            assert!(reordered > 0, "{form:?}: the approximations picked every row right");
        }
    }

    /// Rows past the last whole sixteen of the last band (a matrix of 1,000 rows: its last band ends in 8 such rows,
    /// whatever the thread count) are screened too: winners planted there, one a tie of an earlier row of the tail,
    /// are picked, and each pick is `argmax` of the exact product.
    #[test]
    fn screened_pick_reaches_the_rows_after_the_last_sixteen() {
        let (rows, k, m) = (1000, 64, 3);
        let (mut w, x) = random_case(rows, k, m);
        let planted = [(0, vec![993, 999]), (1, vec![995])];
        for (i, at) in &planted {
            let own: Vec<f32> = x[i * k..(i + 1) * k].iter().map(|v| v * 0.03).collect();
            for &r in at {
                w[r * k..(r + 1) * k].copy_from_slice(&own);
            }
        }
        let matrix = q8_0(w, rows, k);
        let exact = matrix.matmul_exact_rows(&x).unwrap();
        for form in approximations() {
            let screened = matrix.screened_argmax(&x, form).unwrap().expect("a Q8_0 screen");
            for (i, &(token, _)) in screened.iter().enumerate() {
                assert_eq!(token, argmax(&exact[i * rows..(i + 1) * rows]), "{form:?}: activation row {i}");
            }
            assert_eq!(screened[0].0, 993, "{form:?}: the first of the tied rows");
            assert_eq!(screened[1].0, 995, "{form:?}");
        }
    }

    /// The shared floor's keys order floats as they compare (both zeros alike), each key gives its float back bit
    /// for bit, and raising the floor keeps the highest value seen in any order.
    #[test]
    fn shared_floor_keeps_the_highest() {
        let ordered =
            [f32::NEG_INFINITY, -1e30, -2.5, -f32::MIN_POSITIVE, -0.0, 0.0, 1e-40, 1.0, 3.5e20, f32::INFINITY];
        for pair in ordered.windows(2) {
            let (a, b) = (SharedFloor::key(pair[0]), SharedFloor::key(pair[1]));
            assert!(a < b || (pair[0] == 0.0 && pair[1] == 0.0 && a + 1 == b), "{pair:?}");
        }
        for v in ordered {
            assert_eq!(SharedFloor::value(SharedFloor::key(v)).to_bits(), v.to_bits(), "{v}");
        }
        let shared = SharedFloor::new();
        let mut highest = f32::NEG_INFINITY;
        for v in [-3.0, -7.5, 2.0, -1e30, 1.5, 2.25, 0.0] {
            highest = highest.max(v);
            assert_eq!(shared.raise(v), highest, "after {v}");
        }
        assert_eq!(shared.current(), highest, "the floor at the end");
    }

    /// The exact value of one row is `matmul_exact_rows`' bit for bit, in both of `Form::Rows`' paths (rows in
    /// groups of four, and the rows after the last group).
    #[test]
    fn exact_row_value_is_the_rows_form() {
        let (rows, k, m) = (7, 64, 3);
        let w: Vec<f32> = (0..rows * k).map(|i| noise(i as u64 + 7)).collect();
        let x: Vec<f32> = (0..m * k).map(|i| noise(i as u64 + 99)).collect();
        let matrix = q8_0(w, rows, k);
        let exact = matrix.matmul_exact_rows(&x).unwrap();
        let raw = matrix.raw().unwrap();
        let mut buffer = vec![0f32; k];
        for i in 0..m {
            for r in 0..rows {
                let row = &raw[r * matrix.row_bytes()..(r + 1) * matrix.row_bytes()];
                let value = matrix.exact_row_value(row, &mut buffer, &x[i * k..(i + 1) * k]);
                assert_eq!(value.to_bits(), exact[i * rows + r].to_bits(), "row {r}, activation row {i}");
            }
        }
    }

    /// Fewer than `min_rows` activation rows, non-finite activations, another type, or 8-bit rows leave the product
    /// to the caller; the same step of enough finite rows on this matrix is screened (where the CPU can).
    #[test]
    fn no_screen_where_it_cannot_be_exact_or_gains_nothing() {
        let (rows, k) = (64, 64);
        let w: Vec<f32> = (0..rows * k).map(|i| noise(i as u64)).collect();
        let here = screen_form();
        let min_rows = here.map_or(8, min_rows);
        let mut x: Vec<f32> = (0..min_rows * k).map(|i| noise(i as u64 + 5)).collect();
        let matrix = q8_0(w.clone(), rows, k);
        assert_eq!(matrix.argmax_exact_rows(&x).unwrap().is_some(), here.is_some());
        assert!(matrix.argmax_exact_rows(&x[..(min_rows - 1) * k]).unwrap().is_none());
        x[3] = f32::NAN;
        assert!(matrix.argmax_exact_rows(&x).unwrap().is_none());
        x[3] = 0.5;
        let rounding = matrix.clone().with_int8_activations(true);
        assert!(rounding.argmax_exact_rows(&x).unwrap().is_none());
        let t = Tensor::from_vec(w, (rows, k), &Device::Cpu).unwrap();
        let q4 = QuantMatrix::new("w", Arc::new(QTensor::quantize(&t, GgmlDType::Q4_0).unwrap())).unwrap();
        assert!(q4.argmax_exact_rows(&x).unwrap().is_none());
    }
}

//! Batched decoding steps and prompts with 8-bit activations (`--int8`, opt-in, not exact): each weight row is
//! unpacked once to bytes and multiplied with up to sixteen activation rows at a time in integer arithmetic. With
//! AVX-512 VNNI (`int8_vnni`, detected at run time) one instruction sums four byte products into each of sixteen
//! lanes, one lane per activation row: four times the multiply-adds of an f32 instruction. A batched step at batch
//! 16, like a prompt, is bound by multiply-adds, not by reading the weights, so this is where 8-bit activations
//! pay; the exact batched product (`Form::Rows`) is bound by f32 multiply-adds, and five times a single
//! sequence's decoding would take nearly all of the machine's f32 peak (docs/benchmarks.md).
//!
//! A weight value is `scale * (byte - bias) + offset` per block of `len` values (`Layout`), and an activation
//! `dx * q` with q an 8-bit integer per block of 32 (`int8::quantize`, as single-sequence decoding rounds them).
//! The value of one (weight row, activation row) pair is, block after block:
//!
//! ```text
//! isum = sum_j byte[j] * q[j] - bias * sum_j q[j]        (exact, in i32)
//! acc  = fma(isum as f32, scale * dx, acc)
//! acc  = fma(offset, dx * sum_j q[j], acc)               (types with an offset: Q4_1, Q4_K)
//! ```
//!
//! The same operations whatever the other rows, so a sequence gets the same numbers in any batch. The portable
//! twin (`portable_rows`) does them in the same order with the same roundings (`f32::mul_add` is the fused
//! multiply-add), so it equals the VNNI kernel bit for bit and the results do not depend on the CPU.

use std::cell::RefCell;
use std::mem::take;

use candle_core::quantized::GgmlDType;

use super::blocks::{half, q6k_runs, scale_min_k4};
use super::int8::{self, Q8Row};

/// Activation rows per set of lanes (one 512-bit register of i32 or f32).
pub const LANES: usize = 16;

/// Weight rows the kernel multiplies at a time (their sums stay in registers).
pub const ROWS: usize = 4;

/// How a weight type's values are written as unsigned bytes: `scale * (byte - bias) + offset`, per block of `len`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub len: usize,
    pub bias: i32,
    pub offset: bool,
}

/// The layout of `dtype`, for the types of the offline models' weights; `None` for the others (the exact batched
/// product runs).
pub fn layout(dtype: GgmlDType) -> Option<Layout> {
    let (len, bias, offset) = match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q4K => (32, 0, true),
        GgmlDType::Q5_0 => (32, 16, false),
        GgmlDType::Q8_0 => (32, 128, false),
        // Q6_K scales every 16 values.
        GgmlDType::Q6K => (16, 32, false),
        _ => return None,
    };
    Some(Layout { len, bias, offset })
}

/// Weight rows unpacked to bytes, `k` values each: row r's values at `bytes[r * k..]`, its blocks' scales and
/// offsets at `scale[r * blocks..]` and `offset[r * blocks..]`.
pub struct Unpacked {
    pub k: usize,
    pub blocks: usize,
    pub bytes: Vec<u8>,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
}

impl Unpacked {
    fn new(rows: usize, k: usize, layout: Layout) -> Self {
        let blocks = k / layout.len;
        Self { k, blocks, bytes: vec![0; rows * k], scale: vec![0.0; rows * blocks], offset: vec![0.0; rows * blocks] }
    }

    /// Unpacks the weight row `row` (its GGUF blocks) into slot `r`.
    fn unpack(&mut self, dtype: GgmlDType, r: usize, row: &[u8]) {
        let (k, nb) = (self.k, self.blocks);
        unpack_bytes(dtype, row, &mut self.bytes[r * k..(r + 1) * k]);
        unpack_scales(dtype, row, &mut self.scale[r * nb..(r + 1) * nb], &mut self.offset[r * nb..(r + 1) * nb]);
    }
}

/// Each block's scale and offset (`Layout`) of a weight row, in AVX2 where compiled for the types with a scale in
/// every 32-value block (`int8_avx2::unpack_scales`, equal to the portable twin).
fn unpack_scales(dtype: GgmlDType, row: &[u8], scale: &mut [f32], offset: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if super::int8_avx2::unpack_scales(dtype, row, scale, offset) {
        return;
    }
    portable_unpack_scales(dtype, row, scale, offset)
}

/// `unpack_scales` in portable Rust.
pub fn portable_unpack_scales(dtype: GgmlDType, row: &[u8], scale: &mut [f32], offset: &mut [f32]) {
    match dtype {
        GgmlDType::Q4_1 => {
            for (b, w) in row.chunks_exact(20).enumerate() {
                (scale[b], offset[b]) = (half(w, 0), half(w, 2));
            }
        }
        GgmlDType::Q4K => {
            // Eight sub-blocks of 32: value = d * sc * q - dmin * m.
            for (sb, w) in row.chunks_exact(144).enumerate() {
                let (d, dmin) = (half(w, 0), half(w, 2));
                for i in 0..8 {
                    let (sc, m) = scale_min_k4(i, &w[4..16]);
                    (scale[8 * sb + i], offset[8 * sb + i]) = (d * sc as f32, -(dmin * m as f32));
                }
            }
        }
        GgmlDType::Q5_0 | GgmlDType::Q8_0 => {
            for (b, w) in row.chunks_exact(dtype.type_size()).enumerate() {
                scale[b] = half(w, 0);
            }
        }
        GgmlDType::Q6K => {
            // An i8 scale per 16 values.
            for (sb, w) in row.chunks_exact(210).enumerate() {
                let d = half(w, 208);
                for i in 0..16 {
                    scale[16 * sb + i] = d * w[192 + i] as i8 as f32;
                }
            }
        }
        other => unreachable!("int8_rows on {other:?}: callers check `layout` first"),
    }
}

/// A weight row's values as `Layout`'s unsigned bytes, in AVX2 where compiled (`int8_avx2::unpack_bytes`, which
/// must equal the portable twin).
fn unpack_bytes(dtype: GgmlDType, row: &[u8], out: &mut [u8]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if super::int8_avx2::unpack_bytes(dtype, row, out) {
        return;
    }
    portable_unpack_bytes(dtype, row, out)
}

/// `unpack_bytes` in portable Rust.
pub fn portable_unpack_bytes(dtype: GgmlDType, row: &[u8], out: &mut [u8]) {
    let blocks = row.chunks_exact(dtype.type_size()).zip(out.chunks_exact_mut(dtype.block_size()));
    match dtype {
        GgmlDType::Q4_1 => {
            for (w, out) in blocks {
                for j in 0..16 {
                    (out[j], out[j + 16]) = (w[4 + j] & 0x0f, w[4 + j] >> 4);
                }
            }
        }
        GgmlDType::Q4K => {
            // Sub-blocks 2p and 2p + 1 are the low and high nibbles of the same 32 bytes.
            for (w, out) in blocks {
                for (p, qs) in w[16..144].chunks_exact(32).enumerate() {
                    for j in 0..32 {
                        (out[64 * p + j], out[64 * p + 32 + j]) = (qs[j] & 0x0f, qs[j] >> 4);
                    }
                }
            }
        }
        GgmlDType::Q5_0 => {
            for (w, out) in blocks {
                let qh = u32::from_le_bytes([w[2], w[3], w[4], w[5]]);
                for j in 0..16 {
                    out[j] = (w[6 + j] & 0x0f) | ((((qh >> j) << 4) & 0x10) as u8);
                    out[j + 16] = (w[6 + j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
                }
            }
        }
        GgmlDType::Q8_0 => {
            for (w, out) in blocks {
                for j in 0..32 {
                    out[j] = w[2 + j] ^ 0x80; // q + 128 as a byte
                }
            }
        }
        GgmlDType::Q6K => {
            // Two halves of four runs of 32 (`blocks::q6k_runs`).
            for (w, out) in blocks {
                for h in 0..2 {
                    for (t, run) in q6k_runs(w, h).iter().enumerate() {
                        for j in 0..32 {
                            out[128 * h + 32 * t + j] = (run[j] + 32) as u8;
                        }
                    }
                }
            }
        }
        other => unreachable!("int8_rows on {other:?}: callers check `layout` first"),
    }
}

/// Up to `LANES` activation rows rounded to 8 bits, laid out for the kernel, per block of `len` values: lane i of
/// `values[b * len / 4 + g]` holds activation row i's four bytes `4g..4g + 4` of block b (an i32, little-endian),
/// and `scale`, `scaled_sum` and `sums` its scale, `scale * sum` and integer sum over the block. Unused lanes
/// are zeros.
pub struct Lanes {
    pub rows: usize,
    pub len: usize,
    pub values: Vec<[i32; LANES]>,
    /// `values` with 128 added to each byte (as unsigned bytes), for `Q8Terms`' kernel.
    pub offset_values: Vec<[i32; LANES]>,
    pub scale: Vec<[f32; LANES]>,
    pub scaled_sum: Vec<[f32; LANES]>,
    pub sums: Vec<[i32; LANES]>,
}

impl Lanes {
    /// `rounded` (at most `LANES` rows of the same length) in blocks of `len` (32, or 16).
    pub fn new(rounded: &[Q8Row], len: usize) -> Self {
        assert!(rounded.len() <= LANES && (len == 16 || len == 32));
        let k = rounded.first().map_or(0, |x| x.values.len());
        let blocks = k / len;
        let mut lanes = Lanes {
            rows: rounded.len(),
            len,
            values: vec![[0; LANES]; k / 4],
            offset_values: Vec::new(),
            scale: vec![[0.0; LANES]; blocks],
            scaled_sum: vec![[0.0; LANES]; blocks],
            sums: vec![[0; LANES]; blocks],
        };
        for (i, x) in rounded.iter().enumerate() {
            assert_eq!(x.values.len(), k);
            for (g, four) in x.values.chunks_exact(4).enumerate() {
                lanes.values[g][i] = i32::from_le_bytes([four[0] as u8, four[1] as u8, four[2] as u8, four[3] as u8]);
            }
            for b in 0..blocks {
                let sum: i32 = x.values[b * len..(b + 1) * len].iter().map(|&q| q as i32).sum();
                let dx = x.scale[b * len / 32];
                (lanes.scale[b][i], lanes.sums[b][i]) = (dx, sum);
                // For blocks of 32, the same value as `Q8Row::scaled_sum`.
                lanes.scaled_sum[b][i] = dx * sum as f32;
            }
        }
        lanes.offset_values = lanes.values.iter().map(|v| v.map(|four| four ^ 0x8080_8080_u32 as i32)).collect();
        lanes
    }
}

/// Up to `LANES` activation rows rounded to 8 bits, laid out as an AMX tile reads them (`int8_amx::lanes_tiles`):
/// row i's `k` values at `values[i * k..]`, its blocks' scales and `scale * sum` at `scale[i * blocks..]` and
/// `scaled_sum[i * blocks..]`. The rows past `rows`, up to `LANES`, are zeros.
pub struct TileRows {
    pub rows: usize,
    pub k: usize,
    pub values: Vec<i8>,
    pub scale: Vec<f32>,
    pub scaled_sum: Vec<f32>,
}

impl TileRows {
    /// The rows of `x` (at most `LANES` rows of `k` values, `k` a multiple of 32) rounded as `int8::quantize` rounds
    /// them, straight into the tile's layout. Rounded into rows of their own (three allocations each) and then
    /// copied here, the rounding and the products' other preparations took 13% of the products' time in a batched
    /// SmolLM2 step (timed in a scratch build); 10% so.
    pub fn round(x: &[f32], k: usize) -> Self {
        assert!(k > 0 && k.is_multiple_of(32) && x.len().is_multiple_of(k) && x.len() / k <= LANES);
        let (rows, blocks) = (x.len() / k, k / 32);
        let mut tile = TileRows::room(rows, k);
        let values = tile.values.chunks_exact_mut(k);
        let scales = tile.scale.chunks_exact_mut(blocks).zip(tile.scaled_sum.chunks_exact_mut(blocks));
        let rooms: Vec<_> = values.zip(scales).take(rows).collect();
        // On the pass's threads where there are several rows (each row alone, so the same in any split): the rows
        // come from a product whose bands each thread wrote part of. A few rows per task, two tasks per thread: a
        // row of 576 values rounds in about 0.15 us (`examples/q_speed.rs`), and on 2 cores each task of a job
        // costs about 0.1 us to hand out (a job of 16 empty tasks took 1.4-2.0 us). In tasks of several rows, a
        // batched SmolLM2 step ran 4-23% faster than with a task per row, in alternated runs (docs/benchmarks.md).
        if rows >= 4 {
            let per_task = rows.div_ceil(2 * rayon::current_num_threads());
            let mut rooms = rooms.into_iter();
            let tasks: Vec<Vec<_>> =
                (0..rows.div_ceil(per_task)).map(|_| rooms.by_ref().take(per_task).collect()).collect();
            crate::team::for_each_part(tasks, |t, task| {
                for (r, (values, (scale, scaled_sum))) in task.into_iter().enumerate() {
                    let i = t * per_task + r;
                    int8::quantize_into(&x[i * k..(i + 1) * k], values, scale, scaled_sum);
                }
            });
        } else {
            for (x, (values, (scale, scaled_sum))) in x.chunks_exact(k).zip(rooms) {
                int8::quantize_into(x, values, scale, scaled_sum);
            }
        }
        tile
    }
}

thread_local! {
    /// The storage of tiles dropped on this thread, for the next ones (`TileRows::room`).
    static SPARE_TILES: RefCell<Vec<TileStorage>> = const { RefCell::new(Vec::new()) };
}

/// A tile's values, scales and scaled sums.
type TileStorage = (Vec<i8>, Vec<f32>, Vec<f32>);

/// Tiles whose storage a thread keeps for the next ones: a product needs one per sixteen activation rows.
const SPARE_TILES_KEPT: usize = 4;

impl TileRows {
    /// Room for `rows` rows of `k` values, the rows past them zeros, in the storage of a tile dropped before on this
    /// thread where there is one: the rows to come are left as they are (`round` writes every value of them).
    /// Allocated and zeroed for every product on the pass's thread while the others waited, a batched SmolLM2
    /// `--int8` step took 1.2-1.5% longer (alternated runs, docs/benchmarks.md).
    fn room(rows: usize, k: usize) -> Self {
        let blocks = k / 32;
        // One of the same size where there is one: a step's products alternate between sizes (SmolLM2's layers'
        // input of 576 values, its down projection's 1,536).
        let (mut values, mut scale, mut scaled_sum) = SPARE_TILES
            .with_borrow_mut(|spare| {
                let same = spare.iter().rposition(|(values, ..)| values.len() == LANES * k);
                same.map(|i| spare.swap_remove(i)).or_else(|| spare.pop())
            })
            .unwrap_or_default();
        fit(&mut values, LANES * k, rows * k);
        fit(&mut scale, LANES * blocks, rows * blocks);
        fit(&mut scaled_sum, LANES * blocks, rows * blocks);
        TileRows { rows, k, values, scale, scaled_sum }
    }
}

/// `v` made `len` long with zeros from `kept` on, its values before `kept` left as they are where it was `len`
/// long already.
fn fit<T: Copy + Default>(v: &mut Vec<T>, len: usize, kept: usize) {
    if v.len() == len {
        v[kept..].fill(T::default());
    } else {
        v.clear();
        v.resize(len, T::default());
    }
}

impl Drop for TileRows {
    /// Keeps the storage for this thread's next tile.
    fn drop(&mut self) {
        let storage = (take(&mut self.values), take(&mut self.scale), take(&mut self.scaled_sum));
        // After the thread's own storage is gone (a tile dropped as the thread ends), the storage is freed.
        let _ = SPARE_TILES.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARE_TILES_KEPT {
                spare.push(storage);
            }
        });
    }
}

/// `out[r][i]` = the product of weight row `first + r` of `w` (for r < out.len()) and lane i of `x`, portably: the
/// twin of the VNNI kernel, which must equal it bit for bit.
pub fn portable_rows(w: &Unpacked, first: usize, x: &Lanes, layout: Layout, out: &mut [[f32; LANES]]) {
    let (k, nb, len) = (w.k, w.blocks, layout.len);
    for (r, out) in out.iter_mut().enumerate() {
        let (bytes, row) = (&w.bytes[(first + r) * k..(first + r + 1) * k], first + r);
        for (i, out) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..nb {
                let mut isum = -layout.bias * x.sums[b][i];
                for g in 0..len / 4 {
                    let four = x.values[b * len / 4 + g][i].to_le_bytes();
                    for t in 0..4 {
                        isum += bytes[b * len + 4 * g + t] as i32 * four[t] as i8 as i32;
                    }
                }
                acc = (isum as f32).mul_add(w.scale[row * nb + b] * x.scale[b][i], acc);
                if layout.offset {
                    acc = w.offset[row * nb + b].mul_add(x.scaled_sum[b][i], acc);
                }
            }
            *out = acc;
        }
    }
}

/// `out[r][i]` as `portable_rows`, by the fastest kernel this CPU has.
fn rows_product(w: &Unpacked, first: usize, x: &Lanes, layout: Layout, out: &mut [[f32; LANES]]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if super::int8_vnni::rows(w, first, x, layout, out) {
        return;
    }
    portable_rows(w, first, x, layout, out)
}

/// How many weight rows ahead of the ones being multiplied `band` asks the CPU to fetch from memory.
const AHEAD: usize = 4 * ROWS;

/// Weight rows whose results are gathered before they are written out (`band`): 32 KB for sixteen lanes.
const RUN: usize = 512;

/// A Q8_0 matrix's terms per block for the product straight from its blocks (`int8_vnni::q8_0_rows`): the scale
/// as f32, and minus 128 times the sum of the block's values. Q8_0's values are signed bytes already, so the kernel
/// multiplies them where they lie, with the activations offset by 128 (`Lanes::offset_values`); the sums take the
/// offset back out. Made once per matrix (8 bytes per 34-byte block), at its first batched step that rounds:
/// unpacking Gemma's 178 MB output matrix at every step took as long as its integer products.
pub struct Q8Terms {
    pub scale: Vec<f32>,
    pub minus_128_sum: Vec<i32>,
}

/// Whether `band` multiplies on AMX tiles where asked (`int8_amx::available`).
pub fn tiles_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return super::int8_amx::available();
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    false
}

/// Whether `band` reads Q8_0 blocks in place when given their `Q8Terms` (where the CPU has AVX-512 VNNI).
pub fn reads_q8_0_in_place() -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return super::int8_vnni::available();
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    false
}

impl Q8Terms {
    /// The terms of every block of `raw` (Q8_0 blocks).
    pub fn new(raw: &[u8]) -> Self {
        let blocks = raw.chunks_exact(34);
        let scale = blocks.clone().map(|w| half(w, 0)).collect();
        let minus_128_sum = blocks.map(|w| -128 * w[2..34].iter().map(|&q| q as i8 as i32).sum::<i32>()).collect();
        Self { scale, minus_128_sum }
    }
}

/// The product of the weight rows `rows` (GGUF blocks of `dtype`, `k` values a row) with the activation rows of
/// `chunks` (`LANES` at a time, in order): `put(i, r, values)` for activation row i and weight rows `r..r +
/// values.len()`. `q8`: for Q8_0, its `Q8Terms` for these rows' blocks, so that the kernel reads the blocks where
/// they lie (where the CPU has VNNI) instead of unpacking them. Q4_1 is read where it lies too, there. `tiles`:
/// sixteen weight rows at a time on AMX tiles where the CPU has them (`int8_amx`), the same values bit for bit.
pub fn band(
    dtype: GgmlDType,
    rows: &[u8],
    k: usize,
    chunks: &[Lanes],
    q8: Option<(&[f32], &[i32])>,
    tiles: bool,
    put: impl FnMut(usize, usize, &[f32]),
) {
    let layout = layout(dtype).expect("the batched 8-bit form runs only on the types `layout` covers");
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    let tiles = tiles && super::int8_amx::available();
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    let tiles = {
        let _ = tiles;
        false
    };
    let step = if tiles { TILE_ROWS } else { ROWS };
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if let (GgmlDType::Q8_0, Some((scale, sums)), true) = (dtype, q8, reads_q8_0_in_place()) {
        let nb = k / 32;
        assert!(scale.len() * row_bytes == rows.len() * nb && sums.len() == scale.len());
        return gather(rows, row_bytes, chunks, step, put, |r0, x, out| {
            let n = out.len();
            let (blocks, at) = (&rows[r0 * row_bytes..(r0 + n) * row_bytes], r0 * nb..(r0 + n) * nb);
            match (tiles, <&mut [[f32; LANES]; TILE_ROWS]>::try_from(&mut *out)) {
                (true, Ok(out)) => super::int8_amx::q8_0_rows(blocks, &scale[at], x, out),
                _ => super::int8_vnni::q8_0_rows(blocks, &scale[at.clone()], &sums[at], x, out),
            }
        });
    }
    let _ = q8;
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if dtype == GgmlDType::Q4_1 && super::int8_vnni::available() && !tiles {
        let nb = k / 32;
        return gather(rows, row_bytes, chunks, step, put, |r0, x, out| {
            super::int8_vnni::q4_1_rows(&rows[r0 * row_bytes..(r0 + out.len()) * row_bytes], nb, x, out)
        });
    }
    let mut w = Unpacked::new(step, k, layout);
    let mut unpacked = usize::MAX;
    gather(rows, row_bytes, chunks, step, put, |r0, x, out| {
        if unpacked != r0 {
            for r in 0..out.len() {
                w.unpack(dtype, r, &rows[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes]);
            }
            unpacked = r0;
        }
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if let (true, Ok(out)) = (tiles, <&mut [[f32; LANES]; TILE_ROWS]>::try_from(&mut *out)) {
            return super::int8_amx::rows(&w, x, layout, out);
        }
        for (r, out) in (0..out.len()).step_by(ROWS).zip(out.chunks_mut(ROWS)) {
            rows_product(&w, r, x, layout, out)
        }
    });
}

/// Weight rows per call of the tiles' kernel (`int8_amx`).
const TILE_ROWS: usize = 16;

/// `band`'s loop: `product(r0, x, out)` gives weight rows `r0..r0 + out.len()` (at most `step`: `ROWS`, or
/// `TILE_ROWS` on tiles) against the lanes `x`, each set of lanes in turn; the values are gathered `RUN` weight rows
/// at a time and `put` activation row by activation row. The rows `AHEAD` are asked for from memory meanwhile.
fn gather(
    rows: &[u8],
    row_bytes: usize,
    chunks: &[Lanes],
    step: usize,
    mut put: impl FnMut(usize, usize, &[f32]),
    mut product: impl FnMut(usize, &Lanes, &mut [[f32; LANES]]),
) {
    let count = rows.len() / row_bytes;
    let mut out = [[0f32; LANES]; TILE_ROWS];
    // Activation row i's values at `gathered[i * stride..]`: no longer than the band (a decoding step's bands are
    // often under a hundred rows, and zeroing 32 KB per band was 38 MB per SmolLM2 step).
    let stride = RUN.min(count);
    let mut gathered = vec![0f32; chunks.iter().map(|x| x.rows).sum::<usize>() * stride];
    for run in (0..count).step_by(RUN) {
        let length = RUN.min(count - run);
        for r0 in (run..run + length).step_by(step) {
            let n = step.min(run + length - r0);
            super::prefetch(rows.get((r0 + AHEAD) * row_bytes..(r0 + AHEAD + n) * row_bytes));
            let mut first_lane = 0;
            for x in chunks {
                product(r0, x, &mut out[..n]);
                // Lane i's values of the `n` weight rows are contiguous in `gathered`: one slice per lane, and
                // for whole groups of `ROWS` rows a fixed-size copy the compiler writes without a check per value.
                let at = |i: usize| (first_lane + i) * stride + r0 - run;
                #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
                if x.rows == LANES && super::int8_vnni::available() {
                    let whole = n / ROWS * ROWS;
                    for (q, four) in out[..whole].chunks_exact(ROWS).enumerate() {
                        let four: &[[f32; LANES]; ROWS] = four.try_into().expect("ROWS");
                        super::int8_vnni::write_lanes(four, &mut gathered[at(0) + ROWS * q..], stride);
                    }
                    for i in 0..x.rows {
                        for (r, v) in gathered[at(i) + whole..at(i) + n].iter_mut().enumerate() {
                            *v = out[whole + r][i];
                        }
                    }
                    first_lane += x.rows;
                    continue;
                }
                if n == ROWS {
                    for i in 0..x.rows {
                        let lane: &mut [f32; ROWS] = (&mut gathered[at(i)..at(i) + ROWS]).try_into().expect("ROWS");
                        *lane = std::array::from_fn(|r| out[r][i]);
                    }
                } else {
                    for i in 0..x.rows {
                        for (r, v) in gathered[at(i)..at(i) + n].iter_mut().enumerate() {
                            *v = out[r][i];
                        }
                    }
                }
                first_lane += x.rows;
            }
        }
        for (i, values) in gathered.chunks_exact(stride).enumerate() {
            put(i, run, &values[..length]);
        }
    }
}

/// `x`'s rows (rounded) in sets of `LANES`, for blocks of `len`.
pub fn lanes(rounded: &[Q8Row], len: usize) -> Vec<Lanes> {
    rounded.chunks(LANES).map(|chunk| Lanes::new(chunk, len)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{blocks::dequantize, int8};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    const TYPES: [GgmlDType; 5] = [GgmlDType::Q4_1, GgmlDType::Q4K, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q6K];

    /// Unpacking gives back candle's decoded weights: `scale * (byte - bias) + offset` is each value, to f32
    /// rounding; and the bytes this CPU unpacks are the portable twin's.
    #[test]
    fn unpacked_rows_are_the_decoded_weights() {
        // 512 values a row: 16 blocks of 32 for the vectorized scales' groups of four; 544 (17, one left over)
        // where the type allows it.
        for (n, k) in [(3, 512), (3, 544)] {
            unpacked_rows_of_width(n, k);
        }
    }

    fn unpacked_rows_of_width(n: usize, k: usize) {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        for dtype in TYPES.into_iter().filter(|t| k.is_multiple_of(t.block_size())) {
            let l = layout(dtype).unwrap();
            let raw = QTensor::quantize(&wt, dtype).unwrap().data().unwrap().to_vec();
            let row_bytes = raw.len() / n;
            let mut un = Unpacked::new(n, k, l);
            let mut deq = vec![0f32; k];
            for r in 0..n {
                un.unpack(dtype, r, &raw[r * row_bytes..(r + 1) * row_bytes]);
                let mut portable = vec![0u8; k];
                portable_unpack_bytes(dtype, &raw[r * row_bytes..(r + 1) * row_bytes], &mut portable);
                assert_eq!(un.bytes[r * k..(r + 1) * k], portable, "{dtype:?} row {r}: the bytes and the twin's");
                let (mut scale, mut offset) = (vec![0f32; un.blocks], vec![0f32; un.blocks]);
                portable_unpack_scales(dtype, &raw[r * row_bytes..(r + 1) * row_bytes], &mut scale, &mut offset);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let at = r * un.blocks..(r + 1) * un.blocks;
                assert_eq!(bits(&un.scale[at.clone()]), bits(&scale), "{dtype:?} row {r}: the scales and the twin's");
                assert_eq!(bits(&un.offset[at]), bits(&offset), "{dtype:?} row {r}: the offsets and the twin's");
                dequantize(dtype, &raw[r * row_bytes..(r + 1) * row_bytes], &mut deq);
                for c in 0..k {
                    let b = r * un.blocks + c / l.len;
                    let v = un.scale[b] * (un.bytes[r * k + c] as i32 - l.bias) as f32 + un.offset[b];
                    assert!((v - deq[c]).abs() <= 1e-6 * (1.0 + deq[c].abs()), "{dtype:?} [{r},{c}]: {v} vs {deq:?}");
                }
            }
        }
    }

    /// The batched product of every type: each value is, up to f32 rounding, the f64 product of the decoded
    /// weights with the rounded activations; each activation row's values are the same bit for bit among 1, 3,
    /// 16 or 19 rows (two sets of lanes); and the kernels this CPU runs equal the portable twin bit for bit, Q4_1
    /// and Q8_0 read from their blocks too, and on AMX tiles where the CPU has them (21 weight rows: a tile of
    /// sixteen, then a set of four and one row).
    #[test]
    fn batched_integer_products_equal_the_decoded_products_in_any_batch() {
        let (n, k) = (21, 512);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let m = 19;
        let x: Vec<f32> =
            (0..m * k).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * (1.0 + (i % 7) as f32)).collect();
        let rounded: Vec<Q8Row> = x.chunks_exact(k).map(int8::quantize).collect();
        for dtype in TYPES {
            let l = layout(dtype).unwrap();
            let raw = QTensor::quantize(&wt, dtype).unwrap().data().unwrap().to_vec();
            let row_bytes = raw.len() / n;
            let terms = Q8Terms::new(&raw);
            let q8 = (dtype == GgmlDType::Q8_0).then_some((&terms.scale[..], &terms.minus_128_sum[..]));
            let product_with = |rows: &[Q8Row], q8, tiles| {
                let mut out = vec![0f32; rows.len() * n];
                band(dtype, &raw, k, &lanes(rows, l.len), q8, tiles, |i, r, v| {
                    out[i * n + r..i * n + r + v.len()].copy_from_slice(v)
                });
                out
            };
            let product = |rows: &[Q8Row]| product_with(rows, q8, false);
            let all = product(&rounded);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // Q8_0 straight from its blocks (where the CPU has VNNI) is the unpacked product bit for bit, and so
            // are the tiles' products.
            assert_eq!(bits(&all), bits(&product_with(&rounded, None, false)), "{dtype:?}: with and without Q8Terms");
            for q8 in [q8, None] {
                let tiles = product_with(&rounded, q8, true);
                assert_eq!(bits(&all), bits(&tiles), "{dtype:?}: on tiles (Q8Terms: {})", q8.is_some());
            }
            eprintln!("{dtype:?}: AMX tiles {}", if tiles_available() { "compared" } else { "not on this CPU" });
            for i in 0..m {
                let rx: Vec<f64> =
                    (0..k).map(|c| rounded[i].scale[c / 32] as f64 * rounded[i].values[c] as f64).collect();
                let mut deq = vec![0f32; k];
                for r in 0..n {
                    dequantize(dtype, &raw[r * row_bytes..(r + 1) * row_bytes], &mut deq);
                    let want: f64 = deq.iter().zip(&rx).map(|(&a, &b)| a as f64 * b).sum();
                    let magnitude: f64 = deq.iter().zip(&rx).map(|(&a, &b)| (a as f64 * b).abs()).sum();
                    let got = all[i * n + r] as f64;
                    assert!((got - want).abs() <= 1e-5 * magnitude, "{dtype:?} [{i},{r}]: {got} vs {want}");
                }
                assert_eq!(product(&rounded[i..i + 1]), all[i * n..(i + 1) * n], "{dtype:?}: row {i} alone");
            }
            assert_eq!(product(&rounded[5..8]), all[5 * n..8 * n], "{dtype:?}: rows 5..8 together");
            let mut un = Unpacked::new(n, k, l);
            for r in 0..n {
                un.unpack(dtype, r, &raw[r * row_bytes..(r + 1) * row_bytes]);
            }
            // Whatever kernel `band` took (Q4_1 and Q8_0 read in place where the CPU has VNNI), the portable twin's
            // values bit for bit, in the sets of four rows and the three left over.
            for (set, x) in lanes(&rounded, l.len).iter().enumerate() {
                let mut twin = vec![[0f32; LANES]; n];
                portable_rows(&un, 0, x, l, &mut twin);
                for (r, twin) in twin.iter().enumerate() {
                    for i in 0..x.rows {
                        let got = all[(LANES * set + i) * n + r];
                        assert_eq!(got.to_bits(), twin[i].to_bits(), "{dtype:?} [{i},{r}]: band and the twin");
                    }
                }
            }
            for x in lanes(&rounded, l.len) {
                for first in [0, n - ROWS] {
                    let (mut fast, mut twin) = ([[0f32; LANES]; ROWS], [[0f32; LANES]; ROWS]);
                    rows_product(&un, first, &x, l, &mut fast);
                    portable_rows(&un, first, &x, l, &mut twin);
                    for r in 0..ROWS {
                        for i in 0..x.rows {
                            assert_eq!(fast[r][i].to_bits(), twin[r][i].to_bits(), "{dtype:?} [{i},{r}]");
                        }
                    }
                }
            }
        }
    }
}

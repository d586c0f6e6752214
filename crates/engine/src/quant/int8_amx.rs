//! The 8-bit products of batched steps and prompts (`--int8`) on AMX tiles, where the CPU has AMX-INT8 and the
//! kernel lets the program use it (detected at run time; Linux is asked for the tile registers once per process).
//! One tile instruction multiplies a block of sixteen weight rows with the same block of sixteen activation rows
//! into a tile of 16 x 16 integer sums: 8,192 multiply-adds, where a `vpdpbusd` does 64. Two forms:
//! - `rows` and `q8_0_rows`: `int8_rows::band`'s weight rows (unpacked to bytes, or Q8_0's blocks where they lie)
//!   times a tile of `Lanes::values` (whose layout is the one AMX wants), one row of sums per weight row;
//! - `lanes_products`: the rows repacked for decoding (`q4_1_lanes`, `q8_0_lanes`) laid out as a tile block by
//!   block, times a tile of the activation rows (`int8_rows::TileRows`), one row of sums per activation row.
//!
//! Each tile's sums are then scaled into f32 with `int8_rows`' operations in its order: integer sums are the same in
//! any order, so every value is bit for bit that of the VNNI kernels and of the portable twin, and a sequence gets
//! the same numbers in a batch of any size. The scaling is now most of the work (some five to seven instructions per
//! block of sixteen weight rows and one activation row), so the tiles serve products of many activation rows
//! (`Form::Int8Tiles`, from `TILE_MIN_ROWS` rows). `SAIF_AMX=0` turns them off, for comparisons.
//!
//! On a Xeon of this kind the scaling's 512-bit floating-point operations bound the kernel: with any sixteen of a
//! block's 64 left out (the conversions, the multiplications or the offsets' multiply-adds), a block of sixteen
//! weight rows and sixteen activation rows took 5.8-6.8 ns less of 37 (scratch switches, docs/benchmarks.md).
//! Tiles of bf16 give the sums as f32 with no conversion, the same values, but their own products took longer than
//! the conversions they save.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::int8_rows::{Lanes, Layout, TileRows, Unpacked, LANES};
use super::{q4_1_lanes, q8_0_lanes};

/// Weight rows per call: the rows of a tile.
pub const ROWS: usize = 16;

/// Whether this CPU and its kernel run the tiles (AMX-TILE and AMX-INT8, with the tile registers granted), and
/// AVX-512 VNNI for the scaling and the rows outside whole tiles. Asked once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var("SAIF_AMX").map_or(true, |v| v != "0")
            && super::int8_vnni::available()
            // Every CPU with AMX has these; `lanes_tiles` reorders Q8_0's bytes with `vpermb`.
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vbmi")
            && std::is_x86_feature_detected!("f16c")
            && has_amx_int8()
            && tiles_granted()
    })
}

/// CPUID leaf 7: AMX-TILE (EDX bit 24) and AMX-INT8 (bit 25).
fn has_amx_int8() -> bool {
    // CPUID leaf 7 exists on every CPU with AVX-512 (checked before).
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 24) != 0 && edx & (1 << 25) != 0
}

/// Asks Linux for the tile data registers (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`): without it the
/// first tile instruction is killed. Elsewhere: no tiles.
fn tiles_granted() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SYS_ARCH_PRCTL: usize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let result: isize;
        // SAFETY: the system call reads its two integer arguments and changes only which registers this process
        // may use; `syscall` clobbers rcx and r11.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL as isize => result,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            )
        };
        result == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// A tile configuration (palette 1): tile 0 the 16 x 16 sums, tile 1 sixteen weight rows of a block (`len`
/// bytes each), tile 2 the block of the sixteen activation rows (`len / 4` rows of sixteen four-byte groups); tiles
/// 3-5 the same, for the other blocks.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(len: usize) -> Self {
        let mut config = [0u8; 64];
        config[0] = 1;
        let mut set = |tile: usize, rows: usize, bytes: usize| {
            config[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(bytes as u16).to_le_bytes());
            config[48 + tile] = rows as u8;
        };
        for set_of_three in [0, 3] {
            set(set_of_three, ROWS, 4 * LANES);
            set(set_of_three + 1, ROWS, len);
            set(set_of_three + 2, len / 4, 4 * LANES);
        }
        Self(config)
    }
}

thread_local! {
    /// The block length of the tile configuration this thread has loaded; 0 before the first.
    static CONFIGURED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Loads the tile configuration for blocks of `len` values on this thread, unless it is loaded already: once per
/// thread and length, not at every call of sixteen rows. Nothing else in the program uses the tiles, so they are
/// never released.
#[target_feature(enable = "avx512f")]
pub unsafe fn configure(len: usize) {
    if CONFIGURED.get() != len {
        let config = TileConfig::new(len);
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        CONFIGURED.set(len);
    }
}

/// Where a kernel call finds its sixteen weight rows: each row's bytes and, per block, its scale and offset.
struct Weights {
    /// Row 0's first block; row r's block b at `bytes + r * row_stride + b * block_stride`.
    bytes: *const u8,
    row_stride: usize,
    block_stride: usize,
    /// Row r's block b's scale at `scale[r * blocks + b]`; its offset likewise, for types with one.
    scale: *const f32,
    offset: Option<*const f32>,
    /// `Layout::bias`; the bytes are signed (Q8_0 in place, bias 0) where `signed`.
    bias: i32,
    signed: bool,
}

/// `int8_rows::portable_rows` for the first sixteen rows of `w` (unpacked to bytes), bit for bit. Call only where
/// `available()`.
pub fn rows(w: &Unpacked, x: &Lanes, layout: Layout, out: &mut [[f32; LANES]; ROWS]) {
    assert!(
        available()
            && ROWS * w.k <= w.bytes.len()
            && ROWS * w.blocks <= w.scale.len().min(w.offset.len())
            && x.len == layout.len
            && w.blocks * layout.len == w.k
            && x.values.len() * 4 >= w.k
            && x.scale.len().min(x.scaled_sum.len()).min(x.sums.len()) >= w.blocks
    );
    let weights = Weights {
        bytes: w.bytes.as_ptr(),
        row_stride: w.k,
        block_stride: layout.len,
        scale: w.scale.as_ptr(),
        offset: layout.offset.then_some(w.offset.as_ptr()),
        bias: layout.bias,
        signed: false,
    };
    // SAFETY: the CPU has AMX-INT8 with the tiles granted and AVX-512 (`available`); the kernel reads `w.blocks`
    // blocks of each of the sixteen rows and of `x`, inside the sizes asserted above.
    unsafe { product(&weights, w.blocks, layout.len, x, out) }
}

/// `int8_rows::portable_rows` for sixteen Q8_0 rows read where they lie (`blocks`: sixteen rows of `nb` 34-byte
/// blocks; `scale`: their blocks' scales, row after row), bit for bit: the signed bytes multiply the activations
/// as they are (`tdpbssd`), which gives the integer sum `int8_vnni::q8_0_rows` gets with its offset and its
/// `Q8Terms`, and the same f32 operations follow. Call only where `available()`.
pub fn q8_0_rows(blocks: &[u8], scale: &[f32], x: &Lanes, out: &mut [[f32; LANES]; ROWS]) {
    let nb = scale.len() / ROWS;
    assert!(
        available()
            && blocks.len() == ROWS * nb * 34
            && scale.len() == ROWS * nb
            && x.len == 32
            && x.values.len() >= nb * 8
            && x.scale.len() >= nb
    );
    let weights = Weights {
        // SAFETY (of the offset): the values start after each block's 2-byte scale, inside `blocks`.
        bytes: unsafe { blocks.as_ptr().add(2) },
        row_stride: nb * 34,
        block_stride: 34,
        scale: scale.as_ptr(),
        offset: None,
        bias: 0,
        signed: true,
    };
    // SAFETY: as in `rows`, inside the sizes asserted above.
    unsafe { product(&weights, nb, 32, x, out) }
}

/// The kernel: per block, the sixteen rows' tile of bytes times the activations' tile, the sums stored, then
/// scaled into each row's lanes as `int8_vnni::block` does:
///
/// ```text
/// isum = sums - bias * x.sums[b]
/// acc  = fma(isum as f32, scale * dx, acc)
/// acc  = fma(offset, x.scaled_sum[b], acc)      (types with an offset)
/// ```
///
/// The blocks alternate between two sets of tiles (0-2 and 3-5) and two stores of sums, so that the next block's
/// tile product can run while this block's sums are scaled.
#[target_feature(enable = "avx512f")]
unsafe fn product(w: &Weights, blocks: usize, len: usize, x: &Lanes, out: &mut [[f32; LANES]; ROWS]) {
    configure(len);
    // Written by the tile stores before they are read (not zeroed: see `lanes_products`).
    let mut sums = std::mem::MaybeUninit::<[Sums; 2]>::uninit();
    let sums: [*mut [i32; LANES]; 2] = std::array::from_fn(|i| sums.as_mut_ptr().cast::<Sums>().add(i).cast());
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let minus_bias = _mm512_set1_epi32(-w.bias);
    let activations = x.values.as_ptr().cast::<u8>();
    // Block b's product into set b % 2.
    let multiply = |b: usize| {
        let (a, xb) = (w.bytes.add(b * w.block_stride), activations.add(b * len * LANES));
        let (a_stride, x_stride) = (w.row_stride, 4 * LANES);
        match (b % 2, w.signed) {
            (0, false) => asm!(
                "tilezero tmm0", "tileloadd tmm1, [{a} + {s} * 1]", "tileloadd tmm2, [{x} + {t} * 1]",
                "tdpbusd tmm0, tmm1, tmm2",
                a = in(reg) a, s = in(reg) a_stride, x = in(reg) xb, t = in(reg) x_stride, options(nostack, readonly),
            ),
            (0, true) => asm!(
                "tilezero tmm0", "tileloadd tmm1, [{a} + {s} * 1]", "tileloadd tmm2, [{x} + {t} * 1]",
                "tdpbssd tmm0, tmm1, tmm2",
                a = in(reg) a, s = in(reg) a_stride, x = in(reg) xb, t = in(reg) x_stride, options(nostack, readonly),
            ),
            (_, false) => asm!(
                "tilezero tmm3", "tileloadd tmm4, [{a} + {s} * 1]", "tileloadd tmm5, [{x} + {t} * 1]",
                "tdpbusd tmm3, tmm4, tmm5",
                a = in(reg) a, s = in(reg) a_stride, x = in(reg) xb, t = in(reg) x_stride, options(nostack, readonly),
            ),
            (_, true) => asm!(
                "tilezero tmm3", "tileloadd tmm4, [{a} + {s} * 1]", "tileloadd tmm5, [{x} + {t} * 1]",
                "tdpbssd tmm3, tmm4, tmm5",
                a = in(reg) a, s = in(reg) a_stride, x = in(reg) xb, t = in(reg) x_stride, options(nostack, readonly),
            ),
        }
    };
    if blocks > 0 {
        multiply(0);
    }
    for b in 0..blocks {
        if b + 1 < blocks {
            multiply(b + 1);
        }
        let store = sums[b % 2];
        match b % 2 {
            0 => asm!("tilestored [{s} + {t} * 1], tmm0", s = in(reg) store, t = in(reg) 4 * LANES, options(nostack)),
            _ => asm!("tilestored [{s} + {t} * 1], tmm3", s = in(reg) store, t = in(reg) 4 * LANES, options(nostack)),
        }
        let start = _mm512_mullo_epi32(minus_bias, _mm512_loadu_si512(x.sums[b].as_ptr().cast()));
        let dx = _mm512_loadu_ps(x.scale[b].as_ptr());
        let scaled_sum = _mm512_loadu_ps(x.scaled_sum[b].as_ptr());
        for (r, acc) in acc.iter_mut().enumerate() {
            let isum = _mm512_add_epi32(start, _mm512_loadu_si512(store.add(r).cast()));
            let scale = _mm512_mul_ps(_mm512_set1_ps(*w.scale.add(r * blocks + b)), dx);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
            if let Some(offset) = w.offset {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*offset.add(r * blocks + b)), scaled_sum, *acc);
            }
        }
    }
    for (out, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }
}

/// A tile of sums as stored: row r, weight row r's sums for the sixteen activation rows.
#[repr(C, align(64))]
struct Sums([[i32; LANES]; ROWS]);

/// `lanes_tiles` for the groups `groups` of `rows` (Q4_1's repacked rows, or Q8_0's where `Q8_0`) and the activation
/// rows of `x`, written where they go: activation row i's sixteen values of the run's g-th group at `out + i * stride
/// + 16 * g`, for the `x.rows` rows. The kernel stores them there itself, instead of into a buffer copied over
/// afterwards. Call only where `available()`.
///
/// # Safety
/// `out` has room for `x.rows` rows `stride` values apart, each of `16 * groups.len()` values, which nothing else
/// reads or writes while this runs.
pub unsafe fn lanes_products<const Q8_0: bool>(
    rows: &super::lanes::RowGroups,
    groups: std::ops::Range<usize>,
    x: &TileRows,
    out: *mut f32,
    stride: usize,
) {
    assert!(available() && groups.end <= rows.groups() && x.k == 32 * rows.blocks() && x.rows <= ROWS);
    assert!(x.values.len() >= LANES * x.k && x.scale.len().min(x.scaled_sum.len()) >= LANES * rows.blocks());
    assert!(x.rows <= 1 || stride >= LANES * groups.len());
    let data = rows.group(groups.start.min(rows.groups().saturating_sub(1))).as_ptr();
    // SAFETY: the CPU has what the kernel runs (`available`); the kernel reads the groups' blocks, which follow each
    // other from `data`, and the sixteen rows of `x` (asserted above), and writes the `x.rows` rows of `out` the
    // caller gave room for.
    lanes_tiles::<Q8_0>(data, groups.len(), rows.blocks(), x, out, stride);
}

/// Where byte `4n + t` of a tile row of Q8_0 weights comes from in a register of the repacked block (`q8_0_lanes`:
/// value by value, the sixteen rows' bytes side by side): value t of row n, at `16t + n`.
const Q8_0_TO_TILE: [u8; 64] = {
    let mut index = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        index[i] = (16 * (i % 4) + i / 4) as u8;
        i += 1;
    }
    index
};

/// The products of sixteen activation rows (`x`, as a tile reads them) with the `groups` groups of repacked rows
/// from `data` (Q4_1's `q4_1_lanes` layout, or Q8_0's `q8_0_lanes` where `Q8_0`), into `out`: activation row i's
/// values for group g's sixteen weight rows at `out + i * stride + 16 * g`, for the `x.rows` rows. Each value is
/// bit for bit that of `int8_rows`' kernels, and so of `q4_1_lanes::Q4_1Lanes::int8_group` for Q4_1.
///
/// Per block, the sixteen weight rows' bytes are laid out as AMX wants its second operand (row j of the tile: four
/// values of each weight row side by side): Q4_1's repacked block holds them so in its nibbles (low nibbles of its
/// register j for values `4j..4j + 4`, high ones for `16 + 4j..`), Q8_0's is reordered by one `vpermb` per
/// register. `tdpbssd` multiplies them with the activation rows' tile into 16 x 16 integer sums, one row per
/// activation row and one lane per weight row, which are scaled as `int8_rows` scales its sums:
///
/// ```text
/// acc = fma(isum as f32, d * dx, acc)
/// acc = fma(m, dx * sum(q), acc)            (Q4_1: its minimum m)
/// ```
///
/// The blocks alternate between two sets of tiles (0-2, 3-5), so that the next block's product runs while this one's
/// sums are scaled, and each block's weights are laid out two blocks before their tile is loaded (loaded right after
/// the stores, the tile waited for them). The groups' blocks follow each other in memory, and the kernel runs
/// through them as one sequence: the first block waits, and group by group that was a third of the kernel's time.
///
/// # Safety
/// Call only where `available()`; `data` holds `groups` groups of `blocks` blocks, `x` sixteen rows of `32 *
/// blocks` values, and `out` has room for `x.rows` rows `stride` values apart, of `16 * groups` values each.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,f16c")]
unsafe fn lanes_tiles<const Q8_0: bool>(
    data: *const u8,
    groups: usize,
    blocks: usize,
    x: &TileRows,
    out: *mut f32,
    stride: usize,
) {
    configure(32);
    let block_bytes = if Q8_0 { q8_0_lanes::BLOCK_BYTES } else { q4_1_lanes::BLOCK_BYTES };
    let nibble = _mm512_set1_epi8(0x0f);
    let to_tile = _mm512_loadu_si512(Q8_0_TO_TILE.as_ptr().cast());
    // Written before they are read: the weights by `lay_out`, the sums by the tile store.
    let mut weights = std::mem::MaybeUninit::<[Tile<512>; 3]>::uninit();
    let weights: [*mut u8; 3] = std::array::from_fn(|i| weights.as_mut_ptr().cast::<u8>().add(512 * i));
    let mut sums = std::mem::MaybeUninit::<[Tile<1024>; 3]>::uninit();
    let sums: [*mut u8; 3] = std::array::from_fn(|i| sums.as_mut_ptr().cast::<u8>().add(1024 * i));
    let mut acc = [_mm512_setzero_ps(); LANES];
    let activations = x.values.as_ptr();
    // Block t of the sequence (block t % blocks of group t / blocks): its weights into `weights[t % 3]`.
    let lay_out = |t: usize| {
        let (block, weights) = (data.add(t * block_bytes), weights[t % 3]);
        super::lanes::prefetch_ahead(block, block_bytes);
        if Q8_0 {
            for j in 0..8 {
                let w = _mm512_loadu_si512(block.add(64 * j).cast());
                _mm512_storeu_si512(weights.add(64 * j).cast(), _mm512_permutexvar_epi8(to_tile, w));
            }
        } else {
            for j in 0..4 {
                let w = _mm512_loadu_si512(block.add(64 * j).cast());
                _mm512_storeu_si512(weights.add(64 * j).cast(), _mm512_and_si512(w, nibble));
                // Shifted in 32-bit lanes: the bits that cross into the byte below are masked off.
                let high = _mm512_and_si512(_mm512_srli_epi32::<4>(w), nibble);
                _mm512_storeu_si512(weights.add(256 + 64 * j).cast(), high);
            }
        }
    };
    // Block t's product into set t % 2 (Q4_1's nibbles, 0-15, are signed bytes as well).
    let multiply = |t: usize| {
        let (a, row_bytes, w) = (activations.add(32 * (t % blocks)), x.k, weights[t % 3]);
        if t.is_multiple_of(2) {
            asm!(
                "tilezero tmm0", "tileloadd tmm1, [{a} + {s} * 1]", "tileloadd tmm2, [{w} + {t} * 1]",
                "tdpbssd tmm0, tmm1, tmm2",
                a = in(reg) a, s = in(reg) row_bytes, w = in(reg) w, t = in(reg) 64usize, options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm3", "tileloadd tmm4, [{a} + {s} * 1]", "tileloadd tmm5, [{w} + {t} * 1]",
                "tdpbssd tmm3, tmm4, tmm5",
                a = in(reg) a, s = in(reg) row_bytes, w = in(reg) w, t = in(reg) 64usize, options(nostack, readonly),
            );
        }
    };
    let all = groups * blocks;
    (0..all.min(2)).for_each(lay_out);
    if all > 0 {
        multiply(0);
    }
    // Block t's sums are stored after block t + 1's product is issued, and scaled one block later: scaled right
    // after their store, they waited for it.
    for t in 0..all + 1 {
        if t < all {
            if t + 2 < all {
                lay_out(t + 2);
            }
            if t + 1 < all {
                multiply(t + 1);
            }
            let store = sums[t % 3];
            match t % 2 {
                0 => asm!("tilestored [{s} + {t} * 1], tmm0", s = in(reg) store, t = in(reg) 64usize, options(nostack)),
                _ => asm!("tilestored [{s} + {t} * 1], tmm3", s = in(reg) store, t = in(reg) 64usize, options(nostack)),
            }
        }
        let Some(t) = t.checked_sub(1) else { continue };
        let store = sums[t % 3];
        let block = data.add(t * block_bytes);
        let half = |at: usize| _mm512_cvtph_ps(_mm256_loadu_si256(block.add(at).cast()));
        let b = t % blocks;
        if Q8_0 {
            let d = half(512);
            for (i, acc) in acc.iter_mut().enumerate() {
                let isum = _mm512_loadu_si512(store.add(64 * i).cast());
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.scale.get_unchecked(i * blocks + b)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
            }
        } else {
            let (d, m) = (half(256), half(288));
            for (i, acc) in acc.iter_mut().enumerate() {
                let isum = _mm512_loadu_si512(store.add(64 * i).cast());
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.scale.get_unchecked(i * blocks + b)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
                *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*x.scaled_sum.get_unchecked(i * blocks + b)), *acc);
            }
        }
        if b + 1 == blocks {
            let out = out.add(LANES * (t / blocks));
            for (i, acc) in acc.iter_mut().enumerate() {
                if i < x.rows {
                    _mm512_storeu_ps(out.add(stride * i), *acc);
                }
                *acc = _mm512_setzero_ps();
            }
        }
    }
}

/// A tile's bytes, aligned as the tile loads and stores like them.
#[repr(C, align(64))]
struct Tile<const N: usize>([u8; N]);

//! Weight rows in groups of sixteen, one row per lane of an AVX-512 register, block by block: the layout that the
//! decoding kernels of `q4_1_lanes` and `q8_0_lanes` read, each type filling a block of sixteen rows its own way.
//! Made once per matrix (`QuantMatrix::for_decoding`), where the CPU has AVX-512 (detected at run time).

/// Weight rows per group (one 512-bit register of f32 or i32).
pub const LANES: usize = 16;

/// A matrix's first `rows / 16 * 16` rows, group after group; in each group, block after block of 32 values, each
/// block of sixteen rows `block_bytes` long.
pub struct RowGroups {
    groups: usize,
    blocks: usize,
    block_bytes: usize,
    data: Vec<u8>,
}

impl RowGroups {
    /// Repacks `raw` (GGUF blocks of 32 values, `file_block_bytes` each, `k` values a row): for every group and
    /// block, `fill(lane, file_block, out)` for each of the sixteen rows' blocks in the file, into the group's block
    /// `out` of `block_bytes`. Rows past the last whole group are left to the one-row kernels.
    pub fn new(
        raw: &[u8],
        rows: usize,
        k: usize,
        file_block_bytes: usize,
        block_bytes: usize,
        fill: impl Fn(usize, &[u8], &mut [u8]),
    ) -> Self {
        let (groups, blocks) = (rows / LANES, k / 32);
        let row_bytes = blocks * file_block_bytes;
        assert!(raw.len() >= rows * row_bytes && k.is_multiple_of(32));
        let mut data = vec![0u8; groups * blocks * block_bytes];
        for (g, group) in data.chunks_exact_mut(blocks * block_bytes).enumerate() {
            for (b, out) in group.chunks_exact_mut(block_bytes).enumerate() {
                for lane in 0..LANES {
                    let at = (g * LANES + lane) * row_bytes + b * file_block_bytes;
                    fill(lane, &raw[at..at + file_block_bytes], out);
                }
            }
        }
        Self { groups, blocks, block_bytes, data }
    }

    /// Whole groups of sixteen rows.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Blocks of 32 values per row.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Group `g`'s blocks.
    pub fn group(&self, g: usize) -> &[u8] {
        &self.data[g * self.blocks * self.block_bytes..(g + 1) * self.blocks * self.block_bytes]
    }
}

/// Whether this CPU runs the kernels on groups (AVX-512 F and F16C): matrices are repacked only then, since
/// elsewhere the one-row kernels are faster than the portable twins.
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return super::avx512::available() && std::is_x86_feature_detected!("f16c");
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    false
}

/// How far ahead of the block being multiplied the kernels ask for the groups' bytes.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
const AHEAD: usize = 2048;

/// Asks for the `len` bytes `AHEAD` past `block` (a group's block of `len` bytes). Past the last group these may not
/// be the program's: a prefetch reads nothing the program sees and cannot fault.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
#[inline(always)]
pub fn prefetch_ahead(block: *const u8, len: usize) {
    for line in (0..len).step_by(64) {
        // SAFETY: a prefetch reads nothing the program sees and cannot fault, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                block.wrapping_add(AHEAD + line).cast(),
            )
        };
    }
}

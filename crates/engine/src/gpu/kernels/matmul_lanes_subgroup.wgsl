// The matrix products' lane sums through subgroup shuffles, with no workgroup memory and no barrier (appended to
// matmul.wgsl where the device has subgroups). The LANES threads of a row are consecutive invocations of one
// subgroup: gpu/kernels.rs keeps LANES a power of two no larger than the device's smallest subgroup.

// The lanes' partial sums of row `li / LANES` added up as a tree, in lane 0's `acc` (every thread must call it).
fn reduce_lanes(li: u32, lane: u32, acc: ptr<function, array<f32, 8>>, up: bool) {
    for (var t = 0u; t < TILE; t++) {
        var s = (*acc)[t];
        for (var offset = LANES / 2u; offset > 0u; offset >>= 1u) {
            s += subgroupShuffleDown(s, offset);
        }
        (*acc)[t] = s;
    }
}

// The matrix products' lane sums through workgroup memory (appended to matmul.wgsl when the device has no
// subgroups, or its matrix products are told not to use them).

// 64 threads x TILE tokens, sized by TILE: WebGPU zero-fills workgroup memory for every workgroup.
var<workgroup> partial: array<f32, 64u * TILE>;
var<workgroup> partial_up: array<f32, 64u * TILE>; // the same for the up rows of a GLU

// The lanes' partial sums of row `li / LANES` added up, in lane 0's `acc` (every thread must call it).
fn reduce_lanes(li: u32, lane: u32, acc: ptr<function, array<f32, 8>>, up: bool) {
    for (var t = 0u; t < TILE; t++) {
        if (up) {
            partial_up[li * TILE + t] = (*acc)[t];
        } else {
            partial[li * TILE + t] = (*acc)[t];
        }
    }
    workgroupBarrier();
    if (lane == 0u) {
        for (var t = 0u; t < TILE; t++) {
            var s = 0.0;
            for (var i = 1u; i < LANES; i++) {
                s += select(partial[(li + i) * TILE + t], partial_up[(li + i) * TILE + t], up);
            }
            (*acc)[t] += s;
        }
    }
}

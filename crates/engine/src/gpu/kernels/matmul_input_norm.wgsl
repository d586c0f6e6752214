// The matrix products' activations after the RMSNorm that precedes the product (appended to matmul.wgsl, with
// TILE 1): each workgroup normalizes its input row into workgroup memory, X4, as rmsnorm.wgsl's `norm` does,
// value for value, so the product equals the norm's dispatch followed by the plain product bit for bit. The
// workgroup array is sized to the row (INPUT_VEC4S, set per model): WebGPU zero-fills workgroup memory for every
// workgroup, and the LM head runs thousands of them.

@group(0) @binding(1) var<storage, read> X: array<f32>;    // [tokens][cols], before the norm
@group(0) @binding(5) var<storage, read> NORM: array<f32>; // the norm's weights

override INPUT_VEC4S: u32 = 576u; // P.cols / 4, at most gpu/kernels.rs's MAX_NORMALIZED_COLS / 4

var<workgroup> X4: array<vec4<f32>, INPUT_VEC4S>;

// Normalizes input row `row` of X into X4 and returns its first vec4 there, 0. Every thread must call it.
fn input_row(row: u32, li: u32, first_group: bool) -> u32 {
    let base = row * P.cols;
    var squares = 0.0;
    for (var i = li; i < P.cols; i += 64u) {
        squares += X[base + i] * X[base + i];
    }
    let r = row_inverse_rms(squares, li, P.cols, P.eps);
    for (var v = li; v < P.cols / 4u; v += 64u) {
        let i = 4u * v;
        X4[v] = vec4<f32>(X[base + i] * r * NORM[i], X[base + i + 1u] * r * NORM[i + 1u],
                          X[base + i + 2u] * r * NORM[i + 2u], X[base + i + 3u] * r * NORM[i + 3u]);
    }
    workgroupBarrier();
    return 0u;
}

// The matrix products' activations after a residual add and the norm that follows it (appended to matmul.wgsl,
// with TILE 1): Gemma's post-norms, folded into the next product, so that a decoding step needs no norm_add or
// norm_add_norm dispatch. Each workgroup takes, value for value as rmsnorm.wgsl's norm_add then norm do,
//   h  = X + post_norm(ADDED)      (P.add == 1; else h = X)
//   X4 = norm(h)
// and the workgroup of row group 0 of a product with P.write_sum == 1 stores h in H_OUT, the residual stream's
// other buffer: every other workgroup still reads X, so none may write the sum where it reads.

@group(0) @binding(1) var<storage, read> X: array<f32>;            // [tokens][cols]: the residual stream
@group(0) @binding(5) var<storage, read> NORM: array<f32>;         // the norm's weights
@group(0) @binding(6) var<storage, read> ADDED: array<f32>;        // [tokens][cols]: the output to add, normalized
@group(0) @binding(7) var<storage, read> POST: array<f32>;         // its norm's weights
@group(0) @binding(8) var<storage, read_write> H_OUT: array<f32>;  // [tokens][cols]: the sum, written once

override INPUT_VEC4S: u32 = 160u; // P.cols / 4, at most gpu/kernels.rs's MAX_NORMALIZED_COLS / 4

var<workgroup> X4: array<vec4<f32>, INPUT_VEC4S>;

// Adds and normalizes input row `row` into X4 and returns its first vec4 there, 0; `first_group`: this is row
// group 0's workgroup. Every thread must call it. Threads write whole vec4s of X4, which
// matmul_input_normalize.wgsl's `normalize_input` then normalizes.
fn input_row(row: u32, li: u32, first_group: bool) -> u32 {
    let base = row * P.cols;
    var post = 0.0;
    if (P.add == 1u) {
        var squares = 0.0;
        for (var i = li; i < P.cols; i += 64u) {
            squares += ADDED[base + i] * ADDED[base + i];
        }
        post = row_inverse_rms(squares, li, P.cols, P.eps);
    }
    let writes = P.write_sum == 1u && first_group;
    for (var v = li; v < P.cols / 4u; v += 64u) {
        let i = 4u * v;
        var h = vec4<f32>(X[base + i], X[base + i + 1u], X[base + i + 2u], X[base + i + 3u]);
        if (P.add == 1u) {
            let added = vec4<f32>(ADDED[base + i], ADDED[base + i + 1u], ADDED[base + i + 2u], ADDED[base + i + 3u]);
            h += added * post * vec4<f32>(POST[i], POST[i + 1u], POST[i + 2u], POST[i + 3u]);
        }
        X4[v] = h;
        if (writes) {
            H_OUT[base + i] = h.x;
            H_OUT[base + i + 1u] = h.y;
            H_OUT[base + i + 2u] = h.z;
            H_OUT[base + i + 3u] = h.w;
        }
    }
    normalize_input(li);
    return 0u;
}

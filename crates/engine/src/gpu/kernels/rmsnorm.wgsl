// RMSNorm of rows: norm(x) = x / sqrt(mean(x^2) + eps) * w (GGUF stores Gemma's 1 + w already). One workgroup
// per row. Entry points:
//   norm         Y[row] = norm(X[row])          (input norms; the final norm, last row only)
//   norm_add     Y[row] += norm(X[row])         (Gemma's post-attention and post-MLP norms into the residual)
//   norm_add_norm  Y[row] += norm(X[row]); A[row] = norm2(Y[row])
//                                               (Gemma's post-attention norm, its residual add and the MLP's input
//                                               norm in one dispatch)
// CPU twin: the formula as tests/gpu_cases computes it (`rms_norm_cpu`), which model/cpu.rs's norms compute too.

struct Params {
    width: u32,          // values per row
    last_only: u32,      // 1: only the last token's row
    eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read_write> Y: array<f32>;
@group(0) @binding(2) var<storage, read> WEIGHT: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
@group(0) @binding(4) var<uniform> S: Step;
@group(0) @binding(5) var<storage, read_write> A: array<f32>;   // norm_add_norm only
@group(0) @binding(6) var<storage, read> WEIGHT2: array<f32>;   // norm_add_norm only

// The row this workgroup normalizes, as an offset in values.
fn row_base(wg: u32) -> u32 {
    let first = select(0u, S.tokens - 1u, P.last_only == 1u);
    return (first + wg) * P.width;
}

// 1 / sqrt(mean(x^2) + eps) of a row, given each thread's sum of squares over its share of the row.
fn inverse_rms(partial_sum: f32, li: u32) -> f32 {
    return row_inverse_rms(partial_sum, li, P.width, P.eps);
}

// This thread's share of the sum of squares of the row at `base` of X (of Y: `squares_y`), over the values
// li, li + 64, ... that the same thread writes.
fn squares_x(base: u32, li: u32) -> f32 {
    var s = 0.0;
    for (var i = li; i < P.width; i += 64u) {
        s += X[base + i] * X[base + i];
    }
    return s;
}

fn squares_y(base: u32, li: u32) -> f32 {
    var s = 0.0;
    for (var i = li; i < P.width; i += 64u) {
        s += Y[base + i] * Y[base + i];
    }
    return s;
}

@compute @workgroup_size(64)
fn norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = row_base(wg.x);
    let r = inverse_rms(squares_x(base, li), li);
    for (var i = li; i < P.width; i += 64u) {
        Y[base + i] = X[base + i] * r * WEIGHT[i];
    }
}

@compute @workgroup_size(64)
fn norm_add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = row_base(wg.x);
    let r = inverse_rms(squares_x(base, li), li);
    for (var i = li; i < P.width; i += 64u) {
        Y[base + i] += X[base + i] * r * WEIGHT[i];
    }
}


@compute @workgroup_size(64)
fn norm_add_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = row_base(wg.x);
    let r = inverse_rms(squares_x(base, li), li);
    // Each thread reads back only the values it wrote itself, so no barrier is needed between the two halves.
    for (var i = li; i < P.width; i += 64u) {
        Y[base + i] += X[base + i] * r * WEIGHT[i];
    }
    let r2 = inverse_rms(squares_y(base, li), li);
    for (var i = li; i < P.width; i += 64u) {
        A[base + i] = Y[base + i] * r2 * WEIGHT2[i];
    }
}

// RMSNorm of rows: norm(x) = x / sqrt(mean(x^2) + eps) * w (GGUF stores Gemma's 1 + w already). One workgroup
// per row. Entry points:
//   norm         Y[row] = norm(X[row])          (input norms; the final norm, last row only)
//   norm_inplace Y[row] = norm(Y[row])          (Gemma 3's per-head q and k norms)
//   norm_add     Y[row] += norm(X[row])         (Gemma's post-attention and post-MLP norms into the residual)
// CPU twin: candle_nn::ops::rms_norm as model/cpu.rs uses it.

struct Params {
    width: u32,          // values per row
    rows_per_token: u32, // 1, or the number of heads for per-head norms
    last_only: u32,      // 1: only the last token's row(s)
    eps: f32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read_write> Y: array<f32>;
@group(0) @binding(2) var<storage, read> WEIGHT: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
@group(0) @binding(4) var<uniform> S: Step;

var<workgroup> sums: array<f32, 64>;

// The row this workgroup normalizes, as an offset in values.
fn row_base(wg: u32) -> u32 {
    let first = select(0u, (S.tokens - 1u) * P.rows_per_token, P.last_only == 1u);
    return (first + wg) * P.width;
}

// 1 / sqrt(mean(x^2) + eps) of a row, given each thread's sum of squares over its share of the row.
fn inverse_rms(partial_sum: f32, li: u32) -> f32 {
    sums[li] = partial_sum;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (li < half) {
            sums[li] += sums[li + half];
        }
        workgroupBarrier();
    }
    let r = inverseSqrt(sums[0] / f32(P.width) + P.eps);
    workgroupBarrier();
    return r;
}

// This thread's share of the sum of squares of the row at `base` of X (of Y: `squares_y`). Two functions, so
// that an entry point binds only the buffers it touches (an in-place norm must not bind its buffer twice).
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
fn norm_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = row_base(wg.x);
    let r = inverse_rms(squares_y(base, li), li);
    for (var i = li; i < P.width; i += 64u) {
        Y[base + i] = Y[base + i] * r * WEIGHT[i];
    }
}

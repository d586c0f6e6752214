// Prepended to every kernel (gpu/kernels.rs): the per-call block all kernels read at their last binding. Twin of
// `StepParams` in gpu/kernels.rs.

struct Step {
    tokens: u32,      // tokens in this call
    start: u32,       // position of the first of them (attention reads each token's own from its TokenRow;
                      // a call of several sequences' tokens sets 0)
    pad0: u32,
    pad1: u32,
}

// --- Shared by several kernel families ---------------------------------------------------------------------

// tanh that stays finite where exp(2x) would overflow.
fn safe_tanh(x: f32) -> f32 {
    return tanh(clamp(x, -15.0, 15.0));
}

// Gemma's GeGLU activation (the tanh form of GELU) and Llama's SwiGLU activation, of a gate value. CPU twins:
// candle's gelu and silu.
fn gelu_tanh(g: f32) -> f32 {
    return 0.5 * g * (1.0 + safe_tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)));
}

fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

var<workgroup> sum_lanes: array<f32, 64>;

// The sum of one value per thread over a workgroup of 64 threads, as a tree (lane li adds lane li + half), so
// every kernel that sums a row adds in the same order. Every thread of the workgroup must call it; all get the sum.
fn workgroup_sum(v: f32, li: u32) -> f32 {
    sum_lanes[li] = v;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (li < half) {
            sum_lanes[li] += sum_lanes[li + half];
        }
        workgroupBarrier();
    }
    let total = sum_lanes[0];
    workgroupBarrier();
    return total;
}

// 1 / sqrt(mean(x^2) + eps) of a row of `width` values, in a workgroup of 64 threads that each pass their share
// of the sum of squares (values li, li + 64, ...). Every thread of the workgroup must call it.
fn row_inverse_rms(partial_sum: f32, li: u32, width: u32, eps: f32) -> f32 {
    return inverseSqrt(workgroup_sum(partial_sum, li) / f32(width) + eps);
}

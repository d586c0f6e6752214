// Prepended to every kernel (gpu/kernels.rs): the per-call block all kernels read at their last binding. Twin of
// `StepParams` in gpu/kernels.rs.

struct Step {
    tokens: u32,      // tokens in this call
    start: u32,       // position of the first of them
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

var<workgroup> rms_sums: array<f32, 64>;

// 1 / sqrt(mean(x^2) + eps) of a row of `width` values, in a workgroup of 64 threads that each pass their share
// of the sum of squares (values li, li + 64, ...). Every thread of the workgroup must call it.
fn row_inverse_rms(partial_sum: f32, li: u32, width: u32, eps: f32) -> f32 {
    rms_sums[li] = partial_sum;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (li < half) {
            rms_sums[li] += rms_sums[li + half];
        }
        workgroupBarrier();
    }
    let r = inverseSqrt(rms_sums[0] / f32(width) + eps);
    workgroupBarrier();
    return r;
}

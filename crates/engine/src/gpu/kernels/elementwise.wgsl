// Element-wise steps over the rows of a call (tokens x width values). Entry points:
//   glu_gelu    G = gelu_tanh(G) * U        (Gemma's GeGLU, where gate and up are not one product)
//   glu_silu    G = silu(G) * U             (Llama's SwiGLU, likewise)
//   add         Y += X                      (Llama's residual adds)
//   add_vector  Y[t] += V for every row t   (a steering vector on the residual stream)
//   softcap     Y = cap * tanh(Y / cap)     (Gemma 2's final logits)
// CPU twins: the candle ops of model/cpu.rs (gelu, silu, +, broadcast_add, tanh).

struct Params {
    width: u32,   // values per row
    rows: u32,    // rows, when fixed (softcap of the logits); 0: one row per token of the call
    cap: f32,
    pad0: u32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read_write> Y: array<f32>;
@group(0) @binding(2) var<uniform> P: Params;
@group(0) @binding(3) var<uniform> S: Step;

fn count() -> u32 {
    return select(S.tokens, P.rows, P.rows > 0u) * P.width;
}

@compute @workgroup_size(64)
fn glu_gelu(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i >= count()) {
        return;
    }
    Y[i] = gelu_tanh(Y[i]) * X[i];
}

@compute @workgroup_size(64)
fn glu_silu(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i >= count()) {
        return;
    }
    Y[i] = silu(Y[i]) * X[i];
}

@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i >= count()) {
        return;
    }
    Y[i] += X[i];
}

@compute @workgroup_size(64)
fn add_vector(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i >= count()) {
        return;
    }
    Y[i] += X[i % P.width];
}

@compute @workgroup_size(64)
fn softcap(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i >= count()) {
        return;
    }
    Y[i] = P.cap * safe_tanh(Y[i] / P.cap);
}

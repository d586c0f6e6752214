// The SAE trainer's update: Adam on one parameter (by hand, like crates/saif/src/train/cpu.rs, whose moments
// checkpoints hold), and the renormalisation of the decoder's rows to unit norm after each step.

struct Params {
    lr: f32,
    c1: f32, // 1 - beta1^t
    c2: f32, // 1 - beta2^t
    beta1: f32,
    beta2: f32,
    eps: f32,
    rows: u32, // normalize_rows: rows of W, each `cols` wide
    cols: u32,
    // 1 - beta, computed in f64 on the host: 1 - f32(0.999) in f32 is off by 1.3e-5 relative, which the CPU
    // trainer's Adam (its twin) is not.
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> PARAM: array<f32>;
@group(0) @binding(2) var<storage, read> GRAD: array<f32>;
@group(0) @binding(3) var<storage, read_write> M: array<f32>;
@group(0) @binding(4) var<storage, read_write> V: array<f32>;
@group(0) @binding(5) var<storage, read_write> W: array<f32>;

@compute @workgroup_size(256)
fn adam(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * g.x) * 256u + li;
    if (i >= arrayLength(&PARAM)) {
        return;
    }
    let grad = GRAD[i];
    let m = P.beta1 * M[i] + P.one_minus_beta1 * grad;
    let v = P.beta2 * V[i] + P.one_minus_beta2 * grad * grad;
    M[i] = m;
    V[i] = v;
    PARAM[i] -= P.lr * ((m / P.c1) / (sqrt(v / P.c2) + P.eps));
}

// W's rows divided by their norms (at least 1e-8).
@compute @workgroup_size(256)
fn normalize_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let r = (wg.x + wg.y * g.x) * 256u + li;
    if (r >= P.rows) {
        return;
    }
    var s = 0.0;
    for (var j = 0u; j < P.cols; j++) {
        let w = W[r * P.cols + j];
        s += w * w;
    }
    let norm = max(sqrt(s), 1e-8);
    for (var j = 0u; j < P.cols; j++) {
        W[r * P.cols + j] /= norm;
    }
}

// Causal attention with grouped key/value heads, sliding windows and Gemma 2's softcap, over the KV cache.
// One workgroup per (query token, head); keys are taken 64 at a time with an online softmax (running maximum and
// sum, rescaled as larger scores arrive), so any context length fits in fixed workgroup memory.
// A query at position p sees keys j with p - window < j <= p (window 0: all j <= p).
// CPU twin: CpuModel::attention (model/cpu.rs).

struct Params {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,   // <= 256
    window: u32,     // 0: no window
    scale: f32,      // multiplies q.k
    softcap: f32,    // 0: none; else scores become softcap * tanh(scores / softcap)
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> Q: array<f32>;  // [tokens][heads * head_dim]
@group(0) @binding(1) var<storage, read> K: array<f32>;  // [position][kv_heads * head_dim]
@group(0) @binding(2) var<storage, read> V: array<f32>;
@group(0) @binding(3) var<storage, read_write> O: array<f32>; // [tokens][heads * head_dim]
@group(0) @binding(4) var<uniform> P: Params;
@group(0) @binding(5) var<uniform> S: Step;

var<workgroup> q: array<f32, 256>;
var<workgroup> p: array<f32, 64>;
var<workgroup> red: array<f32, 64>;

fn reduce_max(v: f32, li: u32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (li < half) {
            red[li] = max(red[li], red[li + half]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(v: f32, li: u32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (li < half) {
            red[li] += red[li + half];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let head = wg.x;
    let t = wg.y;
    let hd = P.head_dim;
    let position = S.start + t;
    let kv_head = head / (P.heads / P.kv_heads);
    let kv_width = P.kv_heads * hd;
    let q_base = t * P.heads * hd + head * hd;
    for (var d = li; d < hd; d += 64u) {
        q[d] = Q[q_base + d] * P.scale;
    }
    workgroupBarrier();

    var first = 0u;
    if (P.window > 0u && position + 1u > P.window) {
        first = position + 1u - P.window;
    }
    var running_max = -3.0e38;
    var running_sum = 0.0;
    var acc: array<f32, 4>; // this thread's dimensions li, li + 64, li + 128, li + 192
    for (var chunk = first; chunk <= position; chunk += 64u) {
        let j = chunk + li;
        var score = -3.0e38;
        if (j <= position) {
            let k_base = j * kv_width + kv_head * hd;
            var s = 0.0;
            for (var d = 0u; d < hd; d++) {
                s += q[d] * K[k_base + d];
            }
            if (P.softcap > 0.0) {
                s = P.softcap * tanh(clamp(s / P.softcap, -15.0, 15.0));
            }
            score = s;
        }
        let chunk_max = reduce_max(score, li);
        let new_max = max(running_max, chunk_max);
        let rescale = exp(running_max - new_max);
        var w = 0.0;
        if (j <= position) {
            w = exp(score - new_max);
        }
        p[li] = w;
        let chunk_sum = reduce_sum(w, li);
        running_sum = running_sum * rescale + chunk_sum;
        running_max = new_max;
        let keys = min(64u, position + 1u - chunk);
        for (var n = 0u; n < 4u; n++) {
            let d = li + 64u * n;
            if (d < hd) {
                var s = acc[n] * rescale;
                for (var i = 0u; i < keys; i++) {
                    s += p[i] * V[(chunk + i) * kv_width + kv_head * hd + d];
                }
                acc[n] = s;
            }
        }
        workgroupBarrier();
    }
    let o_base = t * P.heads * hd + head * hd;
    for (var n = 0u; n < 4u; n++) {
        let d = li + 64u * n;
        if (d < hd) {
            O[o_base + d] = acc[n] / running_sum;
        }
    }
}

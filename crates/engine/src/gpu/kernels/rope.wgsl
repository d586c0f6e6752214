// Rotary position embedding of q or k heads. The angles' cos and sin come from a table the CPU computes once per
// RoPE base (GPU sin/cos lose precision on the large angles of late positions). Layouts: `halves` pairs dimension
// i with i + d/2 (Gemma), `interleaved` pairs 2i with 2i + 1 (Llama as llama.cpp stores it). Entry points:
//   rope_inplace  Y[t] = rope(Y[t])                      (q)
//   rope_to       Y[start + t] = rope(X[t])              (k, written into the KV cache at its position)
// CPU twin: candle_nn::rotary_emb::rope / rope_i as model/cpu.rs uses them.

struct Params {
    heads: u32,
    head_dim: u32,
    interleaved: u32,
    pad0: u32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read_write> Y: array<f32>;
@group(0) @binding(2) var<storage, read> COS: array<f32>; // [position][head_dim / 2]
@group(0) @binding(3) var<storage, read> SIN: array<f32>;
@group(0) @binding(4) var<uniform> P: Params;
@group(0) @binding(5) var<uniform> S: Step;

// For thread `id`: (token, offset of the pair's first value within a row, offset of its second, pair index).
fn pair(id: u32) -> vec4<u32> {
    let half = P.head_dim / 2u;
    let t = id / (P.heads * half);
    let rest = id % (P.heads * half);
    let head = rest / half;
    let i = rest % half;
    let base = head * P.head_dim;
    if (P.interleaved == 1u) {
        return vec4<u32>(t, base + 2u * i, base + 2u * i + 1u, i);
    }
    return vec4<u32>(t, base + i, base + i + half, i);
}

fn rotate(a: f32, b: f32, t: u32, i: u32) -> vec2<f32> {
    let angle = (S.start + t) * (P.head_dim / 2u) + i;
    let c = COS[angle];
    let s = SIN[angle];
    return vec2<f32>(a * c - b * s, b * c + a * s);
}

@compute @workgroup_size(64)
fn rope_inplace(@builtin(global_invocation_id) id: vec3<u32>) {
    let p = pair(id.x);
    if (p.x >= S.tokens) {
        return;
    }
    let row = p.x * P.heads * P.head_dim;
    let r = rotate(Y[row + p.y], Y[row + p.z], p.x, p.w);
    Y[row + p.y] = r.x;
    Y[row + p.z] = r.y;
}

@compute @workgroup_size(64)
fn rope_to(@builtin(global_invocation_id) id: vec3<u32>) {
    let p = pair(id.x);
    if (p.x >= S.tokens) {
        return;
    }
    let width = P.heads * P.head_dim;
    let src = p.x * width;
    let dst = (S.start + p.x) * width;
    let r = rotate(X[src + p.y], X[src + p.z], p.x, p.w);
    Y[dst + p.y] = r.x;
    Y[dst + p.z] = r.y;
}

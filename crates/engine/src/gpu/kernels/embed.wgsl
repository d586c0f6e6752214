// Token embedding: H[t] = scale * W[token t], each value decoded from its GGUF block (quant.wgsl, `value_at`). The table may be
// split over several buffers (Gemma 3 270M's is 178 MB, above some devices' binding limit); each dispatch covers
// the rows of one buffer and leaves the other tokens alone. CPU twin: Embedding::lookup (model/cpu.rs).

struct Params {
    rows: u32,      // rows in this buffer
    first_row: u32, // token id of its first row
    cols: u32,
    row_bytes: u32,
    scale: f32,     // sqrt(hidden) for Gemma, 1 otherwise
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> TOKENS: array<u32>;
@group(0) @binding(2) var<storage, read_write> H: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
@group(0) @binding(4) var<uniform> S: Step;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let index = id.x + id.y * 65535u * 64u;
    let t = index / P.cols;
    let i = index % P.cols;
    if (t >= S.tokens) {
        return;
    }
    let token = TOKENS[t];
    if (token < P.first_row || token >= P.first_row + P.rows) {
        return;
    }
    H[t * P.cols + i] = value_at((token - P.first_row) * P.row_bytes, i) * P.scale;
}

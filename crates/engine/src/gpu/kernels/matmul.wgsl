// Matrix products with quantized weights: Y[t][out_col + r] = sum_k X[t][k] W[r][k], the weights read as the GGUF
// stores them and decoded 32 at a time inside the product (quant.wgsl), f32 activations and sums. CPU twin:
// QuantMatrix::matmul (crates/engine/src/quant/mod.rs).
//
// A workgroup computes ROWS output rows for TILE tokens: each row is shared by LANES threads that split its 32-value
// chunks, decode each chunk once and use it for all TILE tokens, then add up their partial sums.

override TILE: u32 = 1u;
const LANES: u32 = 16u;
const ROWS: u32 = 4u;

struct Params {
    rows: u32,        // rows of W in this buffer
    cols: u32,        // values per row (a multiple of 32)
    row_bytes: u32,   // bytes per row of W
    out_stride: u32,  // values per row of Y
    out_col: u32,     // column of Y where row 0 of W lands
    at_position: u32, // 1: output row = start + t (writing the KV cache); 0: output row = t
    last_only: u32,   // 1: only the last input row (the LM head while generating)
    groups_x: u32,    // workgroups along x (rows / ROWS may exceed one dispatch dimension)
}

struct Step {
    tokens: u32,      // rows of X in this call
    start: u32,       // position of the first of them
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
@group(0) @binding(4) var<uniform> S: Step;

var<workgroup> partial: array<f32, 512>; // ROWS * LANES * TILE, TILE <= 8

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let slot = li / LANES;          // which of the ROWS rows
    let lane = li % LANES;
    let r = (wg.x + wg.y * P.groups_x) * ROWS + slot;
    let inputs = select(S.tokens, 1u, P.last_only == 1u);
    let t0 = wg.z * TILE;
    let first_input = select(0u, S.tokens - 1u, P.last_only == 1u);

    var acc: array<f32, 8>;
    if (r < P.rows) {
        let row = r * P.row_bytes;
        let chunks = P.cols / 32u;
        for (var c = lane; c < chunks; c += LANES) {
            let w = decode_chunk(row, c);
            for (var t = 0u; t < TILE; t++) {
                if (t0 + t < inputs) {
                    let x = (first_input + t0 + t) * P.cols + 32u * c;
                    var s = 0.0;
                    for (var l = 0u; l < 32u; l++) {
                        s += w[l] * X[x + l];
                    }
                    acc[t] += s;
                }
            }
        }
    }
    for (var t = 0u; t < TILE; t++) {
        partial[(slot * LANES + lane) * TILE + t] = acc[t];
    }
    workgroupBarrier();
    if (lane == 0u && r < P.rows) {
        for (var t = 0u; t < TILE; t++) {
            if (t0 + t < inputs) {
                var s = 0.0;
                for (var i = 0u; i < LANES; i++) {
                    s += partial[(slot * LANES + i) * TILE + t];
                }
                let out_row = t0 + t + select(0u, S.start, P.at_position == 1u);
                Y[out_row * P.out_stride + P.out_col + r] = s;
            }
        }
    }
}

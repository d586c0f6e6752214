// Matrix products with quantized weights: Y[t][out_col + r] = sum_k X[t][k] W[r][k], the weights read as the GGUF
// stores them and decoded inside the dot products (quant.wgsl), f32 activations and sums. CPU twin:
// QuantMatrix::matmul (crates/engine/src/quant/mod.rs).
//
// A workgroup of 64 threads computes 64 / LANES output rows for TILE tokens; the LANES threads of a row split its
// 32-value chunks and add up their partial sums at the end. LANES = 1 (a thread per row, no exchange) suits
// CPU-based adapters such as lavapipe and SwiftShader; GPUs take 16 (gpu/kernels.rs picks).

override TILE: u32 = 1u;
override LANES: u32 = 16u;

struct Params {
    rows: u32,        // rows of W in this buffer
    cols: u32,        // values per row (a multiple of 32)
    row_bytes: u32,   // bytes per row of W
    out_stride: u32,  // values per row of Y
    out_col: u32,     // column of Y where row 0 of W lands
    at_position: u32, // 1: output row = start + t (writing the KV cache); 0: output row = t
    last_only: u32,   // 1: only the last input row (the LM head while generating)
    groups_x: u32,    // workgroups along x (the row groups may exceed one dispatch dimension)
}

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> X4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
@group(0) @binding(4) var<uniform> S: Step;

var<workgroup> partial: array<f32, 512>; // 64 threads x TILE (<= 8) tokens

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let slot = li / LANES;
    let lane = li % LANES;
    let r = (wg.x + wg.y * P.groups_x) * (64u / LANES) + slot;
    let inputs = select(S.tokens, 1u, P.last_only == 1u);
    let first_input = select(0u, S.tokens - 1u, P.last_only == 1u);
    let t0 = wg.z * TILE;

    var acc: array<f32, 8>;
    if (r < P.rows) {
        let row = r * P.row_bytes;
        let chunks = P.cols / 32u;
        for (var c = lane; c < chunks; c += LANES) {
            for (var t = 0u; t < TILE; t++) {
                if (t0 + t < inputs) {
                    acc[t] += dot_chunk(row, c, ((first_input + t0 + t) * P.cols + 32u * c) / 4u);
                }
            }
        }
    }
    if (LANES > 1u) {
        for (var t = 0u; t < TILE; t++) {
            partial[li * TILE + t] = acc[t];
        }
        workgroupBarrier();
        if (lane == 0u) {
            for (var t = 0u; t < TILE; t++) {
                var s = 0.0;
                for (var i = 1u; i < LANES; i++) {
                    s += partial[(li + i) * TILE + t];
                }
                acc[t] += s;
            }
        }
    }
    if (lane == 0u && r < P.rows) {
        for (var t = 0u; t < TILE; t++) {
            if (t0 + t < inputs) {
                let out_row = t0 + t + select(0u, S.start, P.at_position == 1u);
                Y[out_row * P.out_stride + P.out_col + r] = acc[t];
            }
        }
    }
}

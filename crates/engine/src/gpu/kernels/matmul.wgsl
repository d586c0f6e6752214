// Matrix products with quantized weights: Y[t][out_col + r] = sum_k X[t][k] W[r][k], the weights read as the GGUF
// stores them and decoded inside the dot products (quant.wgsl), f32 activations and sums. CPU twin:
// QuantMatrix::matmul (crates/engine/src/quant/mod.rs).
//
// A workgroup of 64 threads computes 64 / LANES output rows for TILE tokens; the LANES threads of a row split its
// 32-value chunks and add up their partial sums at the end. LANES = 1 (a thread per row, no exchange) suits
// CPU-based adapters such as lavapipe and SwiftShader; GPUs take 16 (gpu/kernels.rs picks). The lanes' sums are
// added by `reduce_lanes`, through workgroup memory (matmul_lanes.wgsl) or, where the device has subgroups, through
// subgroup shuffles (matmul_lanes_subgroup.wgsl); gpu/kernels.rs appends one of them.
//
// EPILOGUE says what happens to a finished sum, so that the step after a product needs no dispatch of its own:
//   0  Y = sum                                   (store)
//   1  Y += sum                                  (a residual add: the attention output and MLP down products)
//   2  Y = gelu_tanh(sum_gate) * sum_up          (GeGLU: W holds the gate's rows, then the up product's rows)
//   3  Y = silu(sum_gate) * sum_up               (SwiGLU, likewise)
// In 2 and 3, P.rows counts output rows and W has twice as many; row r's up row is r + P.rows.
//
// The activations `X4` and `input_row` come from one of four snippets gpu/kernels.rs appends: matmul_input.wgsl
// reads X as it is; matmul_input_norm.wgsl (one token per workgroup) first takes the RMSNorm that precedes the
// product, writing the normalized row into workgroup memory, so that a decoding step needs no norm dispatch;
// matmul_input_add_norm.wgsl (likewise) first takes Gemma's residual add of a post-normalized output too;
// matmul_input_embed_norm.wgsl (likewise) looks the token's embedding up itself, for the first layer.
//
// Every workgroup ends in `finish_group`: nothing, or for an LM head picking greedily (matmul_largest.wgsl), the
// workgroup's largest sum and its row, so that the token needs no select dispatch.

override TILE: u32 = 1u;
override LANES: u32 = 16u;
override EPILOGUE: u32 = 0u;

struct Params {
    rows: u32,        // rows of W in this buffer
    cols: u32,        // values per row (a multiple of 32)
    row_bytes: u32,   // bytes per row of W
    out_stride: u32,  // values per row of Y
    out_col: u32,     // column of Y where row 0 of W lands
    at_position: u32, // 1: output row = start + t (writing the KV cache); 0: output row = t
    last_only: u32,   // 1: only the last input row (the LM head while generating)
    groups_x: u32,    // workgroups along x (the row groups may exceed one dispatch dimension)
    eps: f32,         // matmul_input_norm.wgsl and matmul_input_add_norm.wgsl: the norm's epsilon
    add: u32,         // matmul_input_add_norm.wgsl: 1: add the normalized output first
    write_sum: u32,   // matmul_input_add_norm.wgsl and matmul_input_embed_norm.wgsl: 1: row group 0 writes h
    table_row_bytes: u32, // matmul_input_embed_norm.wgsl: bytes per row of the embedding table
    table_scale: f32,     // matmul_input_embed_norm.wgsl: the embedding's scale (embed.wgsl's P.scale)
    first_group: u32,     // matmul_largest.wgsl: the slot of this buffer's first row group
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;
@group(0) @binding(4) var<uniform> S: Step;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let slot = li / LANES;
    let lane = li % LANES;
    let r = (wg.x + wg.y * P.groups_x) * (64u / LANES) + slot;
    let inputs = select(S.tokens, 1u, P.last_only == 1u);
    let first_input = select(0u, S.tokens - 1u, P.last_only == 1u);
    let t0 = wg.z * TILE;

    let glu = EPILOGUE >= 2u;
    // Where this workgroup's first input row starts in X4 (every thread takes part: it may normalize the row).
    let x_first = input_row(first_input + t0, li, wg.x + wg.y == 0u);
    var acc: array<f32, 8>;
    var acc_up: array<f32, 8>;
    if (r < P.rows) {
        let row = r * P.row_bytes;
        let up_row = (r + P.rows) * P.row_bytes;
        let chunks = P.cols / 32u;
        for (var c = lane; c < chunks; c += LANES) {
            // Each chunk of weights is decoded once for all the tile's tokens: each token's sum is what a tile of one
            // gives it.
            let w = decode_chunk(row, c);
            for (var t = 0u; t < TILE; t++) {
                if (t0 + t < inputs) {
                    acc[t] += dot_decoded(w, x_first + (t * P.cols + 32u * c) / 4u);
                }
            }
            if (glu) {
                let u = decode_chunk(up_row, c);
                for (var t = 0u; t < TILE; t++) {
                    if (t0 + t < inputs) {
                        acc_up[t] += dot_decoded(u, x_first + (t * P.cols + 32u * c) / 4u);
                    }
                }
            }
        }
    }
    if (LANES > 1u) {
        reduce_lanes(li, lane, &acc, false);
        if (glu) {
            reduce_lanes(li, lane, &acc_up, true);
        }
    }
    if (lane == 0u && r < P.rows) {
        for (var t = 0u; t < TILE; t++) {
            if (t0 + t < inputs) {
                let out_row = t0 + t + select(0u, S.start, P.at_position == 1u);
                let i = out_row * P.out_stride + P.out_col + r;
                switch EPILOGUE {
                    case 1u: { Y[i] += acc[t]; }
                    case 2u: { Y[i] = gelu_tanh(acc[t]) * acc_up[t]; }
                    case 3u: { Y[i] = silu(acc[t]) * acc_up[t]; }
                    default: { Y[i] = acc[t]; }
                }
            }
        }
    }
    finish_group(wg.x + wg.y * P.groups_x, li, lane == 0u && r < P.rows, acc[0], r);
}

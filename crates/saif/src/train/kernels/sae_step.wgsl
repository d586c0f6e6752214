// The SAE trainer's forward and backward passes around its matrix products (dense_matmul.wgsl) and TopK
// (top_k.wgsl), for a batch of `rows` inputs of width `d` and `width` latents. CPU twin: the candle step in
// crates/saif/src/train/cpu.rs, whose autograd gives the gradients written out here:
//
//   xc = x - b_dec            pre = relu(xc W_enc + b_enc)       lat = TopK(pre), aux = AuxK(pre)
//   err = x - (lat W_dec + b_dec)                                loss = |err|^2 / var(x)
//   aux_err = err - aux W_dec                                    + aux_weight |aux_err|^2 / var(err)
//
// G2 holds dloss/d(lat W_dec) in its first `rows` rows and dloss/d(aux W_dec) in the next `rows`; the gradient of
// the latents is G2 W_dec^T (a product), kept where a latent was selected (pre_grad).

struct Params {
    rows: u32,
    d: u32,
    width: u32,
    aux_on: u32,
    inv_var: f32,    // 1 / the batch's variance (summed over its columns)
    aux_weight: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;              // rows x d
@group(0) @binding(2) var<storage, read> B_DEC: array<f32>;          // d
@group(0) @binding(3) var<storage, read_write> XC: array<f32>;       // rows x d
@group(0) @binding(4) var<storage, read_write> PRE: array<f32>;      // rows x width
@group(0) @binding(5) var<storage, read> B_ENC: array<f32>;          // width
@group(0) @binding(6) var<storage, read> R2: array<f32>;             // 2 rows x d: lat W_dec, aux W_dec
@group(0) @binding(7) var<storage, read_write> ERR: array<f32>;      // rows x d
@group(0) @binding(8) var<storage, read_write> G2: array<f32>;       // 2 rows x d
@group(0) @binding(9) var<storage, read> SRC: array<f32>;            // rows x d (ERR or AUX_ERR)
@group(0) @binding(10) var<storage, read_write> COLS: array<f32>;    // d x 2
@group(0) @binding(11) var<storage, read_write> STATS_OUT: array<f32>; // 2
@group(0) @binding(12) var<storage, read> STATS_ERR: array<f32>;     // 2: sum err^2, var(err)
@group(0) @binding(13) var<storage, read_write> AUX_ERR: array<f32>; // rows x d
@group(0) @binding(14) var<storage, read> GLAT2: array<f32>;         // 2 rows x width: G2 W_dec^T
@group(0) @binding(15) var<storage, read> LAT2: array<f32>;          // 2 rows x width: lat, aux
@group(0) @binding(16) var<storage, read_write> GPRE: array<f32>;    // rows x width
@group(0) @binding(17) var<storage, read_write> GB_ENC: array<f32>;  // width
@group(0) @binding(18) var<storage, read> W_ENC: array<f32>;         // d x width
@group(0) @binding(19) var<storage, read_write> GB_DEC: array<f32>;  // d

fn flat(wg: vec3<u32>, groups: vec3<u32>, li: u32) -> u32 {
    return (wg.x + wg.y * groups.x) * 256u + li;
}

// xc = x - b_dec
@compute @workgroup_size(256)
fn center(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = flat(wg, g, li);
    if (i < P.rows * P.d) {
        XC[i] = X[i] - B_DEC[i % P.d];
    }
}

// pre = relu(pre + b_enc)
@compute @workgroup_size(256)
fn bias_relu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let i = flat(wg, g, li);
    if (i < P.rows * P.width) {
        PRE[i] = max(PRE[i] + B_ENC[i % P.width], 0.0);
    }
}

// err = x - lat W_dec - b_dec; its gradient -2 err / var(x) into G2's first rows.
@compute @workgroup_size(256)
fn residual(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let i = flat(wg, g, li);
    if (i < P.rows * P.d) {
        let e = X[i] - R2[i] - B_DEC[i % P.d];
        ERR[i] = e;
        G2[i] = -2.0 * e * P.inv_var;
    }
}

// Per column of SRC: the sum of squares and the sum of squared deviations from the column's mean.
@compute @workgroup_size(256)
fn column_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let j = flat(wg, g, li);
    if (j >= P.d) {
        return;
    }
    var sum = 0.0;
    var squares = 0.0;
    for (var r = 0u; r < P.rows; r++) {
        let v = SRC[r * P.d + j];
        sum += v;
        squares += v * v;
    }
    let mean = sum / f32(P.rows);
    var deviations = 0.0;
    for (var r = 0u; r < P.rows; r++) {
        let v = SRC[r * P.d + j] - mean;
        deviations += v * v;
    }
    COLS[2u * j] = squares;
    COLS[2u * j + 1u] = deviations;
}

var<workgroup> partial: array<vec2<f32>, 256>;

// STATS_OUT = the column statistics summed over the columns (one workgroup).
@compute @workgroup_size(256)
fn total_stats(@builtin(local_invocation_index) li: u32) {
    var s = vec2<f32>(0.0, 0.0);
    for (var j = li; j < P.d; j += 256u) {
        s += vec2<f32>(COLS[2u * j], COLS[2u * j + 1u]);
    }
    partial[li] = s;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (li < half) {
            partial[li] += partial[li + half];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        STATS_OUT[0] = partial[0].x;
        STATS_OUT[1] = partial[0].y;
    }
}

// aux_err = err - aux W_dec; its gradient -2 aux_weight aux_err / var(err) into G2's second rows (zero when AuxK is
// off or the error has no variance, where the CPU leaves the auxiliary loss out).
@compute @workgroup_size(256)
fn aux_residual(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = flat(wg, g, li);
    if (i >= P.rows * P.d) {
        return;
    }
    let var_err = STATS_ERR[1];
    if (P.aux_on == 0u || !(var_err > 0.0)) {
        AUX_ERR[i] = 0.0;
        G2[P.rows * P.d + i] = 0.0;
        return;
    }
    let a = ERR[i] - R2[P.rows * P.d + i];
    AUX_ERR[i] = a;
    G2[P.rows * P.d + i] = -2.0 * P.aux_weight * a / var_err;
}

// dloss/dpre: the latents' gradients where they were selected (TopK, then AuxK).
@compute @workgroup_size(256)
fn pre_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let i = flat(wg, g, li);
    let n = P.rows * P.width;
    if (i < n) {
        GPRE[i] = select(0.0, GLAT2[i], LAT2[i] > 0.0) + select(0.0, GLAT2[n + i], LAT2[n + i] > 0.0);
    }
}

// dloss/db_enc: the column sums of dloss/dpre.
@compute @workgroup_size(256)
fn b_enc_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let i = flat(wg, g, li);
    if (i >= P.width) {
        return;
    }
    var s = 0.0;
    for (var r = 0u; r < P.rows; r++) {
        s += GPRE[r * P.width + i];
    }
    GB_ENC[i] = s;
}

// dloss/db_dec: through the decoder's bias (the column sums of G2's first rows) and through xc = x - b_dec
// (minus W_enc dloss/db_enc).
@compute @workgroup_size(256)
fn b_dec_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) g: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let j = flat(wg, g, li);
    if (j >= P.d) {
        return;
    }
    var s = 0.0;
    for (var r = 0u; r < P.rows; r++) {
        s += G2[r * P.d + j];
    }
    var through_encoder = 0.0;
    for (var i = 0u; i < P.width; i++) {
        through_encoder += W_ENC[j * P.width + i] * GB_ENC[i];
    }
    GB_DEC[j] = s - through_encoder;
}

// Dense f32 matrix products for the SAE trainer: C = A B, with A (M x K) and B (K x N) read through strides, so
// that one kernel also computes A^T B and A B^T without copies. C is row-major M x N. CPU twin:
// `reference_product` in crates/saif/tests/gpu_training.rs.
//
// A workgroup of 16 x 16 threads computes a 64 x 64 tile of C, each thread 4 x 4 values (rows ly + 16 i, columns
// lx + 16 j), stepping through K 16 at a time with the tiles of A and B staged in workgroup memory. The tiles are
// loaded along whichever dimension is contiguous in memory, so that neighbouring threads read neighbouring words.
// `direct` computes the same 4 x 4 blocks straight from memory, without workgroup memory or barriers: the choice
// for adapters that are CPU programs (lavapipe, SwiftShader), where barriers are costly (train/gpu.rs picks).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    pad: u32,
    a_row: u32, // A[i][k] = A[i * a_row + k * a_col]
    a_col: u32,
    b_row: u32, // B[k][j] = B[k * b_row + j * b_col]
    b_col: u32,
}

@group(0) @binding(0) var<storage, read> A: array<f32>;
@group(0) @binding(1) var<storage, read> B: array<f32>;
@group(0) @binding(2) var<storage, read_write> C: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;

var<workgroup> tile_a: array<f32, 1024>; // 64 rows x 16
var<workgroup> tile_b: array<f32, 1024>; // 16 x 64 columns

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * 64u;
    let col0 = wg.x * 64u;
    let li = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < P.k; k0 += 16u) {
        for (var e = 0u; e < 4u; e++) {
            let idx = li + e * 256u;
            // A's tile: 64 rows x 16 of K.
            var r = idx / 16u;
            var kk = idx % 16u;
            if (P.a_row == 1u) {
                r = idx % 64u;
                kk = idx / 64u;
            }
            var a = 0.0;
            if (row0 + r < P.m && k0 + kk < P.k) {
                a = A[(row0 + r) * P.a_row + (k0 + kk) * P.a_col];
            }
            tile_a[r * 16u + kk] = a;
            // B's tile: 16 of K x 64 columns.
            var c = idx % 64u;
            var kb = idx / 64u;
            if (P.b_row == 1u) {
                c = idx / 16u;
                kb = idx % 16u;
            }
            var b = 0.0;
            if (col0 + c < P.n && k0 + kb < P.k) {
                b = B[(k0 + kb) * P.b_row + (col0 + c) * P.b_col];
            }
            tile_b[kb * 64u + c] = b;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = tile_a[(lid.y + 16u * i) * 16u + kk];
                b[i] = tile_b[kk * 64u + lid.x + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] += a[i] * b[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let c = col0 + lid.x + 16u * j;
            if (r < P.m && c < P.n) {
                C[r * P.n + c] = acc[i * 4u + j];
            }
        }
    }
}

@compute @workgroup_size(8, 8)
fn direct(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * 32u + lid.y * 4u;
    let col0 = wg.x * 32u + lid.x * 4u;
    if (row0 >= P.m || col0 >= P.n) {
        return;
    }
    // Rows and columns past the edge repeat the last one (their sums are computed and dropped).
    var rows: array<u32, 4>;
    var cols: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        rows[i] = min(row0 + i, P.m - 1u) * P.a_row;
        cols[i] = min(col0 + i, P.n - 1u) * P.b_col;
    }
    var acc: array<f32, 16>;
    for (var k = 0u; k < P.k; k++) {
        var a: array<f32, 4>;
        var b: array<f32, 4>;
        for (var i = 0u; i < 4u; i++) {
            a[i] = A[rows[i] + k * P.a_col];
            b[i] = B[k * P.b_row + cols[i]];
        }
        for (var i = 0u; i < 4u; i++) {
            for (var j = 0u; j < 4u; j++) {
                acc[i * 4u + j] += a[i] * b[j];
            }
        }
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            if (row0 + i < P.m && col0 + j < P.n) {
                C[(row0 + i) * P.n + col0 + j] = acc[i * 4u + j];
            }
        }
    }
}

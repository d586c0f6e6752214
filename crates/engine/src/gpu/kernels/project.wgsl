// Setting the projection of residual rows onto a unit direction (Stolfo et al.'s format steering). One workgroup
// per row. Entry point:
//   set_projection   Y[row] += (P.value - dot(Y[row], U)) * U
// CPU twin: set_projection in model/cpu.rs.

struct Params {
    width: u32,   // values per row
    value: f32,   // the projection every row is given
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> U: array<f32>;
@group(0) @binding(1) var<storage, read_write> Y: array<f32>;
@group(0) @binding(2) var<uniform> P: Params;
@group(0) @binding(3) var<uniform> S: Step;

@compute @workgroup_size(64)
fn set_projection(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = wg.x * P.width;
    var s = 0.0;
    for (var i = li; i < P.width; i += 64u) {
        s += Y[base + i] * U[i];
    }
    let shift = P.value - workgroup_sum(s, li);
    for (var i = li; i < P.width; i += 64u) {
        Y[base + i] += shift * U[i];
    }
}

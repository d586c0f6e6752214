//! Training data with a known answer, and the training test both devices pass.
#![allow(dead_code)]

pub mod kernel_checks;

use saif::train::{train_on, TrainConfig, TrainError};
use saif_engine::gpu::Gpu;

pub fn generator(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` rows of `d` values, each the sum of 3 of `atoms` random unit directions (the dictionary, from
/// `dictionary_seed`) with random positive weights (from `draw_seed`).
pub fn sparse_data(n: usize, d: usize, atoms: usize, dictionary_seed: u64, draw_seed: u64) -> Vec<f32> {
    let mut next = generator(dictionary_seed);
    let dict: Vec<Vec<f32>> = (0..atoms)
        .map(|_| {
            let v: Vec<f64> = (0..d).map(|_| next() - 0.5).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| (x / norm) as f32).collect()
        })
        .collect();
    let mut next = generator(draw_seed);
    let mut rows = Vec::with_capacity(n * d);
    for _ in 0..n {
        let mut row = vec![0f32; d];
        for _ in 0..3 {
            let atom = &dict[(next() * atoms as f64) as usize % atoms];
            let w = (0.5 + next() * 2.0) as f32;
            row.iter_mut().zip(atom).for_each(|(r, a)| *r += w * a);
        }
        rows.extend(row);
    }
    rows
}

pub fn config() -> TrainConfig {
    let mut c = TrainConfig::new(64, 4);
    c.epochs = 8;
    c.batch = 128;
    c.lr = 3e-3;
    c.seed = 7;
    c.dead_after = 4000;
    c.aux_k = 16;
    c.checkpoint_every = 10;
    c
}

pub fn fvu(sae: &saif::Sae, rows: &[f32], d: usize) -> f64 {
    let n = rows.len() / d;
    let mean: Vec<f64> =
        (0..d).map(|j| rows.iter().skip(j).step_by(d).map(|&x| x as f64).sum::<f64>() / n as f64).collect();
    let (mut err, mut var) = (0.0, 0.0);
    for r in rows.chunks(d) {
        let recon = sae.decode(&sae.encode_sparse(r));
        for j in 0..d {
            err += (r[j] as f64 - recon[j] as f64).powi(2);
            var += (r[j] as f64 - mean[j]).powi(2);
        }
    }
    err / var
}

/// A TopK SAE with enough latents reconstructs 3-sparse data well; the same seed gives the same SAE; a run stopped
/// midway and resumed from its checkpoint ends exactly where an uninterrupted run ends. On the CPU, or on `gpu`.
pub fn learns_repeatably_and_resumes(gpu: Option<&Gpu>) {
    let d = 32;
    let rows = sparse_data(4096, d, 48, 99, 1);
    let held_out = sparse_data(512, d, 48, 99, 2); // the same dictionary, other draws
    let (sae, report) = train_on(gpu, &rows, d, &config(), None, |_| true).unwrap();
    assert_eq!(report.tokens, 4096);
    let quality = fvu(&sae, &rows, d);
    assert!(quality < 0.15, "FVU {quality} on data that is exactly 3-sparse in 48 atoms");
    assert!(fvu(&sae, &held_out, d) < 0.2);
    assert_eq!(sae.info.activation, saif::Activation::TopK { k: 4 });

    // The same seed, the same SAE.
    let (again, _) = train_on(gpu, &rows, d, &config(), None, |_| true).unwrap();
    assert_eq!(sae.w_enc, again.w_enc);
    assert_eq!(sae.w_dec, again.w_dec);

    // Stopped at step 75, then resumed from the checkpoint written then: the same SAE.
    let dir = std::env::temp_dir().join(format!("saif-resume-{}-{}", std::process::id(), gpu.is_some()));
    std::fs::create_dir_all(&dir).unwrap();
    let checkpoint = dir.join("checkpoint.safetensors");
    let stopped = train_on(gpu, &rows, d, &config(), Some(&checkpoint), |s| s.step < 75);
    assert!(matches!(stopped, Err(TrainError::Stopped { step: 75 })));
    assert!(checkpoint.exists());
    let (resumed, report) = train_on(gpu, &rows, d, &config(), Some(&checkpoint), |_| true).unwrap();
    assert_eq!(report.resumed_from_step, 75);
    assert_eq!(resumed.w_dec, sae.w_dec, "a resumed run ends where an uninterrupted one does");
    assert_eq!(resumed.b_enc, sae.b_enc);
    assert!(
        !checkpoint.exists() && !checkpoint.with_extension("json").exists(),
        "the checkpoint goes once the run is complete"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

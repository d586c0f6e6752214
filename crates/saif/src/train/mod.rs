//! Training TopK sparse autoencoders (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") on
//! residual-stream activations, on the CPU (`cpu`: candle-core's autograd) or a GPU (`gpu`: WGSL kernels with
//! hand-written gradients, natively through wgpu). This module holds what both share: the scaling of the data, the
//! initialisation, the order of the batches, the dead-latent bookkeeping, the checkpoints and the export; a
//! `Stepper` does one optimisation step on its device.
//!
//! - Inputs are scaled to unit mean norm; the scale is folded back into the weights when the SAE is exported, so
//!   the saved SAE reads raw activations (Gemma Scope's form, `sae::Sae`).
//! - Encoder `pre = (x - b_dec) W_enc + b_enc`, latents the k largest of `relu(pre)`, decoder `a W_dec + b_dec`
//!   with unit-norm decoder rows (renormalised after every step). `W_enc` starts as `W_dec^T`, `b_dec` as the mean.
//! - Loss: squared error over the variance of the batch (the fraction of variance unexplained), plus 1/32 of the
//!   AuxK loss: latents that have not fired for `dead_after` tokens reconstruct what the others miss, which brings
//!   dead latents back.
//! - Adam by hand (so its moments go into checkpoints): an interrupted run resumes from its last checkpoint and
//!   ends where an uninterrupted one would. Everything random comes from the seed.

pub mod cpu;
pub mod gpu;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use saif_engine::gpu::Gpu;
use serde::{Deserialize, Serialize};

use crate::sae::{Activation, Sae, SaeInfo};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub d_sae: usize,
    pub k: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Latents silent for this many training tokens count as dead (and join the AuxK loss).
    pub dead_after: usize,
    /// Latents the AuxK loss uses per token (at most the number of dead ones).
    pub aux_k: usize,
    pub aux_weight: f64,
    /// Steps between checkpoints (0: none).
    pub checkpoint_every: usize,
}

impl TrainConfig {
    pub fn new(d_sae: usize, k: usize) -> Self {
        Self {
            d_sae,
            k,
            epochs: 4,
            batch: 1024,
            lr: 4e-4,
            seed: 0,
            dead_after: 200_000,
            aux_k: 256,
            aux_weight: 1.0 / 32.0,
            checkpoint_every: 100,
        }
    }
}

/// What the trainer reports after each step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    /// Fraction of variance unexplained on the batch.
    pub fvu: f64,
    pub aux_loss: f64,
    /// Latents dead by the `dead_after` rule.
    pub dead: usize,
}

/// How a training run went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub tokens: usize,
    pub steps: usize,
    pub final_batch_fvu: f64,
    pub resumed_from_step: usize,
}

/// A deterministic xorshift generator (initialisation and the order of batches).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub(crate) fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

type CResult<T> = candle_core::Result<T>;

/// The parameters in training order (`NAMES`) and Adam's first and second moments of each, as plain vectors: what
/// a checkpoint holds and what moves between the trainer and a device. Shapes: `w_enc` d x d_sae, `b_enc` d_sae,
/// `w_dec` d_sae x d, `b_dec` d (row-major).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct State {
    pub params: [Vec<f32>; 4],
    pub m: [Vec<f32>; 4],
    pub v: [Vec<f32>; 4],
}

const NAMES: [&str; 4] = ["w_enc", "b_enc", "w_dec", "b_dec"];

fn shapes(d: usize, d_sae: usize) -> [Vec<usize>; 4] {
    [vec![d, d_sae], vec![d_sae], vec![d_sae, d], vec![d]]
}

/// One batch for a step.
pub(crate) struct Batch<'a> {
    /// `rows x d` scaled activations.
    pub x: &'a [f32],
    pub rows: usize,
    /// Latents dead by the `dead_after` rule; the AuxK loss uses them when there are any.
    pub dead: &'a [bool],
    pub n_dead: usize,
    /// Adam's step count, from 1.
    pub t: usize,
}

/// What a step measured.
pub(crate) struct StepOutcome {
    pub fvu: f64,
    pub aux_loss: f64,
    /// Latents among the TopK of some row of the batch.
    pub fired: Vec<bool>,
}

/// One optimisation step (forward, loss, gradients, Adam, decoder-row normalisation) on some device.
pub(crate) trait Stepper {
    fn step(&mut self, batch: &Batch) -> Result<StepOutcome, TrainError>;
    /// The parameters and moments now (for checkpoints and the export).
    fn state(&mut self) -> Result<State, TrainError>;
}

/// Adam's constants (the CPU and GPU steps use the same).
pub(crate) const BETA1: f64 = 0.9;
pub(crate) const BETA2: f64 = 0.999;
pub(crate) const EPS: f64 = 1e-8;

/// The index of the k largest values of each row that are positive, as a 0/1 mask (lower index first among
/// equals), restricted to `allowed` columns when given. The reference the GPU's `top_k` kernel must match.
pub fn top_k_mask(values: &[f32], rows: usize, cols: usize, k: usize, allowed: Option<&[bool]>) -> Vec<f32> {
    let mut mask = vec![0f32; rows * cols];
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        row.copy_from_slice(&values[r * cols..(r + 1) * cols]);
        if let Some(allowed) = allowed {
            row.iter_mut().zip(allowed).for_each(|(v, &ok)| {
                if !ok {
                    *v = 0.0
                }
            });
        }
        crate::sae::top_k_relu(&mut row, k);
        for (m, v) in mask[r * cols..(r + 1) * cols].iter_mut().zip(&row) {
            *m = if *v > 0.0 { 1.0 } else { 0.0 };
        }
    }
    mask
}

/// Why a training run ended without an SAE.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The progress callback asked to stop; the last checkpoint lets the run resume.
    #[error("training stopped at step {step}; run the same command again to resume from its checkpoint")]
    Stopped { step: usize },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("GPU training: {0}")]
    Gpu(String),
}

impl From<saif_engine::EngineError> for TrainError {
    fn from(e: saif_engine::EngineError) -> Self {
        TrainError::Gpu(e.to_string())
    }
}

/// The initial parameters: decoder rows random unit vectors, the encoder their transpose, `b_enc` zero, `b_dec`
/// the data's mean; moments zero.
fn initial_state(data: &[f32], n: usize, d: usize, config: &TrainConfig) -> CResult<State> {
    let d_sae = config.d_sae;
    let mut rng = Rng::new(config.seed);
    let w_dec0: Vec<f32> = (0..d_sae * d).map(|_| rng.normal()).collect();
    let w_dec0 = cpu::normalize_rows(&Tensor::from_vec(w_dec0, (d_sae, d), &Device::Cpu)?)?;
    let mean: Vec<f32> = (0..d).map(|j| data.iter().skip(j).step_by(d).sum::<f32>() / n as f32).collect();
    let params = [
        w_dec0.t()?.contiguous()?.flatten_all()?.to_vec1()?,
        vec![0f32; d_sae],
        w_dec0.flatten_all()?.to_vec1()?,
        mean,
    ];
    let zeros = || params.clone().map(|p| vec![0f32; p.len()]);
    Ok(State { m: zeros(), v: zeros(), params })
}

/// Trains on `rows` (`n x d`, row-major) on the CPU; checkpoints into `checkpoint` (and resumes from it when it
/// exists and was made with the same configuration on the same data). `progress` returns false to stop the run
/// (after a checkpoint).
pub fn train(
    rows: &[f32],
    d: usize,
    config: &TrainConfig,
    checkpoint: Option<&Path>,
    progress: impl FnMut(&StepReport) -> bool,
) -> Result<(Sae, TrainReport), TrainError> {
    train_on(None, rows, d, config, checkpoint, progress)
}

/// As `train`, on `gpu` when given (natively: a browser cannot wait for the GPU inside a step). A checkpoint made
/// on one device resumes on the other.
pub fn train_on(
    gpu: Option<&Gpu>,
    rows: &[f32],
    d: usize,
    config: &TrainConfig,
    checkpoint: Option<&Path>,
    mut progress: impl FnMut(&StepReport) -> bool,
) -> Result<(Sae, TrainReport), TrainError> {
    let n = rows.len() / d;
    let (d_sae, k) = (config.d_sae, config.k);
    // Unit mean norm.
    let mean_norm =
        rows.chunks(d).map(|r| r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()).sum::<f64>() / n as f64;
    let scale = (1.0 / mean_norm) as f32;
    let data: Vec<f32> = rows.iter().map(|x| x * scale).collect();
    let data_id = data_fingerprint(&data);

    let mut state = initial_state(&data, n, d, config)?;
    // Tokens seen when each latent last fired.
    let mut last_fired = vec![0usize; d_sae];
    let steps_per_epoch = n / config.batch.max(1);
    let steps = steps_per_epoch * config.epochs;
    let mut start_step = 0;
    if let Some(path) = checkpoint.filter(|p| p.exists()) {
        if let Some((step, fired, saved)) = load_checkpoint(path, config, &data_id, d)? {
            start_step = step;
            last_fired = fired;
            state = saved;
        }
    }
    let mut stepper: Box<dyn Stepper + '_> = match gpu {
        None => Box::new(cpu::CpuStepper::new(&state, d, config)?),
        Some(gpu) => Box::new(gpu::GpuStepper::new(gpu, &state, d, config)?),
    };
    drop(state);

    let mut order: Vec<usize> = Vec::new();
    let mut last_fvu = f64::NAN;
    let mut x = Vec::with_capacity(config.batch * d);
    for step in start_step..steps {
        let (epoch, in_epoch) = (step / steps_per_epoch, step % steps_per_epoch);
        if order.is_empty() || in_epoch == 0 || step == start_step {
            // The order of an epoch depends only on the seed and the epoch, so a resumed run sees the same batches.
            order = (0..n).collect();
            Rng::new(config.seed ^ (epoch as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d)).shuffle(&mut order);
        }
        let batch_rows = &order[in_epoch * config.batch..(in_epoch + 1) * config.batch];
        x.clear();
        for &r in batch_rows {
            x.extend_from_slice(&data[r * d..(r + 1) * d]);
        }
        let b = batch_rows.len();
        let seen = (step + 1) * b;
        let dead: Vec<bool> = last_fired.iter().map(|&t| seen - t.min(seen) > config.dead_after).collect();
        let n_dead = dead.iter().filter(|&&x| x).count();
        let outcome = stepper.step(&Batch { x: &x, rows: b, dead: &dead, n_dead, t: step + 1 })?;
        for (j, f) in outcome.fired.iter().enumerate() {
            if *f {
                last_fired[j] = seen;
            }
        }

        last_fvu = outcome.fvu;
        let report = StepReport { step: step + 1, steps, fvu: last_fvu, aux_loss: outcome.aux_loss, dead: n_dead };
        let go_on = progress(&report);
        if let Some(path) = checkpoint {
            let due = config.checkpoint_every > 0 && (step + 1) % config.checkpoint_every == 0;
            if (due || !go_on) && step + 1 < steps {
                save_checkpoint(path, config, &data_id, step + 1, &stepper.state()?, &last_fired)?;
            }
        }
        if !go_on && step + 1 < steps {
            return Err(TrainError::Stopped { step: step + 1 });
        }
    }
    if let Some(path) = checkpoint {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(meta_path(path));
    }
    let sae = export(&stepper.state()?, scale, k, d, d_sae)?;
    Ok((sae, TrainReport { tokens: n, steps, final_batch_fvu: last_fvu, resumed_from_step: start_step }))
}

/// How fast training steps run (`saif bench-train`).
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub device: String,
    /// Median over the timed steps, after one untimed step.
    pub ms_per_step: f64,
    pub steps: usize,
    pub tokens_per_second: f64,
    /// With a GPU and `profile`: milliseconds per kernel in one step, each dispatch alone (largest first).
    pub kernels: Option<Vec<(String, f64)>>,
}

/// Times `steps` training steps on random activations of width `d` with `config`'s shape (batch, latents, k), on
/// the CPU or on `gpu`. One latent in a hundred counts as dead, so the AuxK loss takes part as in a real run.
pub fn time_steps(
    gpu: Option<&Gpu>,
    d: usize,
    config: &TrainConfig,
    steps: usize,
    profile: bool,
) -> Result<StepTiming, TrainError> {
    let mut rng = Rng::new(config.seed);
    let rows: Vec<f32> = (0..config.batch * d).map(|_| rng.normal()).collect();
    let state = initial_state(&rows, config.batch, d, config)?;
    let dead: Vec<bool> = (0..config.d_sae).map(|i| i % 100 == 0).collect();
    let n_dead = dead.iter().filter(|&&x| x).count();
    let batch = |t| Batch { x: &rows, rows: config.batch, dead: &dead, n_dead, t };
    let (mut stepper, device): (Box<dyn Stepper + '_>, String) = match gpu {
        None => (Box::new(cpu::CpuStepper::new(&state, d, config)?), "cpu".into()),
        Some(g) => (Box::new(gpu::GpuStepper::new(g, &state, d, config)?), format!("wgpu {}", g.describe())),
    };
    stepper.step(&batch(1))?;
    let mut times = Vec::new();
    for t in 0..steps {
        let start = std::time::Instant::now();
        stepper.step(&batch(t + 2))?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let ms_per_step = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let kernels = match gpu {
        Some(g) if profile => Some(gpu::GpuStepper::new(g, &state, d, config)?.profile(&batch(1))?),
        _ => None,
    };
    Ok(StepTiming {
        device,
        ms_per_step,
        steps,
        tokens_per_second: config.batch as f64 / ms_per_step * 1000.0,
        kernels,
    })
}

/// The trained SAE in Gemma Scope's form on raw activations: `pre = x (s W_enc) + (b_enc - b_dec W_enc)`,
/// `x_hat = a (W_dec / s) + b_dec / s`, where `s` scaled the inputs to unit mean norm.
fn export(state: &State, scale: f32, k: usize, d: usize, d_sae: usize) -> CResult<Sae> {
    let [w_enc, b_enc, w_dec, b_dec] = state.params.clone();
    let w_enc = &Tensor::from_vec(w_enc, (d, d_sae), &Device::Cpu)?;
    let b_dec = &Tensor::from_vec(b_dec, d, &Device::Cpu)?;
    let shift = b_dec.unsqueeze(0)?.matmul(w_enc)?.squeeze(0)?;
    let b_enc = (Tensor::from_vec(b_enc, d_sae, &Device::Cpu)? - shift)?;
    Ok(Sae {
        info: SaeInfo {
            activation: Activation::TopK { k },
            d_in: d,
            d_sae,
            layer: None,
            model: None,
            trained_on: None,
            extra: serde_json::json!({}),
        },
        w_enc: (w_enc * scale as f64)?.flatten_all()?.to_vec1()?,
        w_dec: (Tensor::from_vec(w_dec, (d_sae, d), &Device::Cpu)? / scale as f64)?.flatten_all()?.to_vec1()?,
        b_enc: b_enc.to_vec1()?,
        b_dec: (b_dec / scale as f64)?.to_vec1()?,
        threshold: vec![0.0; d_sae],
    })
}

/// A short fingerprint of the training data, so a checkpoint is only resumed on the data it was made with.
fn data_fingerprint(data: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in data.iter().step_by(97) {
        h = (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{:016x}-{}", h, data.len())
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    config: TrainConfig,
    data: String,
    step: usize,
}

fn meta_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

fn save_checkpoint(
    path: &Path,
    config: &TrainConfig,
    data: &str,
    step: usize,
    state: &State,
    last_fired: &[usize],
) -> CResult<()> {
    let shapes = shapes(state.params[3].len(), state.params[1].len());
    let mut tensors = std::collections::HashMap::new();
    for (i, name) in NAMES.iter().enumerate() {
        let tensor = |values: &Vec<f32>| Tensor::from_vec(values.clone(), shapes[i].as_slice(), &Device::Cpu);
        tensors.insert(name.to_string(), tensor(&state.params[i])?);
        tensors.insert(format!("adam_m.{name}"), tensor(&state.m[i])?);
        tensors.insert(format!("adam_v.{name}"), tensor(&state.v[i])?);
    }
    let fired: Vec<u32> = last_fired.iter().map(|&t| t as u32).collect();
    tensors.insert("last_fired".into(), Tensor::new(fired.as_slice(), &Device::Cpu)?);
    // The step goes with the weights, in one file renamed into place: an interruption anywhere leaves either the
    // previous checkpoint or this one, never a mix. The JSON beside it only says what run it belongs to.
    tensors.insert("step".into(), Tensor::new(&[step as u32], &Device::Cpu)?);
    let meta = CheckpointMeta { config: config.clone(), data: data.to_string(), step };
    std::fs::write(meta_path(path), serde_json::to_string(&meta).expect("serializes"))?;
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Restores a checkpoint made with the same configuration on the same data: returns its step, firing record and
/// state.
fn load_checkpoint(
    path: &Path,
    config: &TrainConfig,
    data: &str,
    d: usize,
) -> CResult<Option<(usize, Vec<usize>, State)>> {
    let Ok(text) = std::fs::read_to_string(meta_path(path)) else { return Ok(None) };
    let Ok(meta) = serde_json::from_str::<CheckpointMeta>(&text) else { return Ok(None) };
    if meta.config != *config || meta.data != data {
        return Ok(None);
    }
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let needed = NAMES.iter().flat_map(|n| [n.to_string(), format!("adam_m.{n}"), format!("adam_v.{n}")]);
    if !needed.chain(["last_fired".into(), "step".into()]).all(|n| tensors.contains_key(&n)) {
        return Ok(None); // an older or foreign file: start afresh rather than fail
    }
    let shapes = shapes(d, config.d_sae);
    let read = |name: &str, i: usize| -> CResult<Option<Vec<f32>>> {
        let t = &tensors[name];
        (t.dims() == shapes[i].as_slice()).then(|| t.flatten_all().and_then(|t| t.to_vec1())).transpose()
    };
    let mut state = State { params: Default::default(), m: Default::default(), v: Default::default() };
    for (i, name) in NAMES.iter().enumerate() {
        let (Some(p), Some(m), Some(v)) =
            (read(name, i)?, read(&format!("adam_m.{name}"), i)?, read(&format!("adam_v.{name}"), i)?)
        else {
            return Ok(None);
        };
        (state.params[i], state.m[i], state.v[i]) = (p, m, v);
    }
    let fired = tensors["last_fired"].to_vec1::<u32>()?.into_iter().map(|t| t as usize).collect();
    Ok(Some((tensors["step"].to_vec1::<u32>()?[0] as usize, fired, state)))
}

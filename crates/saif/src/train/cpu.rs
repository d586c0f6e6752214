//! The training step on the CPU: the forward pass and the loss as candle-core tensors, the gradients by its
//! autograd, Adam by hand. The GPU step (`gpu.rs`) is checked against this one.

use candle_core::{Device, Tensor, Var, D};

use super::{top_k_mask, Batch, CResult, State, StepOutcome, Stepper, TrainConfig, TrainError, BETA1, BETA2, EPS};

/// One Adam update of a parameter at step `t` (from 1): the parameter and both moments after it, all detached (the
/// moments must not keep each step's graph alive: they did, out of memory). The GPU's `adam.wgsl` is its twin.
pub fn adam_update(param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor, t: usize, lr: f64) -> CResult<[Tensor; 3]> {
    let t = t as i32;
    let (c1, c2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
    let m = ((m * BETA1)? + (grad * (1.0 - BETA1))?)?.detach();
    let v = ((v * BETA2)? + (grad.sqr()? * (1.0 - BETA2))?)?.detach();
    let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + EPS)?)?;
    Ok([(param - (update * lr)?)?.detach(), m, v])
}

/// The rows of `w` divided by their norms (at least 1e-8): the decoder after each step. The GPU's `normalize_rows`
/// is its twin.
pub fn normalize_rows(w: &Tensor) -> CResult<Tensor> {
    let norms = w.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-8, f64::MAX)?;
    w.broadcast_div(&norms)
}

pub(crate) struct CpuStepper {
    /// `w_enc, b_enc, w_dec, b_dec`, in `NAMES` order.
    params: [Var; 4],
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    config: TrainConfig,
    d: usize,
}

impl CpuStepper {
    pub fn new(state: &State, d: usize, config: &TrainConfig) -> CResult<Self> {
        let shapes = super::shapes(d, config.d_sae);
        let tensor = |values: &Vec<f32>, i: usize| Tensor::from_vec(values.clone(), shapes[i].as_slice(), &Device::Cpu);
        let mut params = Vec::new();
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for i in 0..4 {
            params.push(Var::from_tensor(&tensor(&state.params[i], i)?)?);
            m.push(tensor(&state.m[i], i)?);
            v.push(tensor(&state.v[i], i)?);
        }
        let params = params.try_into().map_err(|_| candle_core::Error::Msg("four parameters".into()))?;
        Ok(Self { params, m, v, config: config.clone(), d })
    }
}

impl Stepper for CpuStepper {
    fn step(&mut self, batch: &Batch) -> Result<StepOutcome, TrainError> {
        let (config, dev) = (&self.config, &Device::Cpu);
        let [w_enc, b_enc, w_dec, b_dec] = &self.params;
        let (b, d_sae) = (batch.rows, config.d_sae);
        let x = Tensor::from_slice(batch.x, (b, self.d), dev)?;

        let pre = x.broadcast_sub(b_dec.as_tensor())?.matmul(w_enc.as_tensor())?.broadcast_add(b_enc.as_tensor())?;
        let relu = pre.relu()?;
        let relu_values = relu.flatten_all()?.to_vec1::<f32>()?;
        let mask = Tensor::from_vec(top_k_mask(&relu_values, b, d_sae, config.k, None), (b, d_sae), dev)?;
        let latents = (&relu * &mask)?;
        let recon = latents.matmul(w_dec.as_tensor())?.broadcast_add(b_dec.as_tensor())?;
        let err = (&x - &recon)?;
        let variance = x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.sum_all()?;
        let fvu = (err.sqr()?.sum_all()? / &variance)?;
        let mut loss = fvu.clone();

        let fired: Vec<bool> = mask.max(0)?.to_vec1::<f32>()?.iter().map(|&v| v > 0.0).collect();
        let mut aux_loss = 0.0;
        if batch.n_dead > 0 && config.aux_weight > 0.0 {
            let aux_k = config.aux_k.min(batch.n_dead);
            let aux_mask = top_k_mask(&relu_values, b, d_sae, aux_k, Some(batch.dead));
            let aux_latents = (&relu * Tensor::from_vec(aux_mask, (b, d_sae), dev)?)?;
            let target = err.detach();
            let aux_recon = aux_latents.matmul(w_dec.as_tensor())?;
            let target_var = target.broadcast_sub(&target.mean_keepdim(0)?)?.sqr()?.sum_all()?;
            let aux = ((&target - aux_recon)?.sqr()?.sum_all()? / target_var)?;
            aux_loss = aux.to_scalar::<f32>()? as f64;
            if aux_loss.is_finite() {
                loss = (loss + (aux * config.aux_weight)?)?;
            }
        }

        let grads = loss.backward()?;
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else { continue };
            let [param, m, v] =
                adam_update(&p.as_detached_tensor(), &g.detach(), &self.m[i], &self.v[i], batch.t, config.lr)?;
            (self.m[i], self.v[i]) = (m, v);
            p.set(&param)?;
        }
        w_dec.set(&normalize_rows(&w_dec.as_detached_tensor())?)?;
        Ok(StepOutcome { fvu: fvu.to_scalar::<f32>()? as f64, aux_loss, fired })
    }

    fn state(&mut self) -> Result<State, TrainError> {
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        let mut state = State { params: Default::default(), m: Default::default(), v: Default::default() };
        for i in 0..4 {
            state.params[i] = flat(self.params[i].as_tensor())?;
            state.m[i] = flat(&self.m[i])?;
            state.v[i] = flat(&self.v[i])?;
        }
        Ok(state)
    }
}

//! Training the [`InverseDynamics`] model: least squares of the logged bid
//! coefficient on (observed step, spend share of the tick, `ln(budget /
//! CPA)`), AdamW on random mini-batches, inputs normalised by the log's
//! mean and std (stored in the model).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;

use super::TrainError;
use crate::tar::data::{Dataset, SplitMix};
use crate::tar::inverse::{tensor_shapes, InverseDynamics, INVERSE_INPUTS};
use crate::tar::sim::MIN_BUDGET;

/// How [`train_inverse_dynamics`] trains.
#[derive(Debug, Clone, PartialEq)]
pub struct InverseTrainConfig {
    /// Hidden width.
    pub hidden: usize,
    /// AdamW steps.
    pub steps: usize,
    /// Samples per step.
    pub batch: usize,
    /// AdamW learning rate (cosine decay to a tenth).
    pub lr: f64,
    /// Initialisation and batch seed.
    pub seed: u64,
}

impl Default for InverseTrainConfig {
    /// Width 64, 3,000 steps of 256 samples at 2e-3: seconds on one core.
    fn default() -> Self {
        Self {
            hidden: InverseDynamics::DEFAULT_HIDDEN,
            steps: 3000,
            batch: 256,
            lr: 2e-3,
            seed: 1,
        }
    }
}

/// What training did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InverseTrainReport {
    /// Training samples (ticks with budget left).
    pub samples: usize,
    /// Mean squared error of the first and the last 100 steps' batches.
    pub mse_first: f32,
    /// See `mse_first`.
    pub mse_last: f32,
    /// Variance of the targets (the MSE of predicting their mean).
    pub target_variance: f32,
}

/// The regression samples of `data`: raw inputs and targets of every tick
/// that started with budget left.
pub fn inverse_samples(data: &Dataset) -> (Vec<[f32; INVERSE_INPUTS]>, Vec<f32>) {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for tr in &data.trajectories {
        let ticks = tr.steps.len();
        let lbc = (tr.budget.max(1e-9) / tr.cpa_target.max(1e-9)).ln() as f32;
        for t in 0..ticks.min(tr.actions.len()).min(tr.costs.len()) {
            let left = tr.steps[t][1] as f64 * tr.budget;
            if left < MIN_BUDGET {
                continue;
            }
            let share = tr.costs[t] / tr.budget.max(1e-9) as f32;
            xs.push(InverseDynamics::inputs(&tr.steps[t], share, ticks, lbc));
            ys.push(tr.actions[t]);
        }
    }
    (xs, ys)
}

/// Trains an inverse-dynamics model on `data` (see the module docs).
pub fn train_inverse_dynamics(
    data: &Dataset,
    config: &InverseTrainConfig,
) -> Result<(InverseDynamics, InverseTrainReport), TrainError> {
    if config.batch == 0 || config.steps == 0 || config.lr.is_nan() || config.lr <= 0.0 {
        return Err(TrainError::Config {
            field: "inverse",
            message: "steps, batch and lr must be positive".into(),
        });
    }
    let (xs, ys) = inverse_samples(data);
    if xs.len() < 2 {
        return Err(TrainError::Data(
            "fewer than 2 ticks with budget left".into(),
        ));
    }
    let n = xs.len();
    let mut mean = [0f64; INVERSE_INPUTS];
    let mut sq = [0f64; INVERSE_INPUTS];
    for x in &xs {
        for i in 0..INVERSE_INPUTS {
            mean[i] += x[i] as f64;
            sq[i] += (x[i] as f64).powi(2);
        }
    }
    let mean: Vec<f32> = mean.iter().map(|m| (m / n as f64) as f32).collect();
    let std: Vec<f32> = sq
        .iter()
        .zip(&mean)
        .map(|(s, &m)| ((s / n as f64 - (m as f64).powi(2)).max(0.0).sqrt() as f32).max(1e-3))
        .collect();
    let y_mean = ys.iter().map(|&y| y as f64).sum::<f64>() / n as f64;
    let target_variance =
        (ys.iter().map(|&y| (y as f64 - y_mean).powi(2)).sum::<f64>() / n as f64) as f32;

    let dev = Device::Cpu;
    let init = InverseDynamics::random(config.hidden, config.seed)?;
    let shapes = tensor_shapes(config.hidden);
    // Trainable: everything but the normalisation (tensors 2..).
    let vars: Vec<Var> = init
        .tensors()
        .iter()
        .zip(&shapes)
        .skip(2)
        .map(|((_, _, data), (_, shape))| {
            Var::from_tensor(&Tensor::from_slice(data, shape.as_slice(), &dev)?)
        })
        .collect::<candle_core::Result<_>>()?;
    let mut opt = candle_nn::AdamW::new(
        vars.clone(),
        candle_nn::ParamsAdamW {
            lr: config.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mean_t = Tensor::from_slice(&mean, (1, INVERSE_INPUTS), &dev)?;
    let std_t = Tensor::from_slice(&std, (1, INVERSE_INPUTS), &dev)?;
    let h = config.hidden;
    let forward = |x: &Tensor| -> candle_core::Result<Tensor> {
        let x = x.broadcast_sub(&mean_t)?.broadcast_div(&std_t)?;
        let lin = |x: &Tensor, w: &Var, b: &Var, out: usize| -> candle_core::Result<Tensor> {
            x.matmul(&w.as_tensor().t()?)?
                .broadcast_add(&b.as_tensor().reshape((1, out))?)
        };
        let h1 = lin(&x, &vars[0], &vars[1], h)?.relu()?;
        let h2 = lin(&h1, &vars[2], &vars[3], h)?.relu()?;
        lin(&h2, &vars[4], &vars[5], 1)
    };
    let mut rng = SplitMix::new(config.seed ^ 0x1f3d_5b79);
    let (mut first, mut last) = (Vec::new(), Vec::new());
    let mut bx = Vec::with_capacity(config.batch * INVERSE_INPUTS);
    let mut by = Vec::with_capacity(config.batch);
    for step in 0..config.steps {
        bx.clear();
        by.clear();
        for _ in 0..config.batch {
            let i = ((rng.uniform() * n as f64) as usize).min(n - 1);
            bx.extend_from_slice(&xs[i]);
            by.push(ys[i]);
        }
        let x = Tensor::from_slice(&bx, (config.batch, INVERSE_INPUTS), &dev)?;
        let y = Tensor::from_slice(&by, (config.batch, 1), &dev)?;
        let loss = (forward(&x)? - y)?.sqr()?.mean_all()?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainError::Diverged { step, loss: value });
        }
        if step < 100 {
            first.push(value);
        }
        if step + 100 >= config.steps {
            last.push(value);
        }
        let progress = step as f64 / config.steps as f64;
        let lr = config.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
        opt.set_learning_rate(lr);
        opt.backward_step(&loss)?;
    }
    let mut tensors = vec![mean, std];
    for v in &vars {
        tensors.push(
            v.as_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?,
        );
    }
    let model = InverseDynamics::from_tensors(config.hidden, tensors)?;
    let avg = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    Ok((
        model,
        InverseTrainReport {
            samples: n,
            mse_first: avg(&first),
            mse_last: avg(&last),
            target_variance,
        },
    ))
}

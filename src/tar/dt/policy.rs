//! [`DtPolicy`]: the Decision Transformer as a bidder in the simulator.

use std::collections::VecDeque;
use std::sync::Arc;

use super::config::STATE_FEATURES;
use super::model::DtModel;
use crate::tar::data::step_features;
use crate::tar::sim::{DayContext, Observation, Policy, MIN_BUDGET};

/// Largest bid coefficient the policy returns, as a multiple of the CPA
/// target.
pub const MAX_ALPHA_FACTOR: f64 = 10.0;

/// One step of the policy's context window.
#[derive(Debug, Clone, Copy)]
struct Step {
    tick: usize,
    rtg: f32,
    state: [f32; STATE_FEATURES],
    action: f32,
}

/// The Decision Transformer bidding for one advertiser (name `"dt"`).
///
/// At each tick `t`:
///
/// 1. the return-to-go drops by what the last tick brought,
///    `observed_conversions(t - 1) x CPA / budget`, from `R_0 =
///    target_return` (efficiency units, as in training);
/// 2. the state is [`step_features`] of the observation (with the previous
///    action `alpha_{t-1} / CPA`), its first 16 features;
/// 3. the window of the last `K` steps (`R`, `s`, and the actions already
///    taken) goes through [`DtModel::predict`];
/// 4. `alpha = prediction x CPA`, clamped to `[0, 10 x CPA]`.
///
/// If the model fails (a tick past its timestep table, a non-finite input
/// or output) the policy bids `alpha = CPA` for the tick and counts it
/// ([`fallbacks`](Self::fallbacks)); it never panics. The action recorded
/// for the next steps is what the simulator logs: 0 once the budget left
/// is below [`MIN_BUDGET`] (the simulator stops bidding then), as in the
/// training data.
#[derive(Debug, Clone)]
pub struct DtPolicy {
    model: Arc<DtModel>,
    target_return: f32,
    pvs_per_tick: f64,
    rtg: f64,
    prev_action: f64,
    window: VecDeque<Step>,
    fallbacks: u64,
    decisions: u64,
    rtg_buf: Vec<f32>,
    state_buf: Vec<f32>,
    action_buf: Vec<f32>,
}

impl DtPolicy {
    /// A policy asking `model` for a day of efficiency `target_return`
    /// (conversions x CPA / budget; e.g. a high quantile of the training
    /// days', [`day_return_quantile`](super::day_return_quantile)), in a
    /// market with `pvs_per_tick` expected PVs per tick (`pvs_per_day /
    /// ticks`, as [`step_features`] needs).
    pub fn new(model: impl Into<Arc<DtModel>>, target_return: f32, pvs_per_tick: f64) -> Self {
        Self {
            model: model.into(),
            target_return,
            pvs_per_tick,
            rtg: target_return as f64,
            prev_action: 0.0,
            window: VecDeque::new(),
            fallbacks: 0,
            decisions: 0,
            rtg_buf: Vec::new(),
            state_buf: Vec::new(),
            action_buf: Vec::new(),
        }
    }

    /// The model.
    pub fn model(&self) -> &DtModel {
        &self.model
    }

    /// The return the policy asks for at the start of a day.
    pub fn target_return(&self) -> f32 {
        self.target_return
    }

    /// The current return-to-go (after the last tick's conversions).
    pub fn return_to_go(&self) -> f64 {
        self.rtg
    }

    /// Decisions in which the model failed and the policy bid the CPA
    /// target instead (since construction).
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// Decisions taken (since construction).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// The model's prediction for the current window (`alpha / CPA`).
    fn predict(&mut self) -> Option<f32> {
        let start = self.window.front()?.tick;
        self.rtg_buf.clear();
        self.state_buf.clear();
        self.action_buf.clear();
        for s in &self.window {
            self.rtg_buf.push(s.rtg);
            self.state_buf.extend_from_slice(&s.state);
            self.action_buf.push(s.action);
        }
        self.action_buf.pop();
        let a = self
            .model
            .predict(&self.rtg_buf, &self.state_buf, &self.action_buf, start)
            .ok()?;
        a.is_finite().then_some(a)
    }
}

impl Policy for DtPolicy {
    fn name(&self) -> &str {
        "dt"
    }

    fn begin_day(&mut self, _day: &DayContext<'_>) {
        self.rtg = self.target_return as f64;
        self.prev_action = 0.0;
        self.window.clear();
    }

    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        self.decisions += 1;
        let cpa = obs.cpa_target;
        if let Some(last) = obs.last {
            if obs.budget > 0.0 && cpa.is_finite() {
                self.rtg -= last.observed_conversions as f64 * cpa / obs.budget;
            }
        }
        // A gap in the ticks (a day restarted without begin_day) breaks
        // the window: keep only contiguous steps.
        if self
            .window
            .back()
            .is_some_and(|s| s.tick.checked_add(1) != Some(obs.tick))
        {
            self.window.clear();
        }
        let x = step_features(obs.state, self.prev_action, cpa, self.pvs_per_tick);
        let mut state = [0f32; STATE_FEATURES];
        state.copy_from_slice(&x[..STATE_FEATURES]);
        self.window.push_back(Step {
            tick: obs.tick,
            rtg: self.rtg as f32,
            state,
            action: 0.0,
        });
        while self.window.len() > self.model.config().context {
            self.window.pop_front();
        }
        let alpha = match self.predict() {
            Some(a) if cpa.is_finite() && cpa > 0.0 => {
                (a as f64 * cpa).clamp(0.0, MAX_ALPHA_FACTOR * cpa)
            }
            _ => {
                self.fallbacks += 1;
                if cpa.is_finite() {
                    cpa.max(0.0)
                } else {
                    0.0
                }
            }
        };
        let taken = if obs.remaining < MIN_BUDGET || cpa.is_nan() || cpa <= 0.0 {
            0.0
        } else {
            alpha / cpa
        };
        if let Some(s) = self.window.back_mut() {
            s.action = taken as f32;
        }
        self.prev_action = taken;
        alpha
    }
}

//! Mean score of a policy over many days, with a 95% confidence interval.

use super::config::{SimConfig, SimError};
use super::episode::{run_episode, AdvertiserOutcome};
use super::policy::Policy;

/// A policy's scores over a range of seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The agent's score per day, in seed order.
    pub scores: Vec<f64>,
    /// Mean score.
    pub mean: f64,
    /// Half-width of the 95% confidence interval of the mean (Student's t
    /// with `n - 1` degrees of freedom; 0 for one day).
    pub ci95: f64,
    /// Mean true conversions of the agent per day.
    pub mean_conversions: f64,
    /// Mean of cost / budget of the agent.
    pub mean_spend_ratio: f64,
}

/// Two-sided 97.5% quantiles of Student's t, df = 1..=30.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// Mean and 95% CI half-width of `xs` (t-interval).
pub fn mean_ci95(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T975.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

/// Runs `policy` as the agent on the days `seeds` and summarises its
/// scores.
pub fn evaluate(
    config: &SimConfig,
    policy: &mut dyn Policy,
    seeds: std::ops::Range<u64>,
) -> Result<Evaluation, SimError> {
    if seeds.is_empty() {
        return Err(SimError::NoEpisodes);
    }
    let outcomes = seeds
        .map(|seed| Ok(run_episode(config, seed, policy)?.agent_outcome().clone()))
        .collect::<Result<Vec<_>, SimError>>()?;
    Ok(summarise(&outcomes))
}

/// The [`Evaluation`] of the agent's outcomes of some days (at least one):
/// the one summary for live days ([`evaluate`]) and replayed ones
/// ([`evaluate_replay`](super::evaluate_replay)).
pub(crate) fn summarise(outcomes: &[AdvertiserOutcome]) -> Evaluation {
    let scores: Vec<f64> = outcomes.iter().map(|a| a.score).collect();
    let n = outcomes.len().max(1) as f64;
    let conv: f64 = outcomes.iter().map(|a| a.conversions as f64).sum();
    let spend: f64 = outcomes.iter().map(|a| a.cost / a.budget).sum();
    let (mean, ci95) = mean_ci95(&scores);
    Evaluation {
        mean,
        ci95,
        mean_conversions: conv / n,
        mean_spend_ratio: spend / n,
        scores,
    }
}

//! A bidding policy wrapper that records every alpha the wrapped policy
//! returns and the day's CPA target, for tests that check a learned
//! bidder's outputs over a simulated day. Included with `#[path]`.
#![allow(dead_code)]

use nann::tar::sim::{DayContext, Observation, Policy};

/// Wraps a policy and records every alpha it returns.
pub struct Recording<P> {
    pub inner: P,
    pub alphas: Vec<f64>,
    pub cpa: f64,
}

impl<P> Recording<P> {
    /// Wraps `inner` with nothing recorded yet.
    pub fn new(inner: P) -> Self {
        Self {
            inner,
            alphas: Vec::new(),
            cpa: 0.0,
        }
    }
}

impl<P: Policy> Policy for Recording<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.cpa = day.cpa_target;
        self.inner.begin_day(day);
    }
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        let a = self.inner.act(obs);
        self.alphas.push(a);
        a
    }
}

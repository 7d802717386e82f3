//! TAR (trajectory-autoregressive auto-bidding, issue 7).
//!
//! * [`sim`]: the environment: an AuctionNet-like day of second-price
//!   auctions with budget- and CPA-constrained advertisers, the 16-feature
//!   step records, and the classic baselines (PID pacing, OnlineLP).
//! * [`data`]: trajectories of many advertiser-days under diverse behaviour
//!   policies, the offline data the learned bidders train on.
//! * [`model`]: the TAR model (multi-scale residual VQ-VAE and scale-level
//!   causal transformer): CPU inference and the equations the trainer
//!   implements.
//! * [`TarPolicy`]: TAR as a bidder in the simulator (re-plans every tick
//!   from the observed prefix and reads its action from the plan).
//! * [`inverse`]: the inverse-dynamics model that turns a plan's next
//!   budget step into a bid coefficient.
//! * [`dt`]: the Decision-Transformer baseline and its bidder.
//! * `train` (feature `train`): both trained with candle on CPU.
//!
//! `cargo run --release --features train --example tar_eval -- --json`
//! trains everything on a simulated log and plays test days against PID and
//! OnlineLP; see `BENCHMARKS.md` for where TAR stands.

pub mod data;
pub mod dt;
pub mod inverse;
pub mod model;
pub mod sim;
mod tar_policy;
#[cfg(feature = "train")]
pub mod train;
mod weights_file;

pub use tar_policy::{MarketReading, TarPolicy};

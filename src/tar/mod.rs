//! TAR (trajectory-autoregressive auto-bidding, issue 7): the environment it
//! is trained and evaluated in.
//!
//! Only the simulator exists so far ([`sim`]): an AuctionNet-like day of
//! second-price auctions with budget- and CPA-constrained advertisers, the
//! 16-feature step records that trajectory models train on, and the classic
//! baselines (PID pacing, OnlineLP) that any learned bidder must beat.

pub mod sim;

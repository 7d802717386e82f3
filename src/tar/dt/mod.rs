//! The Decision-Transformer baseline (placeholder: being written).

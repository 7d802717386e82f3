//! Training the Decision-Transformer baseline (placeholder: being written).

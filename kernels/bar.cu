// bar.cu: the BAR-specific last step. Everything before it is building
// blocks (matmul, attention, gather, elementwise); see src/cuda/scorer.rs
// for the whole forward pass and how it mirrors src/bar/model.rs.

// Per candidate r (one warp each):
//   score[r] = ecpm_mlp.1(he[r])                        (the retrieval score)
// and, when heads != null, heads[r] = (pctr, pbid_ratio, score) with
//   pctr = sigmoid(ctr_mlp.1(hb[r, 0..H])), pbid_ratio = bid_mlp.1(hb[r, H..2H]).
// hb [rows, 2H] (ldhb) holds [h_ctr | h_bid] after relu, he [rows, H] (ldhe)
// relu(ecpm_mlp.0(...)); w_* are the one-output layers' [1, H] weights.
extern "C" __global__ void nann_bar_outputs(const float* hb, int ldhb, const float* he, int ldhe,
                                            const float* w_ctr, float b_ctr, const float* w_bid,
                                            float b_bid, const float* w_ecpm, float b_ecpm, int h,
                                            int rows, float* scores, float* heads) {
  const int lane = threadIdx.x & 31;
  const nann_i64 row = (nann_i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together
  float se = 0.0f;
  for (int c = lane; c < h; c += 32) se = fmaf(he[row * ldhe + c], w_ecpm[c], se);
  const float score = nann_warp_sum(se) + b_ecpm;
  if (heads != 0) {
    float sc = 0.0f, sb = 0.0f;
    for (int c = lane; c < h; c += 32) {
      sc = fmaf(hb[row * ldhb + c], w_ctr[c], sc);
      sb = fmaf(hb[row * ldhb + h + c], w_bid[c], sb);
    }
    sc = nann_warp_sum(sc) + b_ctr;
    sb = nann_warp_sum(sb) + b_bid;
    if (lane == 0) {
      heads[row * 3 + 0] = nann_sigmoid(sc);
      heads[row * 3 + 1] = sb;
      heads[row * 3 + 2] = score;
    }
  }
  if (lane == 0) scores[row] = score;
}

// gather.cu: embedding lookups and candidate gathers.

// out[i * T + j, :] = tables[(base[j] + ids[i * T + j]) * e + :] for the
// `rows` candidates' T token ids: every ad token table concatenated into
// one [sum_j vocab_j, e] buffer, table j starting at row base[j]. An id
// outside its table (vocab[j]) gives a NaN row instead of a stray read
// (the host checks ids first; this is the device-side guard).
//
// One thread per output element; consecutive threads write consecutive
// columns (coalesced).
extern "C" __global__ void nann_gather_tokens(const float* tables, const int* base,
                                              const int* vocab, const nann_u32* ids, int rows,
                                              int t, int e, float* out) {
  NANN_GRID_LOOP(i, (nann_i64)rows * t * e) {
    nann_i64 tok = i / e;  // i * T + j
    int c = (int)(i - tok * e);
    int j = (int)(tok % t);
    nann_u32 id = ids[tok];
    out[i] = id < (nann_u32)vocab[j] ? tables[((nann_i64)base[j] + id) * e + c] : nann_nan();
  }
}

// out[i, :] = table[ids[i], :] (f32, `width` columns, out leading dim ldo):
// a batch of candidates' z_a from the device-resident ad table. An id
// >= table_rows gives a NaN row.
extern "C" __global__ void nann_gather_rows_f32(const float* table, int table_rows, int width,
                                                const nann_u32* ids, int rows, float* out,
                                                int ldo) {
  NANN_GRID_LOOP(i, (nann_i64)rows * width) {
    nann_i64 r = i / width;
    int c = (int)(i - r * width);
    nann_u32 id = ids[r];
    out[r * ldo + c] = id < (nann_u32)table_rows ? table[(nann_i64)id * width + c] : nann_nan();
  }
}

// out[i, :] = table[ids[i], :] (u32 token ids, `width` per row). An id >=
// table_rows gives 0xffffffff ids, which nann_gather_tokens turns to NaN.
extern "C" __global__ void nann_gather_rows_u32(const nann_u32* table, int table_rows, int width,
                                                const nann_u32* ids, int rows, nann_u32* out) {
  NANN_GRID_LOOP(i, (nann_i64)rows * width) {
    nann_i64 r = i / width;
    int c = (int)(i - r * width);
    nann_u32 id = ids[r];
    out[i] = id < (nann_u32)table_rows ? table[(nann_i64)id * width + c] : 0xffffffffu;
  }
}

// ids[i] = start + i: the identity gather, for scoring a whole table.
extern "C" __global__ void nann_iota_u32(nann_u32* ids, nann_u32 start, int n) {
  NANN_GRID_LOOP(i, n) { ids[i] = start + (nann_u32)i; }
}

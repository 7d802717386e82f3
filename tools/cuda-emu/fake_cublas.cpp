#include <cstdlib>
#include <cstdio>
extern "C" {
int cublasCreate_v2(void** h) { *h = malloc(16); return 0; }
int cublasDestroy_v2(void* h) { free(h); return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }
int cublasSetMathMode(void*, int m) { if (m != 0 && m != 3) return 7; return 0; }
int cublasGetMathMode(void*, int* m) { *m = 0; return 0; }
// Column-major C = alpha op(A) op(B) + beta C; beta == 0: C is not read.
int cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* A,
                   int lda, const float* B, int ldb, const float* beta, float* C, int ldc) {
  if (m < 0 || n < 0 || k < 0) return 7;
  if (lda < (ta ? k : m) || ldb < (tb ? n : k) || ldc < m) { fprintf(stderr, "EMU cublas: bad ld\n"); return 7; }
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double acc = 0;
      for (int l = 0; l < k; ++l) {
        float a = ta ? A[(long)i * lda + l] : A[(long)l * lda + i];
        float b = tb ? B[(long)l * ldb + j] : B[(long)j * ldb + l];
        acc += (double)a * b;
      }
      float c = *alpha * (float)acc;
      if (*beta != 0.0f) c += *beta * C[(long)j * ldc + i];
      C[(long)j * ldc + i] = c;
    }
  return 0;
}
}

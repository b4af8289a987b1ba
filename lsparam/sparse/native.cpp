// Sparse kernels for SLTrain's CPU path, on token-major activations and a CSR support with int32 indices
// whose columns are sorted within each row (as SparseSupport builds them):
//   spmm_add:   out += x Sᵀ          (the forward, and dX = dY S on the transposed support)
//   entry_dots: out[k] = Σ_t dY[t, row k] · x[t, col k]   (dV, the values' gradient)
//
// Why our own: PyTorch's CPU routes (embedding_bag, CSR spmm, sampled_addmm) read a random row of the
// features-major activations from L2 or memory for every sparse entry, and need those activations
// transposed in separate passes. Here a block of tokens is transposed once into a buffer the threads
// share, and the support is walked in column tiles whose slice of that buffer fits in L1: each sparse
// entry then costs one or a few vector loads from L1 and as many fused multiply-adds.
//
// Vectors are GCC/Clang vector extensions of 64 bytes: AVX-512 where the CPU has it, else split by the
// compiler into AVX2 or SSE halves. Built at first use by lsparam/sparse/native.py, called through ctypes.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 64 / sizeof(T);
};
template <typename T>
using V = typename Vec<T>::type;

// Measured best of 16-40 KiB tiles and 32-256 row blocks at 2048x2048 (48 KiB L1d, 2 MiB L2 per core)
constexpr int64_t TILE_BYTES = 32 * 1024;  // a column tile of the transposed block, read from L1d
constexpr int64_t ROW_BLOCK = 128;         // rows a thread takes at a time: each tile is reused by all of them

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> aligned_vectors(int64_t count) {  // 64-byte aligned, for vector loads
  const size_t bytes = std::max<int64_t>(count, 1) * sizeof(T);
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
}

// starts[r * (tiles + 1) + j]: the first entry of row r with a column in tile j (columns [j * width, ...)).
std::vector<int32_t> tile_starts(const int32_t* crow, const int32_t* col, int64_t rows, int64_t width, int64_t tiles) {
  std::vector<int32_t> starts(rows * (tiles + 1));
  for (int64_t r = 0; r < rows; ++r) {
    int32_t k = crow[r];
    for (int64_t j = 0; j < tiles; ++j) {
      starts[r * (tiles + 1) + j] = k;
      while (k < crow[r + 1] && col[k] < (j + 1) * width) ++k;
    }
    starts[r * (tiles + 1) + tiles] = crow[r + 1];
  }
  return starts;
}

// xt[c * width + w] holds tokens t0 + w·lanes ... of column c of x (width vectors per column), zero past
// the last token. Called inside a parallel region: columns are shared out, and the loop ends in a barrier.
template <typename T>
void transpose_block(const T* x, int64_t ldx, int64_t t0, int64_t n, int64_t features, int64_t width, V<T>* xt) {
  constexpr int64_t L = Vec<T>::lanes;
#pragma omp for schedule(static)
  for (int64_t c = 0; c < features; ++c) {
    for (int64_t w = 0; w < width; ++w) {
      V<T> v = {};
      for (int64_t t = 0; t < L && w * L + t < n; ++t) v[t] = x[(t0 + w * L + t) * ldx + c];
      xt[c * width + w] = v;
    }
  }
}

// Sum of a vector's lanes by halving: the compiler emits extract-and-add, not one lane at a time.
template <typename T, int64_t Bytes>
T horizontal_sum(const void* v) {
  if constexpr (Bytes == sizeof(T)) {
    return *static_cast<const T*>(v);
  } else {
    typedef T half __attribute__((vector_size(Bytes / 2)));
    half lo, hi;
    std::memcpy(&lo, v, Bytes / 2);
    std::memcpy(&hi, static_cast<const char*>(v) + Bytes / 2, Bytes / 2);
    const half s = lo + hi;
    return horizontal_sum<T, Bytes / 2>(&s);
  }
}

template <typename T>
void spmm_add(const T* x, int64_t ldx, int64_t tokens, int64_t features, const int32_t* crow, const int32_t* col,
              const T* values, int64_t rows, T* out, int64_t ldo, int threads) {
  constexpr int64_t L = Vec<T>::lanes;  // tokens per block: one vector
  const int64_t tile = TILE_BYTES / sizeof(V<T>), tiles = (features + tile - 1) / tile;
  const std::vector<int32_t> starts = tile_starts(crow, col, rows, tile, tiles);
  auto xt = aligned_vectors<V<T>>(features);
#pragma omp parallel num_threads(threads)
  for (int64_t t0 = 0; t0 < tokens; t0 += L) {
    const int64_t n = std::min(L, tokens - t0);
    transpose_block(x, ldx, t0, n, features, 1, xt.get());
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
      const int64_t r1 = std::min(r0 + ROW_BLOCK, rows);
      V<T> acc[ROW_BLOCK] = {};
      for (int64_t j = 0; j < tiles; ++j) {
        for (int64_t r = r0; r < r1; ++r) {
          const int32_t* s = starts.data() + r * (tiles + 1) + j;
          // four independent sums: one would wait on each fused multiply-add's latency
          V<T> a0 = acc[r - r0], a1 = {}, a2 = {}, a3 = {};
          int32_t k = s[0];
          for (; k + 4 <= s[1]; k += 4) {
            a0 += values[k] * xt[col[k]];
            a1 += values[k + 1] * xt[col[k + 1]];
            a2 += values[k + 2] * xt[col[k + 2]];
            a3 += values[k + 3] * xt[col[k + 3]];
          }
          for (; k < s[1]; ++k) a0 += values[k] * xt[col[k]];
          acc[r - r0] = (a0 + a1) + (a2 + a3);
        }
      }
      for (int64_t t = 0; t < n; ++t)
        for (int64_t r = r0; r < r1; ++r) out[(t0 + t) * ldo + r] += acc[r - r0][t];
    }  // the loop's barrier keeps xt until every row is done
  }
}

template <typename T>
void entry_dots(const T* grad, int64_t ldg, const T* x, int64_t ldx, int64_t tokens, int64_t features,
                const int32_t* crow, const int32_t* col, int64_t rows, T* out, int threads) {
  constexpr int64_t L = Vec<T>::lanes, W = 4;  // tokens per block: W vectors, one horizontal sum per entry
  const int64_t tile = TILE_BYTES / (W * sizeof(V<T>)), tiles = (features + tile - 1) / tile;
  const std::vector<int32_t> starts = tile_starts(crow, col, rows, tile, tiles);
  auto xt = aligned_vectors<V<T>>(features * W);
  std::fill(out, out + crow[rows], T(0));
#pragma omp parallel num_threads(threads)
  for (int64_t t0 = 0; t0 < tokens; t0 += W * L) {
    const int64_t n = std::min(W * L, tokens - t0);
    transpose_block(x, ldx, t0, n, features, W, xt.get());
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
      const int64_t r1 = std::min(r0 + ROW_BLOCK, rows);
      V<T> g[ROW_BLOCK][W] = {};  // the block's columns r0..r1 of grad
      for (int64_t t = 0; t < n; ++t)
        for (int64_t r = r0; r < r1; ++r) g[r - r0][t / L][t % L] = grad[(t0 + t) * ldg + r];
      for (int64_t j = 0; j < tiles; ++j) {
        for (int64_t r = r0; r < r1; ++r) {
          const int32_t* s = starts.data() + r * (tiles + 1) + j;
          for (int32_t k = s[0]; k < s[1]; ++k) {
            const V<T>* xc = xt.get() + static_cast<int64_t>(col[k]) * W;
            V<T> d = g[r - r0][0] * xc[0];
            for (int64_t w = 1; w < W; ++w) d += g[r - r0][w] * xc[w];
            out[k] += horizontal_sum<T, 64>(&d);
          }
        }
      }
    }
  }
}

}  // namespace

extern "C" {

void lsparam_spmm_add_f32(const float* x, int64_t ldx, int64_t tokens, int64_t features, const int32_t* crow,
                          const int32_t* col, const float* values, int64_t rows, float* out, int64_t ldo, int threads) {
  spmm_add(x, ldx, tokens, features, crow, col, values, rows, out, ldo, threads);
}
void lsparam_spmm_add_f64(const double* x, int64_t ldx, int64_t tokens, int64_t features, const int32_t* crow,
                          const int32_t* col, const double* values, int64_t rows, double* out, int64_t ldo,
                          int threads) {
  spmm_add(x, ldx, tokens, features, crow, col, values, rows, out, ldo, threads);
}
void lsparam_entry_dots_f32(const float* grad, int64_t ldg, const float* x, int64_t ldx, int64_t tokens,
                            int64_t features, const int32_t* crow, const int32_t* col, int64_t rows, float* out,
                            int threads) {
  entry_dots(grad, ldg, x, ldx, tokens, features, crow, col, rows, out, threads);
}
void lsparam_entry_dots_f64(const double* grad, int64_t ldg, const double* x, int64_t ldx, int64_t tokens,
                            int64_t features, const int32_t* crow, const int32_t* col, int64_t rows, double* out,
                            int threads) {
  entry_dots(grad, ldg, x, ldx, tokens, features, crow, col, rows, out, threads);
}
}

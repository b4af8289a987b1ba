// Sparse kernels for SLTrain's CPU path, on token-major activations and a CSR support as SparseSupport
// holds it: int32 row pointers and columns sorted within each row, uint16 (int32 past 65,536 wide):
//   spmm_add:   out (+)= x Sᵀ        (the forward)
//   spmm_t_add: out (+)= dY S        (dX: spmm_add on the transposed support, made for each call)
//   entry_dots: out[k] = Σ_t dY[t, row k] · x[t, col k]   (dV, the values' gradient)
//
// Why our own: PyTorch's CPU routes (embedding_bag, CSR spmm, sampled_addmm) read a random row of the
// features-major activations from L2 or memory for every sparse entry, and need those activations
// transposed in separate passes. Here each thread transposes its own block of tokens (a few vectors of
// tokens per column, in L2) with in-register tile transposes, and walks the support row by row: each
// sparse entry costs one vector load and one fused multiply-add per vector of tokens, summed in registers.
// Measured on 2-core VMs (recipes/bench/kernels.py): each product takes 0.1-0.3 of one dense GEMM's time
// at LLaMA shapes on Intel Sapphire Rapids (AVX-512), 0.09-0.16 on AMD EPYC Zen 3 (AVX2), against 0.03 of
// its FLOPs. What did not pay on the first: column tiles small enough for L1 (the per-row, per-tile
// bookkeeping cost more than L2 latency), accumulating in an L1 buffer in a flat entry order (one 64-byte
// store per entry), more than 128 bytes of tokens or four running sums per row in the forward, and
// threads sharing one transposed block (a barrier per block cost a quarter of the time).
// dX and dV in one pass over the transposed support (each entry's row of the gradient block loaded once
// for both products, x's column in registers) measured 3-17% less time than the two products apart on
// an AMD EPYC with AVX-512 (Zen 4), 4 vectors of tokens per entry, and more than them with fewer vectors
// (a horizontal sum per entry and 32 tokens) or with sums batched through tile transposes: about 1% of
// an SLTrain layer, not worth a fourth kernel.
//
// Vectors are GCC/Clang vector extensions as wide as the CPU's registers: 64 bytes with AVX-512, 32 with
// AVX/AVX2, 16 otherwise. A vector wider than the registers is split by the compiler into halves, and its
// shuffles into many more instructions: 64-byte vectors on an AVX2 CPU (AMD EPYC Zen 3) ran every product
// 5-8x slower than 32-byte ones. Built at first use by lsparam/sparse/native.py, called through ctypes.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <omp.h>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int64_t VECTOR_BYTES = 64;
#elif defined(__AVX__)
constexpr int64_t VECTOR_BYTES = 32;
#else
constexpr int64_t VECTOR_BYTES = 16;
#endif

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(VECTOR_BYTES)));
  static constexpr int64_t lanes = VECTOR_BYTES / sizeof(T);
};
template <typename T>
using V = typename Vec<T>::type;

// Vectors of tokens per block in spmm_add: 128 bytes of tokens per sparse entry, at most 4 vectors (its
// 2 x 4 running sums then fill half of AVX2's 16 registers).
constexpr int64_t SPMM_VECTORS = std::min<int64_t>(4, 128 / VECTOR_BYTES);

// Rows whose sums are kept before they are transposed into the output (or whose gradient columns are
// transposed in entry_dots): 64 to 256 measured alike.
constexpr int64_t ROW_BLOCK = 128;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> aligned_vectors(int64_t count) {  // 64-byte aligned, for vector loads
  const size_t bytes = std::max<int64_t>(count, 1) * sizeof(T);
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
}

// Square tiles of L×L scalars (L = lanes) are transposed in registers, L·log2(L) two-source shuffles
// per tile: a scalar transpose moves one element per load and store, and its stores or its loads stride
// across L cache lines. The shuffle masks are compile-time constants, so the compiler picks the ISA's
// own instructions for each round (unpack, shuffle, lane permutes) instead of general permutes.
template <typename T>
struct Transposer {
  static constexpr int64_t L = Vec<T>::lanes;
#if defined(__clang__)
  static constexpr bool in_registers = false;  // clang spells it __builtin_shufflevector: not written here
#else
  static constexpr bool in_registers = true;
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type Index;
  typedef Index Mask __attribute__((vector_size(VECTOR_BYTES)));

  // Round b swaps the off-diagonal blocks of b lanes: rows i and i + b (i & b == 0) become the low
  // halves of each block pair (lo) and the high halves (hi).
  template <int64_t b, size_t... lane>
  static Mask low_mask(std::index_sequence<lane...>) {
    return Mask{static_cast<Index>((lane & b) ? L + lane - b : lane)...};
  }
  template <int64_t b, size_t... lane>
  static Mask high_mask(std::index_sequence<lane...>) {
    return Mask{static_cast<Index>((lane & b) ? L + lane : lane + b)...};
  }
  template <int64_t b>
  static void rounds(V<T>* r) {
    const Mask low = low_mask<b>(std::make_index_sequence<L>()), high = high_mask<b>(std::make_index_sequence<L>());
    for (int64_t i = 0; i < L; ++i)
      if (!(i & b)) {
        const V<T> lo = __builtin_shuffle(r[i], r[i + b], low), hi = __builtin_shuffle(r[i], r[i + b], high);
        r[i] = lo;
        r[i + b] = hi;
      }
    if constexpr (b > 1) rounds<b / 2>(r);
  }
  static void transpose(V<T>* r) { rounds<L / 2>(r); }
#endif
};

// dst[j * stride][i] = src[i * ld + j] for i < n, j < m (n, m <= L), zero for i >= n: an n×m tile of a
// row-major matrix into m vectors.
template <typename T>
void load_transposed(const T* src, int64_t ld, int64_t n, int64_t m, V<T>* dst, int64_t stride) {
  constexpr int64_t L = Vec<T>::lanes;
  if constexpr (Transposer<T>::in_registers) {
    if (n == L && m == L) {
      V<T> r[L];
      for (int64_t i = 0; i < L; ++i) std::memcpy(&r[i], src + i * ld, sizeof(V<T>));
      Transposer<T>::transpose(r);
      for (int64_t j = 0; j < L; ++j) dst[j * stride] = r[j];
      return;
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    V<T> v = {};
    for (int64_t i = 0; i < n; ++i) v[i] = src[i * ld + j];
    dst[j * stride] = v;
  }
}

// dst[i * ld + j] (+)= src[j * stride][i] for i < n, j < m: the inverse of load_transposed, added to dst
// or, with overwrite, written over it.
template <typename T>
void put_transposed(const V<T>* src, int64_t stride, int64_t n, int64_t m, T* dst, int64_t ld, bool overwrite) {
  constexpr int64_t L = Vec<T>::lanes;
  if constexpr (Transposer<T>::in_registers) {
    if (n == L && m == L) {
      V<T> r[L];
      for (int64_t j = 0; j < L; ++j) r[j] = src[j * stride];
      Transposer<T>::transpose(r);
      for (int64_t i = 0; i < L; ++i) {
        V<T> d = r[i];
        if (!overwrite) {
          V<T> before;
          std::memcpy(&before, dst + i * ld, sizeof(V<T>));
          d += before;
        }
        std::memcpy(dst + i * ld, &d, sizeof(V<T>));
      }
      return;
    }
  }
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < n; ++i) dst[i * ld + j] = (overwrite ? T(0) : dst[i * ld + j]) + src[j * stride][i];
}

// Of a block's n tokens, how many fall in its vector w (full vectors first, then a partial one, then none).
template <typename T>
int64_t tokens_in_vector(int64_t n, int64_t w) {
  return std::max<int64_t>(0, std::min(Vec<T>::lanes, n - w * Vec<T>::lanes));
}

// Blocks of `width` vectors that `tokens` tokens make, the last one partial.
template <typename T>
int64_t token_blocks(int64_t tokens, int64_t width) {
  return (tokens + width * Vec<T>::lanes - 1) / (width * Vec<T>::lanes);
}

// Threads for `blocks` blocks of tokens: one block at least per thread.
inline int team_size(int threads, int64_t blocks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
}

// xt[c * width + w] holds tokens t0 + w·lanes ... of column c of x (width vectors per column, zero past
// the last token).
template <typename T>
void transpose_block(const T* x, int64_t ldx, int64_t t0, int64_t n, int64_t features, int64_t width, V<T>* xt) {
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t w = 0; w < width; ++w)
    for (int64_t c = 0; c < features; c += L) {
      load_transposed(x + (t0 + w * L) * ldx + c, ldx, tokens_in_vector<T>(n, w), std::min(L, features - c),
                      xt + c * width + w, width);
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

// Each thread takes whole blocks of tokens and transposes its own: no barrier between blocks, and no two
// threads write one row of out. A block is W vectors of tokens: SPMM_VECTORS for spmm_add (each entry's
// column and value loaded once for 128 bytes of tokens: 2 vectors with AVX-512, 20-25% faster than 1 and
// 4 no faster; 4 with AVX2, 5-10% faster than 2), up to 8 for entry_dots (one horizontal sum per entry and
// 8 vectors; 16 with AVX2 was slower); fewer where a thread would otherwise go without a block.
// I is the column index type: uint16_t for layers up to 65,536 wide, else int32_t.
// With overwrite, out = x Sᵀ: every row of every token is written (rows without entries as zeros), so
// out need not be zeroed first, and a GEMM can then add into it (its beta = 1) instead of this kernel
// reading the GEMM's output back: 2-6% less time for the forward's hidden x Bᵀ and sparse product.
template <typename T, int64_t W, typename I>
void spmm_add(const T* x, int64_t ldx, int64_t tokens, int64_t features, const int32_t* crow, const I* col,
              const T* values, int64_t rows, T* out, int64_t ldo, bool overwrite, int threads) {
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t blocks = token_blocks<T>(tokens, W);
#pragma omp parallel num_threads(team_size(threads, blocks))
  {
    auto xt = aligned_vectors<V<T>>(features * W);
    auto acc = aligned_vectors<V<T>>(ROW_BLOCK * W);  // the sums of rows r0..r1, W vectors each
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t t0 = b * W * L, n = std::min(W * L, tokens - t0);
      transpose_block(x, ldx, t0, n, features, W, xt.get());
      for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        const int64_t r1 = std::min(r0 + ROW_BLOCK, rows);
        for (int64_t r = r0; r < r1; ++r) {
          // two entries at a time into separate sums: one set would wait on each multiply-add's latency
          V<T> a[2][W] = {};
          int32_t k = crow[r];
          for (; k + 2 <= crow[r + 1]; k += 2)
            for (int64_t u = 0; u < 2; ++u) {
              const V<T>* column = xt.get() + static_cast<int64_t>(col[k + u]) * W;
              for (int64_t w = 0; w < W; ++w) a[u][w] += values[k + u] * column[w];
            }
          if (k < crow[r + 1]) {
            const V<T>* column = xt.get() + static_cast<int64_t>(col[k]) * W;
            for (int64_t w = 0; w < W; ++w) a[0][w] += values[k] * column[w];
          }
          for (int64_t w = 0; w < W; ++w) acc[(r - r0) * W + w] = a[0][w] + a[1][w];
        }
        for (int64_t w = 0; w < W; ++w)
          for (int64_t r = r0; r < r1; r += L)
            put_transposed(acc.get() + (r - r0) * W + w, W, tokens_in_vector<T>(n, w),
                           std::min(L, r1 - r), out + (t0 + w * L) * ldo + r, ldo, overwrite);
      }
    }
  }
}

template <typename T, typename I>
void spmm_add(const T* x, int64_t ldx, int64_t tokens, int64_t features, const int32_t* crow, const I* col,
              const T* values, int64_t rows, T* out, int64_t ldo, bool overwrite, int threads) {
  if (token_blocks<T>(tokens, SPMM_VECTORS) >= threads)
    return spmm_add<T, SPMM_VECTORS>(x, ldx, tokens, features, crow, col, values, rows, out, ldo, overwrite, threads);
  spmm_add<T, 1>(x, ldx, tokens, features, crow, col, values, rows, out, ldo, overwrite, threads);
}

// S's transpose in CSR form (crow_t, rows_t, values_t), by a counting sort over the row-major support:
// each thread counts the columns of its share of the rows, the counts give every thread where its entries
// of each column go, and each thread places its own (so each column's rows stay in order). Below
// PARALLEL_SORT_ENTRIES one thread does it all: its three barriers cost more than they save there. On a
// machine whose cores are busy with other processes, each barrier can wait a whole scheduler tick for a
// descheduled thread (40-48 ms for a 2-thread sort of 21k to 336k entries, measured on 2 shared cores,
// against 0.05-0.8 ms on one thread). Above it, a serial sort takes 5 ms or more (4.7% of dX's one-thread
// time at 4096×11008) and its share grows with the threads dX runs on.
constexpr int64_t PARALLEL_SORT_ENTRIES = int64_t(1) << 20;

template <typename T, typename I>
void transpose_support(int64_t rows, int64_t features, const int32_t* crow, const I* col, const T* values,
                       int32_t* crow_t, int32_t* rows_t, T* values_t, int threads) {
  const int64_t nnz = crow[rows];
  const int64_t wanted = nnz < PARALLEL_SORT_ENTRIES ? 1 : std::min<int64_t>(threads, rows);
  const int team = static_cast<int>(std::max<int64_t>(1, wanted));
  auto next = aligned_vectors<int32_t>(team * features);  // thread t's counts, then where its next entries go
#pragma omp parallel num_threads(team)
  {
    const int me = omp_get_thread_num(), running = omp_get_num_threads();  // OpenMP may grant fewer
    const auto row_at = [&](int64_t t) {  // the first row of thread t's share (shares of about nnz / running)
      return t >= running ? rows : std::lower_bound(crow, crow + rows, t * nnz / running) - crow;
    };
    const int64_t r0 = row_at(me), r1 = row_at(me + 1);
    int32_t* mine = next.get() + me * features;
    std::fill(mine, mine + features, 0);
    for (int32_t k = crow[r0]; k < crow[r1]; ++k) ++mine[col[k]];
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < features; ++c) {
      int32_t total = 0;
      for (int t = 0; t < running; ++t) total += next[t * features + c];
      crow_t[c + 1] = total;
    }
#pragma omp single
    {
      crow_t[0] = 0;
      for (int64_t c = 0; c < features; ++c) crow_t[c + 1] += crow_t[c];
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < features; ++c) {
      int32_t at = crow_t[c];
      for (int t = 0; t < running; ++t) {
        const int32_t count = next[t * features + c];
        next[t * features + c] = at;
        at += count;
      }
    }
    for (int64_t r = r0; r < r1; ++r)
      for (int32_t k = crow[r]; k < crow[r + 1]; ++k) {
        const int32_t p = mine[col[k]]++;
        rows_t[p] = static_cast<int32_t>(r);
        values_t[p] = values[k];
      }
  }
}

// dX: out += grad S, the forward's kernel on S's transpose, made for the call: the support holds no
// transposed copy between calls. Making it takes 1.5-2.3% of dX's time on one thread at LLaMA shapes from
// 512×1376 to 2048×5461. Walking the row-major support instead (each thread adding value · its block's
// grad[:, row] into the sums of the entry's column, kept for every column, then transposed into out)
// measured 1.15-1.4x the time of this route on one thread: each entry reads its column's sums from L2 and
// writes them back, where the gather only reads.
template <typename T, typename I>
void spmm_t_add(const T* grad, int64_t ldg, int64_t tokens, int64_t rows, const int32_t* crow, const I* col,
                const T* values, int64_t features, T* out, int64_t ldo, bool overwrite, int threads) {
  const int64_t nnz = crow[rows];
  auto crow_t = aligned_vectors<int32_t>(features + 1);
  auto rows_t = aligned_vectors<int32_t>(nnz);
  auto values_t = aligned_vectors<T>(nnz);
  transpose_support(rows, features, crow, col, values, crow_t.get(), rows_t.get(), values_t.get(), threads);
  spmm_add<T, int32_t>(grad, ldg, tokens, rows, crow_t.get(), rows_t.get(), values_t.get(), features, out, ldo,
                       overwrite, threads);
}

template <typename T, int64_t W, typename I>
void entry_dots(const T* grad, int64_t ldg, const T* x, int64_t ldx, int64_t tokens, int64_t features,
                const int32_t* crow, const I* col, int64_t rows, T* out, int threads) {
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t blocks = token_blocks<T>(tokens, W), nnz = crow[rows];
  const int team = team_size(threads, blocks);
  auto partial = aligned_vectors<T>((team - 1) * nnz);  // threads after the first sum into their own copy
#pragma omp parallel num_threads(team)
  {
    const int me = omp_get_thread_num();
    T* sums = me == 0 ? out : partial.get() + (me - 1) * nnz;
    std::fill(sums, sums + nnz, T(0));
    auto xt = aligned_vectors<V<T>>(features * W);
    auto g = aligned_vectors<V<T>>(ROW_BLOCK * W);  // columns r0..r1 of the block of grad, W vectors each
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t t0 = b * W * L, n = std::min(W * L, tokens - t0);
      transpose_block(x, ldx, t0, n, features, W, xt.get());
      for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        const int64_t r1 = std::min(r0 + ROW_BLOCK, rows);
        for (int64_t w = 0; w < W; ++w)
          for (int64_t r = r0; r < r1; r += L)
            load_transposed(grad + (t0 + w * L) * ldg + r, ldg, tokens_in_vector<T>(n, w),
                            std::min(L, r1 - r), g.get() + (r - r0) * W + w, W);
        for (int64_t r = r0; r < r1; ++r) {
          for (int32_t k = crow[r]; k < crow[r + 1]; ++k) {
            const V<T>* xc = xt.get() + static_cast<int64_t>(col[k]) * W;
            const V<T>* gr = g.get() + (r - r0) * W;
            V<T> d = gr[0] * xc[0];
            if constexpr (W >= 2) {  // two chains of multiply-adds: 2-7% faster than one with AVX2
              V<T> e = gr[1] * xc[1];
              for (int64_t w = 2; w < W; w += 2) { d += gr[w] * xc[w]; e += gr[w + 1] * xc[w + 1]; }
              d += e;
            }
            sums[k] += horizontal_sum<T, VECTOR_BYTES>(&d);
          }
        }
      }
    }  // the loop's barrier: every partial sum is complete
    const int running = omp_get_num_threads();  // OpenMP may grant fewer than asked (nested regions)
#pragma omp for schedule(static)
    for (int64_t k = 0; k < nnz; ++k)
      for (int t = 1; t < running; ++t) out[k] += partial[(t - 1) * nnz + k];
  }
}

template <typename T, typename I>
void entry_dots(const T* grad, int64_t ldg, const T* x, int64_t ldx, int64_t tokens, int64_t features,
                const int32_t* crow, const I* col, int64_t rows, T* out, int threads) {
  const auto busy = [&](int64_t w) { return token_blocks<T>(tokens, w) >= threads; };
  if (busy(8)) return entry_dots<T, 8>(grad, ldg, x, ldx, tokens, features, crow, col, rows, out, threads);
  if (busy(4)) return entry_dots<T, 4>(grad, ldg, x, ldx, tokens, features, crow, col, rows, out, threads);
  if (busy(2)) return entry_dots<T, 2>(grad, ldg, x, ldx, tokens, features, crow, col, rows, out, threads);
  return entry_dots<T, 1>(grad, ldg, x, ldx, tokens, features, crow, col, rows, out, threads);
}

}  // namespace

// The C ABI: lsparam_<product>_<f32|f64>_<u16|i32>, T the value type and I the column index type.
#define LSPARAM_EXPORT(T, TN, I, IN)                                                                            \
  extern "C" void lsparam_spmm_add_##TN##_##IN(const T* x, int64_t ldx, int64_t tokens, int64_t features,       \
                                               const int32_t* crow, const I* col, const T* values, int64_t rows, \
                                               T* out, int64_t ldo, int overwrite, int threads) {                \
    spmm_add(x, ldx, tokens, features, crow, col, values, rows, out, ldo, overwrite != 0, threads);             \
  }                                                                                                             \
  extern "C" void lsparam_spmm_t_add_##TN##_##IN(const T* grad, int64_t ldg, int64_t tokens, int64_t rows,      \
                                                 const int32_t* crow, const I* col, const T* values,            \
                                                 int64_t features, T* out, int64_t ldo, int overwrite,          \
                                                 int threads) {                                                 \
    spmm_t_add(grad, ldg, tokens, rows, crow, col, values, features, out, ldo, overwrite != 0, threads);        \
  }                                                                                                             \
  extern "C" void lsparam_entry_dots_##TN##_##IN(const T* grad, int64_t ldg, const T* x, int64_t ldx,           \
                                                 int64_t tokens, int64_t features, const int32_t* crow,         \
                                                 const I* col, int64_t rows, T* out, int threads) {             \
    entry_dots(grad, ldg, x, ldx, tokens, features, crow, col, rows, out, threads);                             \
  }

// The vector width this build uses, in bytes (64 with AVX-512, 32 with AVX/AVX2, 16 otherwise).
extern "C" int lsparam_vector_bytes() { return static_cast<int>(VECTOR_BYTES); }

LSPARAM_EXPORT(float, f32, uint16_t, u16)
LSPARAM_EXPORT(float, f32, int32_t, i32)
LSPARAM_EXPORT(double, f64, uint16_t, u16)
LSPARAM_EXPORT(double, f64, int32_t, i32)

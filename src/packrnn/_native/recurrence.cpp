// packrnn native backend: see recurrence.h for the algorithm and the buffer table.
//
// One translation unit on purpose (build time): BLAS glue, vectorisable elementwise kernels,
// the forward / backward time loops, and the operator registration.

#include "recurrence.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (NOTE [Subnormals])
#define PACKRNN_HAS_MXCSR 1
#endif

// ---------------------------------------------------------------------------------------------
// BLAS. libtorch_cpu exports the Fortran BLAS symbols of the MKL it is built with; calling them
// directly skips the dispatcher and tensor construction (a few microseconds per call, which is
// the whole cost of a step at small sizes). They are weak: a torch without them (e.g. another
// BLAS, other platform) still loads and uses the at::mm fallback below.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's C entry point (the lower-case name is the Fortran one, taking a pointer).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace packrnn {
namespace {

#define PR_INLINE inline __attribute__((always_inline))

enum class Mode { kRnnTanh, kRnnRelu, kLstm, kGru };

Mode parse_mode(const std::string& mode) {
  if (mode == "rnn_tanh") return Mode::kRnnTanh;
  if (mode == "rnn_relu") return Mode::kRnnRelu;
  if (mode == "lstm") return Mode::kLstm;
  if (mode == "gru") return Mode::kGru;
  TORCH_CHECK_VALUE(false, "mode: expected one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru', got '",
                    mode, "'");
}

int64_t gate_count(Mode m) {
  return m == Mode::kLstm ? 4 : (m == Mode::kGru ? 3 : 1);
}

bool blas_available(float*) { return sgemm_ != nullptr; }
bool blas_available(double*) { return dgemm_ != nullptr; }

void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
               const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C (M x N) = op(A) @ op(B) + beta * C, op(X) = X^T if tX; lda/ldb/ldc are row strides
// of the matrices as stored. (A row-major matrix is its transpose in column-major, so this is
// the column-major call C^T = op(B)^T @ op(A)^T.)
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const int64_t big = std::max({M, N, K, lda, ldb, ldc});
  if (blas_available(static_cast<T*>(nullptr)) && big <= INT_MAX) {
    blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M),
              static_cast<int>(K), T(1), B, static_cast<int>(ldb), A, static_cast<int>(lda), beta,
              C, static_cast<int>(ldc));
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor x = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1},
                                 opts);
    return t ? x.t() : x;
  };
  at::Tensor a = view(A, M, K, lda, ta);  // (M, K)
  at::Tensor b = view(B, K, N, ldb, tb);  // (K, N)
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);  // (M, N)
  if (beta == T(0)) {
    c.copy_(at::mm(a, b));
  } else {
    c.mul_(beta).add_(at::mm(a, b));
  }
}

// Per-step GEMMs run single-threaded: inside a parallel region each thread owns a slab of rows,
// and outside one the step was judged too small to split (MKL's own threading costs more than
// it saves there: ~1.5x slower at B=16). Thread-local; restores the global setting on exit.
struct SingleThreadedBlas {
  bool active;
  SingleThreadedBlas() : active(MKL_Set_Num_Threads_Local != nullptr) {
    if (active) MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (active) MKL_Set_Num_Threads_Local(0);  // 0 = back to the global setting
  }
};

// NOTE [Subnormals]
//   In long sequences the backward's gradients decay into subnormal floats, and x86 arithmetic
//   on them is many times slower (a T=400 LSTM training step: 301 ms with them, 34 ms without).
//   So the kernel flushes them inside its own loops: FTZ (a subnormal result becomes 0) and DAZ
//   (a subnormal input reads as 0), MXCSR bits 15 and 6, are set on entry and the thread's exact
//   MXCSR is restored on exit (exceptions too), on every thread the kernel runs on: the calling
//   thread at each entry point (its single-threaded loop and the GEMMs after the parallel
//   region), and each parallel task on its worker. The process-wide choice
//   (torch.set_flush_denormal) is never changed. PACKRNN_KEEP_SUBNORMALS=1, read per call,
//   keeps the caller's setting instead, on every thread of the call: IEEE subnormals unless the
//   user flushes them process-wide. BLAS's own worker threads (the large GEMMs over all rows
//   after the backward loop) are not the kernel's and keep their setting. Not x86: nothing is
//   changed, and kernel_info() says so.
class SubnormalMode {
 public:
  // The FTZ/DAZ bits a call runs with: both, unless PACKRNN_KEEP_SUBNORMALS=1, then the calling
  // thread's own. Read on the calling thread, at an entry point.
  static unsigned for_call() { return keep() ? current() : kBits; }
  // This thread's FTZ/DAZ bits.
  static unsigned current() {
#ifdef PACKRNN_HAS_MXCSR
    return _mm_getcsr() & kBits;
#else
    return 0;
#endif
  }
  // PACKRNN_KEEP_SUBNORMALS: unset, "" or "0" flush; "1" keeps.
  static bool keep() {
    const char* env = std::getenv("PACKRNN_KEEP_SUBNORMALS");
    const std::string value = env ? env : "";
    TORCH_CHECK_VALUE(value.empty() || value == "0" || value == "1",
                      "PACKRNN_KEEP_SUBNORMALS: expected 0 or 1, got '", value, "'");
    return value == "1";
  }

  // Sets this thread's FTZ/DAZ bits to `bits` until destruction, which restores the MXCSR.
  explicit SubnormalMode(unsigned bits) {
#ifdef PACKRNN_HAS_MXCSR
    saved_ = _mm_getcsr();
    _mm_setcsr((saved_ & ~kBits) | (bits & kBits));
#else
    (void)bits;
#endif
  }
  ~SubnormalMode() {
#ifdef PACKRNN_HAS_MXCSR
    _mm_setcsr(saved_);
#endif
  }
  SubnormalMode(const SubnormalMode&) = delete;
  SubnormalMode& operator=(const SubnormalMode&) = delete;

  static constexpr unsigned kBits = (1u << 15) | (1u << 6);  // FTZ | DAZ

 private:
  unsigned saved_ = 0;
};

// NOTE [Buffer cache]
//   The O(N) buffers (tens of MB at B=256) would be fresh memory on every call: the kernel then
//   zeroes every page on first touch, which costs ~40 % of the forward GEMMs' time. Large
//   buffers therefore come from a small cache of blocks released by earlier calls (a training
//   loop asks for the same sizes every step), and new blocks are 2 MiB aligned and advised as
//   transparent huge pages (what torch does under THP_MEM_ALLOC_ENABLE=1). The cache holds at
//   most PACKRNN_NATIVE_CACHE_MB (default 1024) MiB of free blocks; 0 disables it.
class BufferCache {
 public:
  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();  // never destroyed: deleters may run at exit
    return *cache;
  }

  // A block of at least `len` bytes (and at most 2x): from the cache, else newly allocated.
  std::pair<void*, size_t> take(size_t len) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = blocks_.size();
      for (size_t i = 0; i < blocks_.size(); ++i) {
        const size_t have = blocks_[i].second;
        if (have >= len && have <= 2 * len && (best == blocks_.size() || have < blocks_[best].second))
          best = i;
      }
      if (best != blocks_.size()) {
        auto block = blocks_[best];
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_ -= block.second;
        return block;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, len) != 0) return {nullptr, 0};
#ifdef MADV_HUGEPAGE
    madvise(p, len, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
#endif
    return {p, len};
  }

  void give(void* p, size_t len) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + len <= limit_) {
        blocks_.emplace_back(p, len);
        cached_ += len;
        return;
      }
    }
    std::free(p);
  }

  void clear() {
    std::vector<std::pair<void*, size_t>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(blocks_);
      cached_ = 0;
    }
    for (auto& b : blocks) std::free(b.first);
  }

  static constexpr size_t kHuge = size_t(2) << 20;

 private:
  BufferCache() {
    const char* env = std::getenv("PACKRNN_NATIVE_CACHE_MB");
    limit_ = (env && *env) ? size_t(std::max(0L, std::atol(env))) << 20 : size_t(1024) << 20;
  }
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;  // (pointer, bytes) of free blocks
  size_t cached_ = 0;
  size_t limit_ = 0;
};

// An uninitialised (rows, cols) tensor; large ones through the buffer cache.
at::Tensor empty_rows(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  constexpr size_t kHuge = BufferCache::kHuge;
  const size_t nbytes = size_t(rows) * size_t(cols) * opts.dtype().itemsize();
  if (nbytes < 2 * kHuge) return at::empty({rows, cols}, opts);
  const size_t len = (nbytes + kHuge - 1) / kHuge * kHuge;
  auto [p, got] = BufferCache::instance().take(len);
  if (p == nullptr) return at::empty({rows, cols}, opts);
  return at::from_blob(
      p, {rows, cols}, [got = got](void* q) { BufferCache::instance().give(q, got); }, opts);
}

// ---------------------------------------------------------------------------------------------
// Scalar math. float: exp / sigmoid / tanh written without libm calls so that the compiler
// vectorises the fused loops (the loops below are also compiled for AVX2+FMA and picked at run
// time). double: libm, exact to the last bit like torch's.

PR_INLINE float bits_to_float(int32_t i) { return __builtin_bit_cast(float, i); }
PR_INLINE int32_t float_to_bits(float f) { return __builtin_bit_cast(int32_t, f); }

// exp(x) for float, relative error ~2e-7: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2,
// Taylor polynomial through r^7, 2^n built in the exponent bits. Inputs clamped to [-87, 88].
PR_INLINE float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float kf = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round to nearest
  const float n = kf - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.98412698e-4f;  // 1/7!
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t scale = (float_to_bits(kf) - 0x4B400000 + 127) << 23;  // 2^n, n in [-126, 127]
  return p * bits_to_float(scale);
}

template <typename T>
struct Math;

template <>
struct Math<float> {
  static PR_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
  // 1 - 2 / (1 + e^{2x}): absolute error ~1e-7 (relative error grows only for |x| < 1e-3).
  static PR_INLINE float tanh(float x) { return 1.0f - 2.0f / (1.0f + exp_f32(2.0f * x)); }
};

template <>
struct Math<double> {
  static PR_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static PR_INLINE double tanh(double x) { return std::tanh(x); }
};

// ---------------------------------------------------------------------------------------------
// Fused elementwise passes. Each works on rows [r0, r1) of the active prefix of one step; every
// pointer is the row-0 base of its buffer for that step and each buffer has its own row stride.

// LSTM forward: gates = act(gx + s); c = f * c + i * g; hr = o * tanh(c).
template <typename T>
struct LstmFwd {
  const T* gx;   // (b_t, 4H) stride 4H: gates_x rows of the step
  const T* s;    // (b_t, 4H) stride 4H: h @ w_hh^T
  T* act;        // (b_t, 4H) stride 4H: i, f, g, o out
  T* c;          // (b_t, H)  stride H: cell state in/out
  T* hr;         // (b_t, ld_hr): o * tanh(c) out (output rows, or the projection input)
  int64_t ld_hr;
  int64_t H;
};

template <typename T>
PR_INLINE void lstm_fwd_rows(const LstmFwd<T>& a, int64_t r0, int64_t r1) {
  using M = Math<T>;
  const int64_t H = a.H;
  for (int64_t b = r0; b < r1; ++b) {
    const T* gx = a.gx + b * 4 * H;
    const T* s = a.s + b * 4 * H;
    T* act = a.act + b * 4 * H;
    T* c = a.c + b * H;
    T* hr = a.hr + b * a.ld_hr;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T i = M::sigmoid(gx[j] + s[j]);
      const T f = M::sigmoid(gx[H + j] + s[H + j]);
      const T g = M::tanh(gx[2 * H + j] + s[2 * H + j]);
      const T o = M::sigmoid(gx[3 * H + j] + s[3 * H + j]);
      const T cn = f * c[j] + i * g;
      act[j] = i;
      act[H + j] = f;
      act[2 * H + j] = g;
      act[3 * H + j] = o;
      c[j] = cn;
      hr[j] = o * M::tanh(cn);
    }
  }
}

// LSTM backward. dr = grad of hr (after grad_output was added; after the projection's backward
// if any). Writes the grads of the four pre-activations; dc becomes the grad of c_prev.
template <typename T>
struct LstmBwd {
  const T* act;     // (b_t, 4H) stride 4H: saved i, f, g, o
  const T* cells;   // (b_t, H)  stride H: saved c of the step
  const T* cprev0;  // c_prev of rows < split, stride H
  const T* cprev1;  // c_prev of rows >= split, stride H (reverse direction: c0)
  int64_t split;
  const T* dr;      // (b_t, ld_dr)
  int64_t ld_dr;
  T* dc;            // (b_t, H) stride H: in grad of c, out grad of c_prev
  T* dg;            // (b_t, 4H) stride 4H: out grads of i, f, g, o pre-activations
  int64_t H;
};

template <typename T>
PR_INLINE void lstm_bwd_rows(const LstmBwd<T>& a, int64_t r0, int64_t r1) {
  using M = Math<T>;
  const int64_t H = a.H;
  for (int64_t b = r0; b < r1; ++b) {
    const T* act = a.act + b * 4 * H;
    const T* cn = a.cells + b * H;
    const T* cp = (b < a.split ? a.cprev0 : a.cprev1) + b * H;
    const T* dr = a.dr + b * a.ld_dr;
    T* dc = a.dc + b * H;
    T* dg = a.dg + b * 4 * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T i = act[j], f = act[H + j], g = act[2 * H + j], o = act[3 * H + j];
      const T tc = M::tanh(cn[j]);
      const T d = dr[j];
      const T dcc = dc[j] + d * o * (T(1) - tc * tc);
      dg[j] = dcc * g * i * (T(1) - i);
      dg[H + j] = dcc * cp[j] * f * (T(1) - f);
      dg[2 * H + j] = dcc * i * (T(1) - g * g);
      dg[3 * H + j] = d * tc * o * (T(1) - o);
      dc[j] = dcc * f;
    }
  }
}

// GRU forward: r, z = sigmoid(gx + s + b_hh); hn = s_n + b_hn; n = tanh(gx_n + r * hn);
// h' = n + z * (h - n).
template <typename T>
struct GruFwd {
  const T* gx;   // (b_t, 3H) stride 3H
  const T* s;    // (b_t, 3H) stride 3H: h @ w_hh^T (no bias)
  const T* bhh;  // (3H,)
  T* act;        // (b_t, 4H) stride 4H: r, z, n, hn out
  T* h;          // (b_t, H) stride H: state in/out
  T* out;        // (b_t, H) stride H: output rows
  int64_t H;
};

template <typename T>
PR_INLINE void gru_fwd_rows(const GruFwd<T>& a, int64_t r0, int64_t r1) {
  using M = Math<T>;
  const int64_t H = a.H;
  const T* bh = a.bhh;
  for (int64_t b = r0; b < r1; ++b) {
    const T* gx = a.gx + b * 3 * H;
    const T* s = a.s + b * 3 * H;
    T* act = a.act + b * 4 * H;
    T* h = a.h + b * H;
    T* out = a.out + b * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T r = M::sigmoid(gx[j] + s[j] + bh[j]);
      const T z = M::sigmoid(gx[H + j] + s[H + j] + bh[H + j]);
      const T hn = s[2 * H + j] + bh[2 * H + j];
      const T n = M::tanh(gx[2 * H + j] + r * hn);
      const T hnew = n + z * (h[j] - n);
      act[j] = r;
      act[H + j] = z;
      act[2 * H + j] = n;
      act[3 * H + j] = hn;
      h[j] = hnew;
      out[j] = hnew;
    }
  }
}

template <typename T>
struct GruBwd {
  const T* act;    // (b_t, 4H) stride 4H: saved r, z, n, hn
  const T* hprev;  // (b_t, H) stride H
  T* dh;           // (b_t, H) stride H: in grad of h', out z * grad (the direct path to h_prev)
  T* dgx;          // (b_t, 3H) stride 3H: out grads of gates_x
  T* dgh;          // (b_t, 3H) stride 3H: out grads of h @ w_hh^T + b_hh
  int64_t H;
};

template <typename T>
PR_INLINE void gru_bwd_rows(const GruBwd<T>& a, int64_t r0, int64_t r1) {
  const int64_t H = a.H;
  for (int64_t b = r0; b < r1; ++b) {
    const T* act = a.act + b * 4 * H;
    const T* hp = a.hprev + b * H;
    T* dh = a.dh + b * H;
    T* dgx = a.dgx + b * 3 * H;
    T* dgh = a.dgh + b * 3 * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T r = act[j], z = act[H + j], n = act[2 * H + j], hn = act[3 * H + j];
      const T d = dh[j];
      const T dn = d * (T(1) - z) * (T(1) - n * n);
      const T dz = d * (hp[j] - n) * z * (T(1) - z);
      const T dr = dn * hn * r * (T(1) - r);
      dgx[j] = dr;
      dgx[H + j] = dz;
      dgx[2 * H + j] = dn;
      dgh[j] = dr;
      dgh[H + j] = dz;
      dgh[2 * H + j] = dn * r;
      dh[j] = d * z;
    }
  }
}

// RNN forward: h' = act(gx + s), written to the state and the output rows.
template <typename T>
struct RnnFwd {
  const T* gx;  // (b_t, H) stride H
  const T* s;   // (b_t, H) stride H
  T* h;         // (b_t, H) stride H
  T* out;       // (b_t, H) stride H
  int64_t H;
  bool relu;
};

template <typename T>
PR_INLINE void rnn_fwd_rows(const RnnFwd<T>& a, int64_t r0, int64_t r1) {
  using M = Math<T>;
  const int64_t H = a.H;
  for (int64_t b = r0; b < r1; ++b) {
    const T* gx = a.gx + b * H;
    const T* s = a.s + b * H;
    T* h = a.h + b * H;
    T* out = a.out + b * H;
    if (a.relu) {
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T v = gx[j] + s[j];
        const T y = v > T(0) ? v : T(0);
        h[j] = y;
        out[j] = y;
      }
    } else {
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T y = M::tanh(gx[j] + s[j]);
        h[j] = y;
        out[j] = y;
      }
    }
  }
}

template <typename T>
struct RnnBwd {
  const T* out;  // (b_t, H) stride H: saved h' of the step
  const T* dh;   // (b_t, H) stride H
  T* dgx;        // (b_t, H) stride H
  int64_t H;
  bool relu;
};

template <typename T>
PR_INLINE void rnn_bwd_rows(const RnnBwd<T>& a, int64_t r0, int64_t r1) {
  const int64_t H = a.H;
  for (int64_t b = r0; b < r1; ++b) {
    const T* y = a.out + b * H;
    const T* dh = a.dh + b * H;
    T* dgx = a.dgx + b * H;
    if (a.relu) {
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) dgx[j] = y[j] > T(0) ? dh[j] : T(0);
    } else {
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) dgx[j] = dh[j] * (T(1) - y[j] * y[j]);
    }
  }
}

// Run-time dispatch of the float kernels to an AVX2+FMA build of the same loops when the CPU has
// it (portable binary, no -march=native); double always uses the baseline build (libm).
#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

#define PACKRNN_KERNEL(NAME, ARGS)                                                           \
  __attribute__((target("avx2,fma"))) void NAME##_avx2(const ARGS<float>& a, int64_t r0,     \
                                                       int64_t r1) {                         \
    NAME<float>(a, r0, r1);                                                                  \
  }                                                                                          \
  void NAME##_base(const ARGS<float>& a, int64_t r0, int64_t r1) { NAME<float>(a, r0, r1); } \
  void NAME##_run(const ARGS<float>& a, int64_t r0, int64_t r1) {                            \
    if (cpu_has_avx2_fma()) {                                                                \
      NAME##_avx2(a, r0, r1);                                                                \
    } else {                                                                                 \
      NAME##_base(a, r0, r1);                                                                \
    }                                                                                        \
  }                                                                                          \
  void NAME##_run(const ARGS<double>& a, int64_t r0, int64_t r1) { NAME<double>(a, r0, r1); }
#else  // other architectures: the baseline build only (the compiler's default vector width)
bool cpu_has_avx2_fma() { return false; }

#define PACKRNN_KERNEL(NAME, ARGS)                                                           \
  void NAME##_run(const ARGS<float>& a, int64_t r0, int64_t r1) { NAME<float>(a, r0, r1); }  \
  void NAME##_run(const ARGS<double>& a, int64_t r0, int64_t r1) { NAME<double>(a, r0, r1); }
#endif

PACKRNN_KERNEL(lstm_fwd_rows, LstmFwd)
PACKRNN_KERNEL(lstm_bwd_rows, LstmBwd)
PACKRNN_KERNEL(gru_fwd_rows, GruFwd)
PACKRNN_KERNEL(gru_bwd_rows, GruBwd)
PACKRNN_KERNEL(rnn_fwd_rows, RnnFwd)
PACKRNN_KERNEL(rnn_bwd_rows, RnnBwd)

#undef PACKRNN_KERNEL

template <typename T>
PR_INLINE void add_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t r0,
                        int64_t r1, int64_t n) {
  for (int64_t b = r0; b < r1; ++b) {
    T* d = dst + b * ld_dst;
    const T* s = src + b * ld_src;
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) d[j] += s[j];
  }
}

// Hint the cache about `bytes` contiguous bytes the current thread will read soon.
inline void prefetch_rows(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t k = 0; k < bytes; k += 64) __builtin_prefetch(c + k, 0, 1);
}

template <typename T>
void copy_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t r0, int64_t r1,
               int64_t n) {
  if (ld_dst == n && ld_src == n) {
    std::memcpy(dst + r0 * n, src + r0 * n, sizeof(T) * n * (r1 - r0));
    return;
  }
  for (int64_t b = r0; b < r1; ++b) std::memcpy(dst + b * ld_dst, src + b * ld_src, sizeof(T) * n);
}

// ---------------------------------------------------------------------------------------------
// The packed layout of one call: per-step sizes and offsets, in torch's row order.
//
// NOTE [Padded layout]
//   With padded = true the rows are a time-major padded batch sorted longest first: step t's
//   rows start at off_t = t * B (B = the full batch, zero-length sequences included), N = T * B,
//   and b_t may be 0 (steps past the longest sequence). The active rows of step t are still
//   [off_t, off_t + b_t) (NOTE [Active prefix]), so the time loops are unchanged; the rows
//   [off_t + b_t, off_t + B) are padding: never read, and zero in every N-row buffer this
//   kernel returns or multiplies over all rows (zero_padding). That is the layout of a padded
//   batch with lengths: no packing copy, static shapes for torch.compile / torch.export.
struct Layout {
  std::vector<int64_t> sizes;    // (T,) b_t
  std::vector<int64_t> offsets;  // (T,) off_t
  int64_t rows = 0;              // N
  int64_t max_active = 0;        // b_0
  int64_t stride = 0;            // padded: B, the rows of every step; packed: 0
};

// Zeroes the padding rows [off_t + b_t, off_t + B) of an (N, width) buffer in the padded
// layout (NOTE [Padded layout]); nothing in the packed layout.
template <typename T>
void zero_padding(T* p, int64_t width, const Layout& L) {
  if (L.stride == 0) return;
  for (size_t t = 0; t < L.sizes.size(); ++t) {
    const int64_t first = L.offsets[t] + L.sizes[t], count = L.stride - L.sizes[t];
    if (count > 0) std::memset(p + first * width, 0, sizeof(T) * count * width);
  }
}

Layout make_layout(const at::Tensor& batch_sizes, int64_t n_rows, int64_t batch, bool padded) {
  TORCH_CHECK_TYPE(batch_sizes.scalar_type() == at::kLong && batch_sizes.device().is_cpu() &&
                       batch_sizes.dim() == 1,
                   "batch_sizes: expected a 1-D int64 CPU tensor, got ",
                   batch_sizes.scalar_type(), " ", batch_sizes.device(), " with ",
                   batch_sizes.dim(), " dims");
  Layout L;
  const at::Tensor bs = batch_sizes.contiguous();
  const int64_t* p = bs.data_ptr<int64_t>();
  const int64_t T = bs.numel();
  L.sizes.assign(p, p + T);
  L.offsets.resize(T);
  int64_t prev = T > 0 ? L.sizes[0] : 0;
  L.stride = padded ? batch : 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE((L.sizes[t] > 0 || padded) && L.sizes[t] >= 0 && L.sizes[t] <= prev,
                      "batch_sizes: expected ", padded ? "non-negative" : "positive",
                      ", non-increasing values, got ", L.sizes[t], " at step ", t, " after ",
                      prev);
    prev = L.sizes[t];
    L.offsets[t] = padded ? t * batch : L.rows;
    L.rows += padded ? batch : L.sizes[t];
  }
  L.max_active = T > 0 ? L.sizes[0] : 0;
  TORCH_CHECK_VALUE(L.rows == n_rows, "batch_sizes: expected ",
                    padded ? "T * B rows (padded layout), " : "them to sum to the ", n_rows,
                    padded ? " rows given" : " packed rows", ", got ", L.rows);
  TORCH_CHECK_VALUE(L.max_active <= batch, "h0: expected at least batch_sizes[0] = ",
                    L.max_active, " rows, got ", batch);
  return L;
}

// NOTE [Row slabs]
//   Sequences are independent of each other: row b at step t reads only row b's own state. So
//   the rows [0, b_0) are cut ONCE into contiguous slabs and every task runs the whole time loop
//   on its slab (at step t it updates slab ∩ [0, b_t)). There is no synchronisation between
//   threads inside the loop -- no barrier per step, and a thread that the OS delays holds up no
//   one else. Sorted rows make early slabs long-lived, so the cut balances work: each row costs
//   its length, and each step a slab is active costs a fixed overhead (GEMM call, streaming the
//   weights) of kStepOverheadRows rows.
//
// NOTE [Direction tasks]
//   The directions of a bidirectional layer are independent too, so one call runs them all in
//   ONE parallel region: its tasks are (direction, slab) pairs, with threads / D slabs per
//   direction (one whole direction per thread when threads <= D). A whole direction per thread
//   beats splitting each direction's rows: bigger per-step GEMMs, each thread streams only its
//   own w_hh, and both tasks have the same work.
constexpr double kStepOverheadRows = 4.0;
// Below this many FLOPs in the whole loop (all directions) one thread does everything
// (fork/join, and the smaller GEMMs of split slabs, would cost more than they save).
constexpr double kMinParallelFlops = 4e6;
// BLAS threads for the GEMMs over all rows only above this many FLOPs.
constexpr double kMinThreadedGemmFlops = 8e6;

struct Slab {
  int64_t r0, r1;
};

// Cuts rows [0, b_0) into at most `parts` slabs of balanced work (NOTE [Row slabs]).
std::vector<Slab> make_slabs(const Layout& L, int64_t parts) {
  const int64_t b0 = L.max_active;
  if (parts <= 1 || b0 < 2) return {{0, b0}};
  // len[b] = number of steps row b is active (rows are sorted longest first).
  std::vector<int64_t> len(b0, 0);
  for (int64_t b_t : L.sizes)
    if (b_t > 0) len[b_t - 1] += 1;  // padded layout: steps without active rows
  for (int64_t b = b0 - 2; b >= 0; --b) len[b] += len[b + 1];
  // Smallest max-slab-cost that fits into `parts` slabs (greedy check + bisection).
  auto cut = [&](double budget, std::vector<Slab>* out) {
    int64_t slabs = 0, r0 = 0;
    while (r0 < b0) {
      double cost = kStepOverheadRows * len[r0];
      int64_t r1 = r0;
      while (r1 < b0 && (r1 == r0 || cost + len[r1] <= budget)) cost += len[r1++];
      if (out) out->push_back({r0, r1});
      ++slabs;
      r0 = r1;
    }
    return slabs;
  };
  double lo = 0, hi = double(L.rows) + kStepOverheadRows * len[0];
  for (int it = 0; it < 50 && hi - lo > 0.5; ++it) {
    const double mid = 0.5 * (lo + hi);
    (cut(mid, nullptr) <= parts ? hi : lo) = mid;
  }
  std::vector<Slab> slabs;
  cut(hi, &slabs);
  return slabs;
}

// Runs the time loop of every job (one direction each) on every slab, all (job, slab) tasks in
// one parallel region (NOTE [Row slabs], NOTE [Direction tasks]). A job offers ascending() (its
// visiting order), flops_per_row_step() and step(t, r0, r1): step t on rows [r0, r1) (never
// empty), called concurrently for disjoint row ranges and different jobs.
template <typename Job>
void run_jobs(const std::vector<Job>& jobs, const Layout& L) {
  const int64_t T_steps = static_cast<int64_t>(L.sizes.size());
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  double flops = 0;
  int64_t active_rows = 0;
  for (int64_t b_t : L.sizes) active_rows += b_t;
  for (const Job& job : jobs) flops += double(active_rows) * job.flops_per_row_step();
  const int64_t threads = at::get_num_threads();
  const bool parallel = threads > 1 && flops >= kMinParallelFlops;
  const auto slabs = make_slabs(L, parallel ? threads / n_jobs : 1);
  std::vector<std::pair<const Job*, Slab>> tasks;
  for (const Job& job : jobs)
    for (const Slab& slab : slabs) tasks.emplace_back(&job, slab);
  const unsigned fp_bits = SubnormalMode::current();  // set by the entry point's guard
  auto loop = [&](const Job& job, const Slab& slab) {
    SubnormalMode fp(fp_bits);  // NOTE [Subnormals]: every thread, restored at task end
    SingleThreadedBlas guard;  // each thread (or the one thread) runs its own BLAS calls
    for (int64_t k = 0; k < T_steps; ++k) {
      const int64_t t = job.ascending() ? k : T_steps - 1 - k;
      const int64_t r1 = std::min(slab.r1, L.sizes[t]);
      if (slab.r0 < r1) job.step(t, slab.r0, r1);
    }
  };
  if (!parallel || tasks.size() == 1) {
    for (const auto& task : tasks) loop(*task.first, task.second);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) loop(*tasks[i].first, tasks[i].second);
  });
}

void check_tensor(const at::Tensor& x, const char* name, at::ScalarType dtype,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(x.device().is_cpu(), name, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.sizes().equals(shape), name, ": expected shape ", at::IntArrayRef(shape),
                    ", got ", x.sizes());
}

// The shapes every call shares, checked once at the boundary.
struct Dims {
  Mode mode;
  int64_t G, H, Hout, P, B;
};

Dims check_common(const std::string& mode_name, const at::Tensor& w_hh, const at::Tensor& h0,
                  const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& b_hh,
                  const std::optional<at::Tensor>& w_hr) {
  Dims d;
  d.mode = parse_mode(mode_name);
  d.G = gate_count(d.mode);
  const auto dtype = w_hh.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "w_hh: expected dtype float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(w_hh.dim() == 2 && w_hh.size(0) % d.G == 0,
                    "w_hh: expected shape (G*H, H_out) with G = ", d.G, ", got ", w_hh.sizes());
  d.H = w_hh.size(0) / d.G;
  d.Hout = w_hh.size(1);
  d.P = 0;
  TORCH_CHECK_VALUE(h0.dim() == 2, "h0: expected shape (B, ", d.Hout, "), got ", h0.sizes());
  d.B = h0.size(0);
  check_tensor(h0, "h0", dtype, {d.B, d.Hout});
  if (d.mode == Mode::kLstm) {
    TORCH_CHECK_VALUE(c0.has_value(), "c0: expected a (B, H) tensor for lstm, got None");
    check_tensor(*c0, "c0", dtype, {d.B, d.H});
    if (w_hr.has_value()) {
      d.P = w_hr->size(0);
      check_tensor(*w_hr, "w_hr", dtype, {d.Hout, d.H});
    } else {
      TORCH_CHECK_VALUE(d.Hout == d.H, "w_hh: expected shape (4H, H) without w_hr, got ",
                        w_hh.sizes());
    }
  } else {
    TORCH_CHECK_VALUE(!w_hr.has_value(), "w_hr: expected None for mode '", mode_name,
                      "', got a tensor");
    TORCH_CHECK_VALUE(d.Hout == d.H, "w_hh: expected shape (G*H, H), got ", w_hh.sizes());
  }
  if (d.mode == Mode::kGru) {
    if (b_hh.has_value()) check_tensor(*b_hh, "b_hh", dtype, {d.G * d.H});
  } else {
    TORCH_CHECK_VALUE(!b_hh.has_value(), "b_hh: expected None for mode '", mode_name,
                      "' (folded into gates_x), got a tensor");
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// The time loops. A call runs one job per direction (NOTE [Direction tasks]); a job owns that
// direction's buffers (recurrence.h) and does one step on a row range.

// The tensors of one direction of a forward call, checked and contiguous.
struct ForwardArgs {
  at::Tensor gates_x;               // (N, G*H)
  at::Tensor h0;                    // (B, H_out)
  std::optional<at::Tensor> c0;     // (B, H) lstm
  at::Tensor w_hh;                  // (G*H, H_out)
  std::optional<at::Tensor> b_hh;   // (G*H,) gru
  std::optional<at::Tensor> w_hr;   // (P, H) lstm with proj
  bool reverse;
};

// Forward time loop of one direction.
template <typename T>
struct ForwardJob {
  Dims d;
  bool reverse, need_backward;
  const Layout* L;
  ForwardArgs in;  // keeps the inputs alive
  at::Tensor output, h_n, c_n, S, act, cells, r_all, bias;
  int64_t act_width;
  const T *gx, *whh, *whr, *bias_p;
  T *out, *h, *c, *s, *act_p, *cells_p, *r_p;

  ForwardJob(const Dims& dims, const Layout& layout, ForwardArgs args, bool need_bwd)
      : d(dims), reverse(args.reverse), need_backward(need_bwd), L(&layout),
        in(std::move(args)) {
    const int64_t N = L->rows, H = d.H, Hout = d.Hout, P = d.P, GH = d.G * d.H;
    const int64_t b0 = L->max_active;
    const auto opts = in.gates_x.options();
    const bool lstm = d.mode == Mode::kLstm, gru = d.mode == Mode::kGru;
    output = empty_rows(N, Hout, opts);                        // (N, H_out)
    h_n = in.h0.clone();                                       // (B, H_out) running state
    if (lstm) c_n = in.c0->clone();                            // (B, H)
    S = at::empty({b0, GH}, opts);                             // (b_0, G*H) scratch
    act_width = gru ? 4 * H : GH;
    if (lstm || gru) act = empty_rows(need_backward ? N : b0, act_width, opts);  // (N | b_0, .)
    if (lstm && need_backward) cells = empty_rows(N, H, opts);                    // (N, H)
    if (lstm && P > 0) r_all = empty_rows(need_backward ? N : b0, H, opts);       // (N | b_0, H)
    if (gru) bias = in.b_hh.has_value() ? *in.b_hh : at::zeros({GH}, opts);       // (G*H,)

    gx = in.gates_x.data_ptr<T>();
    whh = in.w_hh.data_ptr<T>();
    whr = P > 0 ? in.w_hr->data_ptr<T>() : nullptr;
    bias_p = bias.defined() ? bias.data_ptr<T>() : nullptr;
    out = output.data_ptr<T>();
    h = h_n.data_ptr<T>();
    c = lstm ? c_n.data_ptr<T>() : nullptr;
    s = S.data_ptr<T>();
    act_p = act.defined() ? act.data_ptr<T>() : nullptr;
    cells_p = cells.defined() ? cells.data_ptr<T>() : nullptr;
    r_p = r_all.defined() ? r_all.data_ptr<T>() : nullptr;
    zero_padding<T>(out, Hout, *L);                              // NOTE [Padded layout]
    if (r_p && need_backward) zero_padding<T>(r_p, H, *L);       // grad_w_hr's GEMM input
  }

  bool ascending() const { return !reverse; }
  double flops_per_row_step() const {
    const int64_t GH = d.G * d.H;
    return double(2 * GH * d.Hout + 2 * d.P * d.H + 16 * GH);
  }

  void step(int64_t t, int64_t r0, int64_t r1) const {
    const int64_t H = d.H, Hout = d.Hout, P = d.P, GH = d.G * d.H;
    const int64_t off = L->offsets[t];
    const int64_t m = r1 - r0;
    // Row bases of this step (NOTE [Active prefix]).
    const T* gx_t = gx + off * GH;
    T* out_t = out + off * Hout;
    T* act_t = act_p ? act_p + (need_backward ? off : 0) * act_width : nullptr;
    T* r_t = r_p ? r_p + (need_backward ? off : 0) * H : nullptr;
    // The fused pass reads this step's gates_x rows, which no one touched since the input
    // projection wrote them: start loading them now, while the GEMM runs.
    prefetch_rows(gx_t + r0 * GH, m * GH * sizeof(T));
    // S[r0:r1] = h[r0:r1] @ w_hh^T: (m, H_out) x (H_out, G*H)
    gemm_rm<T>(false, true, m, GH, Hout, h + r0 * Hout, Hout, whh, Hout, T(0), s + r0 * GH, GH);
    if (d.mode == Mode::kLstm) {
      T* hr = P > 0 ? r_t : out_t;
      lstm_fwd_rows_run(LstmFwd<T>{gx_t, s, act_t, c, hr, P > 0 ? H : Hout, H}, r0, r1);
      if (cells_p) copy_rows<T>(cells_p + off * H, H, c, H, r0, r1, H);
      if (P > 0) {
        // output[r0:r1] = r[r0:r1] @ w_hr^T: (m, H) x (H, P)
        gemm_rm<T>(false, true, m, P, H, r_t + r0 * H, H, whr, H, T(0), out_t + r0 * P, P);
      }
      copy_rows<T>(h, Hout, out_t, Hout, r0, r1, Hout);
    } else if (d.mode == Mode::kGru) {
      gru_fwd_rows_run(GruFwd<T>{gx_t, s, bias_p, act_t, h, out_t, H}, r0, r1);
    } else {
      rnn_fwd_rows_run(RnnFwd<T>{gx_t, s, h, out_t, H, d.mode == Mode::kRnnRelu}, r0, r1);
    }
  }

  // [output, h_n, (c_n if lstm), saved...]
  std::vector<at::Tensor> result() const {
    std::vector<at::Tensor> result{output, h_n};
    if (d.mode == Mode::kLstm) result.push_back(c_n);
    if (need_backward) {
      if (d.mode == Mode::kLstm) {
        result.push_back(act);
        result.push_back(cells);
        if (d.P > 0) result.push_back(r_all);
      } else if (d.mode == Mode::kGru) {
        result.push_back(act);
      }
    }
    return result;
  }
};

// The tensors of one direction of a backward call, checked; everything but grad_output is
// contiguous (grad_output's rows are, at any row stride: a column block of the layer's grad).
struct BackwardArgs {
  std::optional<at::Tensor> grad_output;  // (N, H_out); None = zeros
  std::optional<at::Tensor> grad_h_n;     // (B, H_out); None = zeros
  std::optional<at::Tensor> grad_c_n;     // (B, H) lstm; None = zeros
  at::Tensor h0;                          // (B, H_out)
  std::optional<at::Tensor> c0;           // (B, H) lstm
  at::Tensor w_hh;                        // (G*H, H_out)
  std::optional<at::Tensor> b_hh;         // (G*H,) gru: only checked (its gradient is a sum)
  std::optional<at::Tensor> w_hr;         // (P, H) lstm with proj
  bool reverse;
  at::Tensor output;                      // (N, H_out) forward's
  std::vector<at::Tensor> saved;          // forward's
};

// Backward time loop of one direction; finish() does the GEMMs over all rows after the loop.
template <typename T>
struct BackwardJob {
  Dims d;
  bool reverse;
  const Layout* L;
  BackwardArgs in;  // keeps the inputs alive
  at::Tensor grad_gates_x, grad_gh, h_prev, dh_t, dc_t, d_proj, DR;
  int64_t act_width, ld_gout;
  const T *gout, *whh, *whr, *out, *h0p, *c0p, *act, *cells, *r_all;
  T *dgx, *dgh, *hprev, *dh, *dc, *dproj, *dr_scratch;

  BackwardJob(const Dims& dims, const Layout& layout, BackwardArgs args)
      : d(dims), reverse(args.reverse), L(&layout), in(std::move(args)) {
    const int64_t N = L->rows, H = d.H, Hout = d.Hout, P = d.P, GH = d.G * d.H;
    const int64_t b0 = L->max_active;
    const auto opts = in.output.options();
    const bool lstm = d.mode == Mode::kLstm, gru = d.mode == Mode::kGru;
    grad_gates_x = empty_rows(N, GH, opts);                     // (N, G*H)
    grad_gh = gru ? empty_rows(N, GH, opts) : grad_gates_x;      // (N, G*H) aliases for rnn/lstm
    h_prev = empty_rows(N, Hout, opts);                          // (N, H_out)
    dh_t = in.grad_h_n ? in.grad_h_n->clone(at::MemoryFormat::Contiguous)
                       : at::zeros({d.B, Hout}, opts);           // (B, H_out)
    if (lstm) {
      dc_t = in.grad_c_n ? in.grad_c_n->clone(at::MemoryFormat::Contiguous)
                         : at::zeros({d.B, H}, opts);            // (B, H)
    }
    if (P > 0) d_proj = empty_rows(N, P, opts);                  // (N, P)
    if (P > 0) DR = at::empty({b0, H}, opts);                    // (b_0, H)

    gout = in.grad_output ? in.grad_output->data_ptr<T>() : nullptr;
    ld_gout = in.grad_output ? in.grad_output->stride(0) : 0;
    whh = in.w_hh.data_ptr<T>();
    whr = P > 0 ? in.w_hr->data_ptr<T>() : nullptr;
    out = in.output.data_ptr<T>();
    h0p = in.h0.data_ptr<T>();
    c0p = lstm ? in.c0->data_ptr<T>() : nullptr;
    act = (lstm || gru) ? in.saved[0].data_ptr<T>() : nullptr;
    cells = lstm ? in.saved[1].data_ptr<T>() : nullptr;
    r_all = P > 0 ? in.saved[2].data_ptr<T>() : nullptr;
    dgx = grad_gates_x.data_ptr<T>();
    dgh = grad_gh.data_ptr<T>();
    hprev = h_prev.data_ptr<T>();
    dh = dh_t.data_ptr<T>();
    dc = lstm ? dc_t.data_ptr<T>() : nullptr;
    dproj = P > 0 ? d_proj.data_ptr<T>() : nullptr;
    dr_scratch = P > 0 ? DR.data_ptr<T>() : nullptr;
    act_width = gru ? 4 * H : GH;
    // NOTE [Padded layout]: the buffers returned or multiplied over all rows.
    zero_padding<T>(dgx, GH, *L);
    if (gru) zero_padding<T>(dgh, GH, *L);
    zero_padding<T>(hprev, Hout, *L);
    if (dproj) zero_padding<T>(dproj, P, *L);
  }

  // Backward visits the steps in the opposite order of forward.
  bool ascending() const { return reverse; }
  double flops_per_row_step() const {
    const int64_t GH = d.G * d.H;
    return double(2 * GH * d.Hout + 2 * d.P * d.H + 24 * GH);
  }

  void step(int64_t t, int64_t r0, int64_t r1) const {
    const int64_t H = d.H, Hout = d.Hout, P = d.P, GH = d.G * d.H;
    const int64_t T_steps = static_cast<int64_t>(L->sizes.size());
    const int64_t bt = L->sizes[t], off = L->offsets[t];
    const int64_t m = r1 - r0;
    // Where each row's previous state lives: rows [0, split) in `output` / `cells` at packed
    // offset prev_off, rows [split, b_t) in the initial state (reverse direction only:
    // sequences that join at this step).
    int64_t split = 0, prev_off = 0;
    if (!reverse && t > 0) {
      split = bt;
      prev_off = L->offsets[t - 1];
    } else if (reverse && t + 1 < T_steps) {
      split = L->sizes[t + 1];
      prev_off = L->offsets[t + 1];
    }
    // h_prev rows of this step (input of the grad_w_hh GEMM; gru's elementwise needs them).
    T* hprev_t = hprev + off * Hout;
    const int64_t mid = std::clamp(split, r0, r1);
    copy_rows<T>(hprev_t, Hout, out + prev_off * Hout, Hout, r0, mid, Hout);
    copy_rows<T>(hprev_t, Hout, h0p, Hout, mid, r1, Hout);
    // dh[r0:r1] += grad_output rows: the grad of this step's new h (absent: zero).
    if (gout) add_rows<T>(dh, Hout, gout + off * ld_gout, ld_gout, r0, r1, Hout);
    if (d.mode == Mode::kLstm) {
      const T* dr = dh;
      int64_t ld_dr = Hout;
      if (P > 0) {
        copy_rows<T>(dproj + off * P, P, dh, P, r0, r1, P);
        // DR[r0:r1] = dh[r0:r1] @ w_hr: (m, P) x (P, H)
        gemm_rm<T>(false, false, m, H, P, dh + r0 * P, P, whr, H, T(0), dr_scratch + r0 * H, H);
        dr = dr_scratch;
        ld_dr = H;
      }
      const T* cprev0 = split > 0 ? cells + prev_off * H : c0p;
      lstm_bwd_rows_run(LstmBwd<T>{act + off * act_width, cells + off * H, cprev0, c0p, split,
                                   dr, ld_dr, dc, dgx + off * GH, H},
                        r0, r1);
      // dh[r0:r1] = dgates rows @ w_hh: (m, 4H) x (4H, H_out)
      gemm_rm<T>(false, false, m, Hout, GH, dgx + (off + r0) * GH, GH, whh, Hout, T(0),
                 dh + r0 * Hout, Hout);
    } else if (d.mode == Mode::kGru) {
      gru_bwd_rows_run(GruBwd<T>{act + off * act_width, hprev_t, dh, dgx + off * GH,
                                 dgh + off * GH, H},
                       r0, r1);
      // dh[r0:r1] = z * dh + dgh rows @ w_hh: (m, 3H) x (3H, H)
      gemm_rm<T>(false, false, m, Hout, GH, dgh + (off + r0) * GH, GH, whh, Hout, T(1),
                 dh + r0 * Hout, Hout);
    } else {
      rnn_bwd_rows_run(RnnBwd<T>{out + off * Hout, dh, dgx + off * GH, H,
                                 d.mode == Mode::kRnnRelu},
                       r0, r1);
      gemm_rm<T>(false, false, m, Hout, GH, dgx + (off + r0) * GH, GH, whh, Hout, T(0),
                 dh + r0 * Hout, Hout);
    }
  }

  // After the loop: [grad_gates_x, grad_h0, (grad_c0 if lstm), grad_w_hh, (grad_b_hh if gru),
  // (grad_w_hr if proj)].
  std::vector<at::Tensor> finish() const {
    const int64_t N = L->rows, H = d.H, Hout = d.Hout, P = d.P, GH = d.G * d.H;
    const auto opts = in.output.options();
    // The GEMMs over all rows use BLAS's own threads unless they are small.
    std::optional<SingleThreadedBlas> serial_blas;
    if (2.0 * GH * Hout * N < kMinThreadedGemmFlops) serial_blas.emplace();
    // grad_w_hh = grad_gh^T @ h_prev: (G*H, N) x (N, H_out), one GEMM over all rows.
    at::Tensor grad_w_hh = at::empty({GH, Hout}, opts);
    gemm_rm<T>(true, false, GH, Hout, N, dgh, GH, hprev, Hout, T(0), grad_w_hh.data_ptr<T>(),
               Hout);
    std::vector<at::Tensor> result{grad_gates_x, dh_t};
    if (d.mode == Mode::kLstm) result.push_back(dc_t);
    result.push_back(grad_w_hh);
    if (d.mode == Mode::kGru) result.push_back(grad_gh.sum(0));  // (3H,)
    if (P > 0) {
      // grad_w_hr = d_proj^T @ r: (P, N) x (N, H)
      at::Tensor grad_w_hr = at::empty({P, H}, opts);
      gemm_rm<T>(true, false, P, H, N, dproj, P, r_all, H, T(0), grad_w_hr.data_ptr<T>(), H);
      result.push_back(grad_w_hr);
    }
    return result;
  }
};

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& x) {
  return x.has_value() ? std::optional<at::Tensor>(x->contiguous()) : x;
}

// Checks the directions of a forward call and runs them in one parallel region; returns the
// results of direction 0, then 1, ... (each [output, h_n, (c_n), saved...]).
std::vector<at::Tensor> forward_directions(const std::string& mode, const at::Tensor& batch_sizes,
                                           std::vector<ForwardArgs> dirs, bool need_backward,
                                           bool padded) {
  SubnormalMode fp(SubnormalMode::for_call());  // NOTE [Subnormals]
  TORCH_CHECK_VALUE(!dirs.empty(), "gates_x: expected at least one direction, got none");
  std::vector<Dims> dims;
  std::optional<Layout> layout;
  for (auto& a : dirs) {
    const Dims d = check_common(mode, a.w_hh, a.h0, a.c0, a.b_hh, a.w_hr);
    const auto dtype = dirs[0].w_hh.scalar_type();
    TORCH_CHECK_TYPE(a.w_hh.scalar_type() == dtype, "w_hh: expected the dtype ", dtype,
                     " of the first direction, got ", a.w_hh.scalar_type());
    TORCH_CHECK_VALUE(a.gates_x.dim() == 2, "gates_x: expected shape (N, ", d.G * d.H, "), got ",
                      a.gates_x.sizes());
    check_tensor(a.gates_x, "gates_x", dtype, {a.gates_x.size(0), d.G * d.H});
    Layout L = make_layout(batch_sizes, a.gates_x.size(0), d.B, padded);
    if (!layout) layout = std::move(L);
    a.gates_x = a.gates_x.contiguous();
    a.h0 = a.h0.contiguous();
    a.c0 = contiguous(a.c0);
    a.w_hh = a.w_hh.contiguous();
    a.b_hh = contiguous(a.b_hh);
    a.w_hr = contiguous(a.w_hr);
    dims.push_back(d);
  }
  return AT_DISPATCH_FLOATING_TYPES(dirs[0].w_hh.scalar_type(), "packrnn_forward", [&] {
    std::vector<ForwardJob<scalar_t>> jobs;
    jobs.reserve(dirs.size());
    for (size_t k = 0; k < dirs.size(); ++k)
      jobs.emplace_back(dims[k], *layout, std::move(dirs[k]), need_backward);
    run_jobs(jobs, *layout);
    std::vector<at::Tensor> result;
    for (const auto& job : jobs)
      for (auto& x : job.result()) result.push_back(std::move(x));
    return result;
  });
}

// The same for backward (each direction's result as BackwardJob::finish()).
std::vector<at::Tensor> backward_directions(const std::string& mode,
                                            const at::Tensor& batch_sizes,
                                            std::vector<BackwardArgs> dirs, bool padded) {
  SubnormalMode fp(SubnormalMode::for_call());  // NOTE [Subnormals]
  TORCH_CHECK_VALUE(!dirs.empty(), "output: expected at least one direction, got none");
  std::vector<Dims> dims;
  std::optional<Layout> layout;
  for (auto& a : dirs) {
    const Dims d = check_common(mode, a.w_hh, a.h0, a.c0, a.b_hh, a.w_hr);
    const auto dtype = dirs[0].w_hh.scalar_type();
    TORCH_CHECK_TYPE(a.w_hh.scalar_type() == dtype, "w_hh: expected the dtype ", dtype,
                     " of the first direction, got ", a.w_hh.scalar_type());
    TORCH_CHECK_VALUE(a.output.dim() == 2, "output: expected shape (N, ", d.Hout, "), got ",
                      a.output.sizes());
    const int64_t N = a.output.size(0), H = d.H;
    check_tensor(a.output, "output", dtype, {N, d.Hout});
    if (a.grad_output) check_tensor(*a.grad_output, "grad_output", dtype, {N, d.Hout});
    if (a.grad_h_n) check_tensor(*a.grad_h_n, "grad_h_n", dtype, {d.B, d.Hout});
    size_t want = 0;
    if (d.mode == Mode::kLstm) {
      if (a.grad_c_n) check_tensor(*a.grad_c_n, "grad_c_n", dtype, {d.B, H});
      want = d.P > 0 ? 3 : 2;
    } else {
      TORCH_CHECK_VALUE(!a.grad_c_n, "grad_c_n: expected None for mode '", mode,
                        "', got a tensor");
      if (d.mode == Mode::kGru) want = 1;
    }
    TORCH_CHECK_VALUE(a.saved.size() == want, "saved: expected the ", want,
                      " tensors recurrence_forward(need_backward=True) returned, got ",
                      a.saved.size());
    if (d.mode == Mode::kLstm) {
      check_tensor(a.saved[0], "saved[0]", dtype, {N, 4 * H});
      check_tensor(a.saved[1], "saved[1]", dtype, {N, H});
      if (d.P > 0) check_tensor(a.saved[2], "saved[2]", dtype, {N, H});
    } else if (d.mode == Mode::kGru) {
      check_tensor(a.saved[0], "saved[0]", dtype, {N, 4 * H});
    }
    Layout L = make_layout(batch_sizes, N, d.B, padded);
    if (!layout) layout = std::move(L);
    // grad_output: its rows must be contiguous, any row stride (BackwardArgs).
    if (a.grad_output && a.grad_output->size(1) > 1 && a.grad_output->stride(1) != 1)
      a.grad_output = a.grad_output->contiguous();
    a.h0 = a.h0.contiguous();
    a.c0 = contiguous(a.c0);
    a.w_hh = a.w_hh.contiguous();
    a.w_hr = contiguous(a.w_hr);
    a.output = a.output.contiguous();
    for (auto& x : a.saved) x = x.contiguous();
    dims.push_back(d);
  }
  return AT_DISPATCH_FLOATING_TYPES(dirs[0].w_hh.scalar_type(), "packrnn_backward", [&] {
    std::vector<BackwardJob<scalar_t>> jobs;
    jobs.reserve(dirs.size());
    for (size_t k = 0; k < dirs.size(); ++k)
      jobs.emplace_back(dims[k], *layout, std::move(dirs[k]));
    run_jobs(jobs, *layout);
    std::vector<at::Tensor> result;
    for (const auto& job : jobs)
      for (auto& x : job.finish()) result.push_back(std::move(x));
    return result;
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
namespace {

void check_count(size_t got, size_t want, const char* name) {
  TORCH_CHECK_VALUE(got == want, name, ": expected one entry per direction (", want, "), got ",
                    got);
}

}  // namespace

std::vector<at::Tensor> recurrence_forward(
    const std::string& mode, const at::Tensor& gates_x, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse,
    bool need_backward, bool padded) {
  return forward_directions(mode, batch_sizes, {ForwardArgs{gates_x, h0, c0, w_hh, b_hh, w_hr,
                                                            reverse}},
                            need_backward, padded);
}

std::vector<at::Tensor> recurrence_forward_directions(
    const std::string& mode, const at::Tensor& batch_sizes, at::TensorList gates_x,
    at::TensorList h0, const c10::List<std::optional<at::Tensor>>& c0, at::TensorList w_hh,
    const c10::List<std::optional<at::Tensor>>& b_hh,
    const c10::List<std::optional<at::Tensor>>& w_hr, bool need_backward, bool padded) {
  const size_t D = gates_x.size();
  TORCH_CHECK_VALUE(D == 1 || D == 2, "gates_x: expected 1 or 2 directions, got ", D);
  check_count(h0.size(), D, "h0");
  check_count(c0.size(), D, "c0");
  check_count(w_hh.size(), D, "w_hh");
  check_count(b_hh.size(), D, "b_hh");
  check_count(w_hr.size(), D, "w_hr");
  std::vector<ForwardArgs> dirs;
  for (size_t k = 0; k < D; ++k) {
    dirs.push_back(ForwardArgs{gates_x[k], h0[k], c0.get(k), w_hh[k], b_hh.get(k), w_hr.get(k),
                               /*reverse=*/k == 1});
  }
  return forward_directions(mode, batch_sizes, std::move(dirs), need_backward, padded);
}

std::vector<at::Tensor> recurrence_backward(
    const std::string& mode, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_h_n, const std::optional<at::Tensor>& grad_c_n,
    const at::Tensor& batch_sizes, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, const at::Tensor& output,
    at::TensorList saved, bool padded) {
  return backward_directions(
      mode, batch_sizes,
      {BackwardArgs{grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr, reverse, output,
                    saved.vec()}},
      padded);
}

std::vector<at::Tensor> recurrence_backward_directions(
    const std::string& mode, const at::Tensor& batch_sizes,
    const c10::List<std::optional<at::Tensor>>& grad_output,
    const c10::List<std::optional<at::Tensor>>& grad_h_n,
    const c10::List<std::optional<at::Tensor>>& grad_c_n, at::TensorList h0,
    const c10::List<std::optional<at::Tensor>>& c0, at::TensorList w_hh,
    const c10::List<std::optional<at::Tensor>>& b_hh,
    const c10::List<std::optional<at::Tensor>>& w_hr, at::TensorList output,
    at::TensorList saved, bool padded) {
  const size_t D = output.size();
  TORCH_CHECK_VALUE(D == 1 || D == 2, "output: expected 1 or 2 directions, got ", D);
  check_count(grad_output.size(), D, "grad_output");
  check_count(grad_h_n.size(), D, "grad_h_n");
  check_count(grad_c_n.size(), D, "grad_c_n");
  check_count(h0.size(), D, "h0");
  check_count(c0.size(), D, "c0");
  check_count(w_hh.size(), D, "w_hh");
  check_count(b_hh.size(), D, "b_hh");
  check_count(w_hr.size(), D, "w_hr");
  TORCH_CHECK_VALUE(saved.size() % D == 0, "saved: expected the same number of tensors for each ",
                    "of the ", D, " directions, got ", saved.size(), " in all");
  const size_t per_dir = saved.size() / D;
  std::vector<BackwardArgs> dirs;
  for (size_t k = 0; k < D; ++k) {
    dirs.push_back(BackwardArgs{grad_output.get(k), grad_h_n.get(k), grad_c_n.get(k), h0[k],
                                c0.get(k), w_hh[k], b_hh.get(k), w_hr.get(k), /*reverse=*/k == 1,
                                output[k],
                                saved.slice(k * per_dir, per_dir).vec()});
  }
  return backward_directions(mode, batch_sizes, std::move(dirs), padded);
}

std::vector<at::Tensor> layer_forward(
    const std::string& mode, const at::Tensor& batch_sizes, const at::Tensor& x,
    at::TensorList w_ih, const c10::List<std::optional<at::Tensor>>& bias, at::TensorList h0,
    const c10::List<std::optional<at::Tensor>>& c0, at::TensorList w_hh,
    const c10::List<std::optional<at::Tensor>>& b_hh,
    const c10::List<std::optional<at::Tensor>>& w_hr, bool need_backward, bool padded) {
  const size_t D = w_ih.size();
  TORCH_CHECK_VALUE(D == 1 || D == 2, "w_ih: expected 1 or 2 directions, got ", D);
  check_count(bias.size(), D, "bias");
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected shape (N, E), got ", x.sizes());
  TORCH_CHECK_TYPE(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  // Input projections of every row: one GEMM per direction into buffers of the cache (their
  // page faults cost ~10 % of an inference forward at B = 256 otherwise).
  std::vector<at::Tensor> gates;
  for (size_t k = 0; k < D; ++k) {
    TORCH_CHECK_VALUE(w_ih[k].dim() == 2 && w_ih[k].size(1) == x.size(1) &&
                          w_ih[k].scalar_type() == x.scalar_type(),
                      "w_ih[", k, "]: expected a (G*H, ", x.size(1), ") tensor of dtype ",
                      x.scalar_type(), ", got ", w_ih[k].sizes(), " ", w_ih[k].scalar_type());
    at::Tensor g = empty_rows(x.size(0), w_ih[k].size(0), x.options());  // (N, G*H)
    const auto b = bias.get(k);
    if (b.has_value())
      at::addmm_out(g, *b, x, w_ih[k].t());
    else
      at::mm_out(g, x, w_ih[k].t());
    gates.push_back(g);
  }
  return recurrence_forward_directions(mode, batch_sizes, gates, h0, c0, w_hh, b_hh, w_hr,
                                       need_backward, padded);
}

void clear_cache() { BufferCache::instance().clear(); }

at::Tensor empty_buffer(int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "empty_buffer: expected non-negative sizes, got (",
                    rows, ", ", cols, ")");
  return empty_rows(rows, cols, at::TensorOptions().dtype(dtype));
}

std::string kernel_info() {
  std::string simd = cpu_has_avx2_fma() ? "avx2+fma" : "baseline";
  std::string blas = (sgemm_ != nullptr && dgemm_ != nullptr) ? "direct BLAS (sgemm_/dgemm_)"
                                                               : "at::mm fallback";
#ifdef PACKRNN_HAS_MXCSR
  const std::string subnormals = SubnormalMode::keep()
                                     ? "subnormals: kept (PACKRNN_KEEP_SUBNORMALS=1)"
                                     : "subnormals: flushed";
#else
  const std::string subnormals = "subnormals: not controlled (not x86)";
#endif
  return "float32 elementwise " + simd + ", " + blas + ", " + subnormals;
}

}  // namespace packrnn

// Thin binding: torch.ops.packrnn.recurrence_forward / recurrence_backward and their
// _directions forms. Registered through the dispatcher (no pybind11), which keeps the build to
// one small translation unit.
TORCH_LIBRARY(packrnn, m) {
  // Schemas only: the CPU kernels are registered below for the CPU dispatch key, and the
  // fake (shape) implementations and autograd formulas in Python (packrnn/_ops.py), so that
  // the dispatcher, torch.compile and torch.export see each entry point as one opaque op.
  m.def(
      "recurrence_forward(str mode, Tensor gates_x, Tensor batch_sizes, Tensor h0, Tensor? c0, "
      "Tensor w_hh, Tensor? b_hh, Tensor? w_hr, bool reverse, bool need_backward, "
      "bool padded) -> Tensor[]");
  m.def(
      "recurrence_backward(str mode, Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor batch_sizes, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
      "bool reverse, Tensor output, Tensor[] saved, bool padded) -> Tensor[]");
  m.def(
      "recurrence_forward_directions(str mode, Tensor batch_sizes, Tensor[] gates_x, "
      "Tensor[] h0, Tensor?[] c0, Tensor[] w_hh, Tensor?[] b_hh, Tensor?[] w_hr, "
      "bool need_backward, bool padded) -> Tensor[]");
  m.def(
      "recurrence_backward_directions(str mode, Tensor batch_sizes, Tensor?[] grad_output, "
      "Tensor?[] grad_h_n, Tensor?[] grad_c_n, Tensor[] h0, Tensor?[] c0, Tensor[] w_hh, "
      "Tensor?[] b_hh, Tensor?[] w_hr, Tensor[] output, Tensor[] saved, bool padded) "
      "-> Tensor[]");
  m.def(
      "layer_forward(str mode, Tensor batch_sizes, Tensor x, Tensor[] w_ih, Tensor?[] bias, "
      "Tensor[] h0, Tensor?[] c0, Tensor[] w_hh, Tensor?[] b_hh, Tensor?[] w_hr, "
      "bool need_backward, bool padded) -> Tensor[]");
  m.def("kernel_info() -> str", &packrnn::kernel_info);
  m.def("clear_cache() -> ()", &packrnn::clear_cache);
  m.def("empty_buffer(int rows, int cols, ScalarType dtype) -> Tensor", &packrnn::empty_buffer);
}

TORCH_LIBRARY_IMPL(packrnn, CPU, m) {
  m.impl("recurrence_forward", &packrnn::recurrence_forward);
  m.impl("recurrence_backward", &packrnn::recurrence_backward);
  m.impl("recurrence_forward_directions", &packrnn::recurrence_forward_directions);
  m.impl("recurrence_backward_directions", &packrnn::recurrence_backward_directions);
  m.impl("layer_forward", &packrnn::layer_forward);
}

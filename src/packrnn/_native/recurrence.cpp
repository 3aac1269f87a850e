// packrnn native backend: see recurrence.h for the algorithm and the buffer table.
//
// One translation unit on purpose (build time): BLAS glue, vectorisable elementwise kernels,
// the forward / backward time loops, and the operator registration.

#include "recurrence.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <chrono>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
// Buffers of `cache_from` bytes or more come from the cache (default 4 MiB: the cache hands out
// whole 2 MiB blocks).
at::Tensor empty_rows(int64_t rows, int64_t cols, const at::TensorOptions& opts,
                      size_t cache_from = 2 * BufferCache::kHuge) {
  constexpr size_t kHuge = BufferCache::kHuge;
  const size_t nbytes = size_t(rows) * size_t(cols) * opts.dtype().itemsize();
  if (nbytes < cache_from || nbytes == 0) return at::empty({rows, cols}, opts);
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
  int64_t u0, u1;  // the hidden units updated: [u0, u1), all H but in NOTE [Unit split]
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
    for (int64_t j = a.u0; j < a.u1; ++j) {
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
  int64_t u0, u1;  // the hidden units updated: [u0, u1), all H but in NOTE [Unit split]
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
    for (int64_t j = a.u0; j < a.u1; ++j) {
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
  int64_t u0, u1;  // the hidden units updated: [u0, u1), all H but in NOTE [Unit split]
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
      for (int64_t j = a.u0; j < a.u1; ++j) {
        const T v = gx[j] + s[j];
        const T y = v > T(0) ? v : T(0);
        h[j] = y;
        out[j] = y;
      }
    } else {
#pragma GCC ivdep
      for (int64_t j = a.u0; j < a.u1; ++j) {
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

// NOTE [SIMD level]
//   Run-time dispatch of the float kernels (portable binary, no -march=native): an AVX-512F build
//   of the same loops on CPUs that have it, else an AVX2+FMA build, else the baseline; double
//   always uses the baseline build (libm). The elementwise loops give the same bits in the
//   AVX-512 and AVX2 builds (the same scalar code, FMA-contracted alike; tested), 1.1-1.25x
//   faster with 16 lanes (LSTM H = 32, B = 16, one thread: 380 vs 479 us a forward of 80
//   steps). The one-row matrix-vector product's AVX-512 form sums in another order (NOTE
//   [Small GEMMs]). PACKRNN_SIMD=avx2 (read once, at the first kernel call) keeps a CPU with
//   AVX-512 on the AVX2 builds: float results then equal an AVX2-only CPU's.
#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

bool simd_capped_at_avx2() {
  const char* value = std::getenv("PACKRNN_SIMD");
  const std::string v = value == nullptr ? "" : value;
  TORCH_CHECK_VALUE(v.empty() || v == "auto" || v == "avx2",
                    "PACKRNN_SIMD: expected auto or avx2, got '", v, "'");
  return v == "avx2";
}

// The AVX-512F builds run (NOTE [SIMD level]).
bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f") && !simd_capped_at_avx2();
  return has;
}

#define PACKRNN_KERNEL(NAME, ARGS)                                                           \
  __attribute__((target("avx2,fma"))) void NAME##_avx2(const ARGS<float>& a, int64_t r0,     \
                                                       int64_t r1) {                         \
    NAME<float>(a, r0, r1);                                                                  \
  }                                                                                          \
  __attribute__((target("avx512f,avx2,fma,prefer-vector-width=512"))) void NAME##_avx512(     \
      const ARGS<float>& a, int64_t r0, int64_t r1) {                                        \
    NAME<float>(a, r0, r1);                                                                  \
  }                                                                                          \
  void NAME##_base(const ARGS<float>& a, int64_t r0, int64_t r1) { NAME<float>(a, r0, r1); } \
  void NAME##_run(const ARGS<float>& a, int64_t r0, int64_t r1) {                            \
    if (cpu_has_avx512f()) {                                                                 \
      NAME##_avx512(a, r0, r1);                                                              \
    } else if (cpu_has_avx2_fma()) {                                                         \
      NAME##_avx2(a, r0, r1);                                                                \
    } else {                                                                                 \
      NAME##_base(a, r0, r1);                                                                \
    }                                                                                        \
  }                                                                                          \
  void NAME##_run(const ARGS<double>& a, int64_t r0, int64_t r1) { NAME<double>(a, r0, r1); }
#else  // other architectures: the baseline build only (the compiler's default vector width)
bool cpu_has_avx2_fma() { return false; }
bool simd_capped_at_avx2() { return false; }

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

// NOTE [Small GEMMs]
//   With a few active rows (b_t = 1 for one sequence) a step's products are matrix-vector
//   products, and a BLAS call costs more in its set-up than in arithmetic (about 1 us a call at
//   H = 32, as much as the rest of the step; and its transposed-weight form, h @ w_hh^T, runs
//   at half speed at b_t = 1). Up to kSmallGemmRows rows therefore run the loops below, in the
//   two forms the steps need:
//     NT: C (m, n) = A (m, k) @ W^T, W (n, k) row-major (forward: h @ w_hh^T, r @ w_hr^T):
//         dot products of A's row with 4 rows of W at a time, summed across lanes at the end;
//     NN: C (m, n) = A (m, k) @ W (+ C), W (k, n) row-major (backward: dgates @ w_hh): sums of
//         W's rows scaled by A's entries, 64 floats (32 doubles) of C in registers at a time.
//   Each output's summation order is fixed and depends only on its own row, so the numbers do
//   not change with how the rows are split between threads. AVX2+FMA only; other CPUs, and
//   more rows, use BLAS. On CPUs with AVX-512F the float NT form runs the same loop with
//   16-float vectors (small_gemm_nt_512: 1.19-1.27x faster at B = 1, H = 128 and 256, one
//   thread); its summation order differs from the AVX2 loop's, so float results differ in the
//   last bits between such CPUs and AVX2-only ones (e.g. AMD EPYC before Zen 4), but are the
//   same on every run of one machine, whatever the threads (PACKRNN_SIMD=avx2 keeps the AVX2
//   forms, NOTE [SIMD level]).
//   A one-row NT product of depth k <= kMaxNnGemvDepth (h @ w_hh^T at H_out <= 64) runs the NN
//   loop on W^T instead when the call made W^T (NOTE [Transposed weights]): a dot product of
//   32 floats is two FMAs and a lane sum as long as they, while the NN form has no lane sums
//   (one sequence, LSTM H = 32, one thread: 124 instead of 162 us for 200 steps, 48 instead of
//   55 us for 40, the transposition included; 172 vs 180 us at H = 64, T = 100).
constexpr int64_t kSmallGemmRows = 1;
constexpr int64_t kMaxNnGemvDepth = 64;

#if defined(__x86_64__) || defined(__i386__)
template <typename T>
struct Avx;

#define PR_AVX inline __attribute__((target("avx2,fma"), always_inline))

template <>
struct Avx<float> {
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static PR_AVX V zero() { return _mm256_setzero_ps(); }
  static PR_AVX V load(const float* p) { return _mm256_loadu_ps(p); }
  static PR_AVX void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static PR_AVX V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static PR_AVX V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static PR_AVX V add(V a, V b) { return _mm256_add_ps(a, b); }
  static PR_AVX __m256i mask(int64_t count) {  // lanes [0, count) set
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static PR_AVX V load(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  static PR_AVX void store(float* p, __m256i m, V v) { _mm256_maskstore_ps(p, m, v); }
  // The lane sums of a, b, c, d, in this order.
  static PR_AVX void sum4(V a, V b, V c, V d, float* out) {
    const V z = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1)));
  }
};

template <>
struct Avx<double> {
  using V = __m256d;
  static constexpr int64_t kLanes = 4;
  static PR_AVX V zero() { return _mm256_setzero_pd(); }
  static PR_AVX V load(const double* p) { return _mm256_loadu_pd(p); }
  static PR_AVX void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static PR_AVX V broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  static PR_AVX V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static PR_AVX V add(V a, V b) { return _mm256_add_pd(a, b); }
  static PR_AVX __m256i mask(int64_t count) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static PR_AVX V load(const double* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  static PR_AVX void store(double* p, __m256i m, V v) { _mm256_maskstore_pd(p, m, v); }
  static PR_AVX void sum4(V a, V b, V c, V d, double* out) {
    const V x = _mm256_hadd_pd(a, b), y = _mm256_hadd_pd(c, d);  // [a01 b01 a23 b23], [c.. d..]
    _mm256_storeu_pd(out, _mm256_add_pd(_mm256_permute2f128_pd(x, y, 0x20),
                                        _mm256_permute2f128_pd(x, y, 0x31)));
  }
};

// NT form (NOTE [Small GEMMs]): C[r, j] = sum_q A[r, q] W[j, q], four rows of W at a time, two
// vectors of each in flight (eight independent sums), masked loads for k's tail.
template <typename T>
__attribute__((target("avx2,fma"))) void small_gemm_nt(int64_t m, int64_t n, int64_t k,
                                                       const T* A, int64_t lda, const T* W,
                                                       int64_t ldw, T* C, int64_t ldc) {
  using X = Avx<T>;
  using V = typename X::V;
  constexpr int64_t L = X::kLanes;
  const int64_t k2 = k / (2 * L) * (2 * L), k1 = k / L * L;
  const __m256i tail = X::mask(k - k1);
  for (int64_t r = 0; r < m; ++r) {
    const T* a = A + r * lda;
    T* c = C + r * ldc;
    for (int64_t j = 0; j < n; j += 4) {
      const T* w[4];
      for (int u = 0; u < 4; ++u) w[u] = W + std::min(j + u, n - 1) * ldw;  // past n: repeat
      V acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = X::zero();
      int64_t q = 0;
      for (; q < k2; q += 2 * L) {
        const V x0 = X::load(a + q), x1 = X::load(a + q + L);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          acc[u] = X::fma(x0, X::load(w[u] + q), acc[u]);
          acc[4 + u] = X::fma(x1, X::load(w[u] + q + L), acc[4 + u]);
        }
      }
      if (q < k1) {
        const V x0 = X::load(a + q);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[u] = X::fma(x0, X::load(w[u] + q), acc[u]);
        q += L;
      }
      if (q < k) {
        const V x0 = X::load(a + q, tail);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[4 + u] = X::fma(x0, X::load(w[u] + q, tail), acc[4 + u]);
      }
      T sums[4];
      X::sum4(X::add(acc[0], acc[4]), X::add(acc[1], acc[5]), X::add(acc[2], acc[6]),
              X::add(acc[3], acc[7]), sums);
      for (int64_t u = 0; u < 4 && j + u < n; ++u) c[j + u] = sums[u];
    }
  }
}

// NN form: C[r, j0 : j0 + kBlocks * lanes) of one row; with kMasked, only the first `last`
// lanes of the final vector (the row's tail).
template <typename T, int kBlocks, bool kMasked>
PR_AVX void small_gemm_nn_block(int64_t k, const T* a, const T* W, int64_t ldw, T* c,
                                bool accumulate, int64_t last) {
  using X = Avx<T>;
  using V = typename X::V;
  constexpr int64_t L = X::kLanes;
  const __m256i tail = X::mask(last);
  V acc[kBlocks];
#pragma GCC unroll 8
  for (int u = 0; u < kBlocks; ++u) {
    if (!accumulate) {
      acc[u] = X::zero();
    } else if (kMasked && u == kBlocks - 1) {
      acc[u] = X::load(c + u * L, tail);
    } else {
      acc[u] = X::load(c + u * L);
    }
  }
  for (int64_t q = 0; q < k; ++q) {
    const V x = X::broadcast(a + q);
    const T* w = W + q * ldw;
#pragma GCC unroll 8
    for (int u = 0; u < kBlocks; ++u) {
      const V wv = (kMasked && u == kBlocks - 1) ? X::load(w + u * L, tail) : X::load(w + u * L);
      acc[u] = X::fma(x, wv, acc[u]);
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < kBlocks; ++u) {
    if (kMasked && u == kBlocks - 1) {
      X::store(c + u * L, tail, acc[u]);
    } else {
      X::store(c + u * L, acc[u]);
    }
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) void small_gemm_nn(int64_t m, int64_t n, int64_t k,
                                                       const T* A, int64_t lda, const T* W,
                                                       int64_t ldw, T* C, int64_t ldc,
                                                       bool accumulate) {
  constexpr int64_t L = Avx<T>::kLanes;
  for (int64_t r = 0; r < m; ++r) {
    const T* a = A + r * lda;
    T* c = C + r * ldc;
    int64_t j = 0;
    for (; j + 8 * L <= n; j += 8 * L)
      small_gemm_nn_block<T, 8, false>(k, a, W + j, ldw, c + j, accumulate, 0);
    for (; j + L <= n; j += L)
      small_gemm_nn_block<T, 1, false>(k, a, W + j, ldw, c + j, accumulate, 0);
    if (j < n) small_gemm_nn_block<T, 1, true>(k, a, W + j, ldw, c + j, accumulate, n - j);
  }
}
#undef PR_AVX


// NT form with 16-float vectors, for CPUs with AVX-512F (NOTE [Small GEMMs]): the AVX2 loop's
// structure (four rows of W, two vectors each in flight, a masked tail), so each output's order
// is fixed and its own, but not the AVX2 loop's order.
__attribute__((target("avx512f"))) void small_gemm_nt_512(int64_t m, int64_t n, int64_t k,
                                                          const float* A, int64_t lda,
                                                          const float* W, int64_t ldw, float* C,
                                                          int64_t ldc) {
  constexpr int64_t L = 16;
  const int64_t k2 = k / (2 * L) * (2 * L), k1 = k / L * L;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - k1)) - 1u);
  for (int64_t r = 0; r < m; ++r) {
    const float* a = A + r * lda;
    float* c = C + r * ldc;
    for (int64_t j = 0; j < n; j += 4) {
      const float* w[4];
      for (int u = 0; u < 4; ++u) w[u] = W + std::min(j + u, n - 1) * ldw;  // past n: repeat
      __m512 acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = _mm512_setzero_ps();
      int64_t q = 0;
      for (; q < k2; q += 2 * L) {
        const __m512 x0 = _mm512_loadu_ps(a + q), x1 = _mm512_loadu_ps(a + q + L);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          acc[u] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w[u] + q), acc[u]);
          acc[4 + u] = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w[u] + q + L), acc[4 + u]);
        }
      }
      if (q < k1) {
        const __m512 x0 = _mm512_loadu_ps(a + q);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[u] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w[u] + q), acc[u]);
        q += L;
      }
      if (q < k) {
        const __m512 x0 = _mm512_maskz_loadu_ps(tail, a + q);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u)
          acc[4 + u] = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(tail, w[u] + q), acc[4 + u]);
      }
      for (int64_t u = 0; u < 4 && j + u < n; ++u)
        c[j + u] = _mm512_reduce_add_ps(_mm512_add_ps(acc[u], acc[4 + u]));
    }
  }
}
constexpr bool kHaveSmallGemm = true;
#else
bool cpu_has_avx512f() { return false; }
void small_gemm_nt_512(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                       float*, int64_t) {}
constexpr bool kHaveSmallGemm = false;
template <typename T>
void small_gemm_nt(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t) {}
template <typename T>
void small_gemm_nn(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t,
                   bool) {}
#endif

bool use_small_gemm(int64_t m) {
  return kHaveSmallGemm && m <= kSmallGemmRows && cpu_has_avx2_fma();
}

// A step's C (m, n) = A (m, k) @ W^T, W (n, k) row-major (NOTE [Small GEMMs]). `Wt`, if not
// null, is W^T (k, n) row-major: BLAS runs faster on it (NOTE [Transposed weights]).
template <typename T>
void step_gemm_nt(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* W,
                  int64_t ldw, const T* Wt, T* C, int64_t ldc) {
  if (use_small_gemm(m)) {
    if (Wt != nullptr && k <= kMaxNnGemvDepth)  // short dot products: the NN form on W^T
      return small_gemm_nn<T>(m, n, k, A, lda, Wt, n, C, ldc, false);
    if constexpr (std::is_same_v<T, float>) {
      if (cpu_has_avx512f()) return small_gemm_nt_512(m, n, k, A, lda, W, ldw, C, ldc);
    }
    small_gemm_nt<T>(m, n, k, A, lda, W, ldw, C, ldc);
  } else if (Wt != nullptr) {
    gemm_rm<T>(false, false, m, n, k, A, lda, Wt, n, T(0), C, ldc);
  } else {
    gemm_rm<T>(false, true, m, n, k, A, lda, W, ldw, T(0), C, ldc);
  }
}

// A step's C (m, n) = A (m, k) @ W (+ C if beta == 1; beta is 0 or 1), W (k, n) row-major.
template <typename T>
void step_gemm_nn(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* W,
                  int64_t ldw, T beta, T* C, int64_t ldc) {
  if (use_small_gemm(m)) {
    small_gemm_nn<T>(m, n, k, A, lda, W, ldw, C, ldc, beta != T(0));
  } else {
    gemm_rm<T>(false, false, m, n, k, A, lda, W, ldw, beta, C, ldc);
  }
}

// NOTE [Transposed weights]
//   At the row counts of a step (2 to a few hundred), BLAS computes h @ w_hh^T up to twice as
//   fast from a row-major copy of w_hh^T as from w_hh itself (measured at b_t = 4 to 16, H = 32
//   to 256: 25-40 % less time a step). The copy costs about two steps' worth of memory traffic
//   (~100 us at H = 256), so a forward call makes it, once per direction, only when at least
//   kMinStepsToTranspose steps call BLAS, or as many one-row steps run the NN loop on it
//   (H_out <= kMaxNnGemvDepth, NOTE [Small GEMMs]); with the 8 x 8 (4 x 4 for double)
//   register transposes below (at::Tensor::t().contiguous() is 3x slower).
constexpr int64_t kMinStepsToTranspose = 4;

#if defined(__x86_64__) || defined(__i386__)
// dst[j, i] = src[i, j] for the 8 x 8 (float) or 4 x 4 (double) tile at (i0, j0).
__attribute__((target("avx2,fma"))) void transpose_tile(const float* src, int64_t lds,
                                                        float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int u = 0; u < 8; ++u) r[u] = _mm256_loadu_ps(src + u * lds);
  for (int u = 0; u < 8; u += 2) {
    t[u] = _mm256_unpacklo_ps(r[u], r[u + 1]);
    t[u + 1] = _mm256_unpackhi_ps(r[u], r[u + 1]);
  }
  for (int u = 0; u < 8; u += 4) {
    r[u] = _mm256_shuffle_ps(t[u], t[u + 2], 0x44);
    r[u + 1] = _mm256_shuffle_ps(t[u], t[u + 2], 0xEE);
    r[u + 2] = _mm256_shuffle_ps(t[u + 1], t[u + 3], 0x44);
    r[u + 3] = _mm256_shuffle_ps(t[u + 1], t[u + 3], 0xEE);
  }
  for (int u = 0; u < 4; ++u) {
    _mm256_storeu_ps(dst + u * ldd, _mm256_permute2f128_ps(r[u], r[u + 4], 0x20));
    _mm256_storeu_ps(dst + (u + 4) * ldd, _mm256_permute2f128_ps(r[u], r[u + 4], 0x31));
  }
}

__attribute__((target("avx2,fma"))) void transpose_tile(const double* src, int64_t lds,
                                                        double* dst, int64_t ldd) {
  const __m256d r0 = _mm256_loadu_pd(src), r1 = _mm256_loadu_pd(src + lds),
                r2 = _mm256_loadu_pd(src + 2 * lds), r3 = _mm256_loadu_pd(src + 3 * lds);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1),
                t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(dst + ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(dst + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(dst + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
}
#endif

// The (cols, rows) row-major transpose of a contiguous (rows, cols) matrix.
template <typename T>
at::Tensor transposed(const at::Tensor& w) {
  const int64_t rows = w.size(0), cols = w.size(1);
  // From the buffer cache from 256 KiB on: fresh memory would cost a page fault per 4 KiB on
  // every call, more than the transpose itself (NOTE [Buffer cache]).
  at::Tensor out = empty_rows(cols, rows, w.options(), /*cache_from=*/size_t(256) << 10);
  const T* src = w.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  int64_t i_end = 0, j_end = 0;  // the part the register tiles cover
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_has_avx2_fma()) {
    constexpr int64_t t = 32 / sizeof(T);  // tile side: one vector
    i_end = rows / t * t;
    j_end = cols / t * t;
    for (int64_t j = 0; j < j_end; j += t)  // this order: 2x faster (dst written in order)
      for (int64_t i = 0; i < i_end; i += t)
        transpose_tile(src + i * cols + j, cols, dst + j * rows + i, rows);
  }
#endif
  for (int64_t i = 0; i < rows; ++i)  // the edges (all of it without AVX2)
    for (int64_t j = (i < i_end ? j_end : 0); j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
  return out;
}

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

void check_batch_sizes(const at::Tensor& batch_sizes) {
  TORCH_CHECK_TYPE(batch_sizes.scalar_type() == at::kLong && batch_sizes.device().is_cpu() &&
                       batch_sizes.dim() == 1,
                   "batch_sizes: expected a 1-D int64 CPU tensor, got ",
                   batch_sizes.scalar_type(), " ", batch_sizes.device(), " with ",
                   batch_sizes.dim(), " dims");
}

Layout make_layout(const at::Tensor& batch_sizes, int64_t n_rows, int64_t batch, bool padded) {
  check_batch_sizes(batch_sizes);
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

// Steps whose product calls BLAS (more than kSmallGemmRows active rows, NOTE [Small GEMMs]).
int64_t blas_steps(const Layout& L) {
  int64_t count = 0;
  for (int64_t b_t : L.sizes) count += b_t > kSmallGemmRows;
  return count;
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

// NOTE [Threads]
//   How a call's time loop is spread over threads. A thread runs whole (direction, slab) tasks
//   (NOTE [Row slabs]), so an OpenMP team pays only when each member gets far more work than a
//   fork/join -- and on a busy machine, where a member may wait a scheduler slice for its core
//   while the others wait at the join, far more than that slice too. By default ("auto"):
//   * a loop of at least 2 * kFlopsPerThread FLOPs (all directions) runs as a team of one
//     thread per kFlopsPerThread, at most torch's intra-op threads (at::get_num_threads());
//   * a smaller one of at least kMinHelperFlops runs on the calling thread with opportunistic
//     helpers (NOTE [Helpers, not a team]): on an idle machine they take their share, on a busy
//     one the calling thread does everything and waits for no one;
//   * below that (one sentence, a few short ones) the calling thread alone: nothing to wake;
//   * one sequence (b_0 = 1: one slab, so one task per direction) with at least two threads a
//     direction and kMinSplitStepFlops a step (H >= ~90 for LSTM) splits each step by hidden
//     units instead, as a team (NOTE [Unit split]); a bidirectional layer on two threads keeps
//     one direction per thread.
//   The GEMMs over all rows (input projections, weight gradients) use BLAS's threads only from
//   kMinThreadedGemmFlops on. set_kernel_threads(n) (packrnn.set_kernel_threads,
//   PACKRNN_NUM_THREADS) replaces these rules: n = 1 runs everything on the calling thread;
//   n > 1 runs every loop with more than one task as a team of min(n, torch's threads, tasks)
//   (a split one-row loop: min(n, torch's threads) threads), and every GEMM over all rows with
//   BLAS's threads.
constexpr double kFlopsPerThread = 2e7;
constexpr double kMinHelperFlops = 2e6;
constexpr double kMinThreadedGemmFlops = 8e6;
std::atomic<int64_t> g_kernel_threads{0};  // 0: auto

// How a time loop of `flops` FLOPs runs (NOTE [Threads]): `threads` in all, as a team or as the
// calling thread with threads - 1 helpers.
struct LoopPlan {
  int64_t threads;
  bool team;
};

LoopPlan loop_plan(double flops) {
  const int64_t available = at::get_num_threads();
  const int64_t setting = g_kernel_threads.load(std::memory_order_relaxed);
  if (setting > 0) return {std::max<int64_t>(1, std::min(setting, available)), true};
  const int64_t team = std::min<int64_t>(static_cast<int64_t>(flops / kFlopsPerThread), available);
  if (team >= 2) return {team, true};
  if (flops >= kMinHelperFlops && available >= 2) return {available, false};
  return {1, false};
}

// Whether a GEMM over all rows of `flops` FLOPs may use BLAS's threads (NOTE [Threads]).
bool threaded_gemm(double flops) {
  const int64_t setting = g_kernel_threads.load(std::memory_order_relaxed);
  return setting == 0 ? flops >= kMinThreadedGemmFlops : setting > 1;
}

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

// NOTE [Helpers, not a team]
//   The tasks of a small call (NOTE [Threads]) are claimed one at a time from a shared counter,
//   by the calling thread and by `helpers` tasks queued on torch's inter-op thread pool
//   (at::launch). The calling thread starts at once and, when no task is left to claim, waits
//   only for tasks a helper has already claimed. A helper that starts late -- its core held by another process -- finds
//   nothing left and returns without touching the call's data, and nobody waits for it. So a
//   busy machine costs at most the serial time (plus a task a helper runs slowly), where an
//   OpenMP team would hold the whole call until every member had run (and its idle members
//   spin). The board is shared (std::shared_ptr) because a helper may outlive the call.
struct TaskBoard {
  int64_t count = 0;
  std::atomic<int64_t> next{0};      // the next task to claim
  std::atomic<int64_t> finished{0};  // tasks done
  std::function<void(int64_t)> run;  // called only for a claimed task, i.e. during the call
  std::mutex mutex;
  std::condition_variable all_done;
  std::exception_ptr error;  // the first task's exception, rethrown by the caller
};

void run_claimed(TaskBoard& board) {
  for (;;) {
    const int64_t i = board.next.fetch_add(1);
    if (i >= board.count) return;
    try {
      board.run(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(board.mutex);
      if (!board.error) board.error = std::current_exception();
    }
    if (board.finished.fetch_add(1) + 1 == board.count) {
      std::lock_guard<std::mutex> lock(board.mutex);
      board.all_done.notify_all();
    }
  }
}

// run(i) for i in [0, count), on the calling thread and up to `helpers` others (NOTE [Helpers,
// not a team]); returns when all are done, rethrowing the first exception.
void run_with_helpers(int64_t count, int64_t helpers, std::function<void(int64_t)> run) {
  auto board = std::make_shared<TaskBoard>();
  board->count = count;
  board->run = std::move(run);
  for (int64_t k = 0; k < helpers; ++k) at::launch([board] { run_claimed(*board); });
  run_claimed(*board);
  {
    std::unique_lock<std::mutex> lock(board->mutex);
    board->all_done.wait(lock, [&] { return board->finished.load() == board->count; });
  }
  if (board->error) std::rethrow_exception(board->error);
}

// NOTE [Unit split]
//   One sequence (b_0 = 1) is one slab (NOTE [Row slabs]), so its time loop would run on one
//   thread however many are free; and at large H its step is mostly one matrix-vector product,
//   h (1, H_out) @ w_hh^T. So when every direction of a call has at least two threads to itself
//   and each step does at least kMinSplitStepFlops, each step is split by HIDDEN UNITS instead
//   of rows (split_units): the units are cut into chunks, and a chunk is the rows g*H + u of
//   w_hh of every gate g for its units u -- so a unit's gate pre-activations and its fused cell
//   update stay together -- and writes only its units of S, act, c, h and the output row. A step
//   reads the whole previous state from h0 or the previous step's output row, never from the
//   running h that the chunks of the same step write, so steps need one wait between them:
//   step k + 1 starts when every chunk of step k is done.
//   Chunks are claimed, not assigned (SplitBoard): each participant claims its own chunks first
//   (the same ones every step, so each core keeps its slice of w_hh in its cache), then any
//   chunk of the step still unclaimed, from the far end. So a participant that the OS delays
//   claims nothing and no step waits for it: on a busy machine the calling thread runs whole
//   steps alone, at the serial speed plus a few claims, and the late one finds no chunk left
//   when it starts. Only a chunk already claimed is waited for (StepSignal): spinning for up
//   to kSpinNanos (about a step of work), then sleeping on a futex, so that a partner
//   preempted in the middle of a chunk gets a core back instead of waiting out the spinner's
//   scheduler slice. The participants are an OpenMP team (at::parallel_for), not helpers on
//   the inter-op pool (NOTE [Helpers, not a team]): after a threaded op (the input projection
//   is one from kMinThreadedGemmFlops on) torch's OpenMP workers spin for a while and would
//   hold the core a helper needs (B = 1, H = 256, T = 200, 2 threads: 10.6 ms with helpers,
//   4.1 ms with OMP_WAIT_POLICY=passive); the team's workers are those spinning threads. The
//   team's join waits for a late member to start, once per call, not per step.
//   The numbers do not change: a chunk computes each output's dot product with the same small
//   GEMM code and order as the whole step (NOTE [Small GEMMs]; so the split needs that kernel:
//   BLAS may sum a sub-block differently), and runs the same elementwise code on its units,
//   whose bounds are multiples of kSplitUnitAlign (vector- and cache-line-aligned), so a split
//   run is bit-identical to a serial one. Forward only (the inference path; backward keeps
//   NOTE [Row slabs]), and not with proj_size > 0, which would need a second wait per step.
//   kMinSplitStepFlops, measured at B = 1, T = 200, 2 threads split against 1 thread (best of
//   150 interleaved calls on a busy 2-core machine): per-step FLOPs (flops_per_row_step) 1e4
//   (LSTM H = 32) 0.8x; 3.5e4 (LSTM H = 64, RNN H = 128) 0.93-1.04x; 8e4 (LSTM H = 96) 1.2x;
//   1.4e5 (LSTM H = 128) 1.3-1.4x; 5.4e5 (LSTM H = 256) 1.5-1.7x.
constexpr double kMinSplitStepFlops = 6e4;
constexpr int64_t kSplitUnitAlign = 16;
constexpr int64_t kChunksPerThread = 2;
constexpr int64_t kSpinNanos = 30000;
std::atomic<int64_t> g_split_loops{0};  // loops run split, for tests (split_loops())

PR_INLINE void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// A condition that threads wait for (NOTE [Unit split]): wait(ready) spins, then sleeps until
// notify(), which whoever made ready() true calls.
class StepSignal {
 public:
  template <typename Ready>
  void wait(Ready ready) {
    if (ready()) return;
    const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNanos);
    for (int64_t i = 1;; ++i) {
      cpu_relax();
      if (ready()) return;
      if (i % 64 == 0 && std::chrono::steady_clock::now() > until) break;
    }
    sleepers_.fetch_add(1);
    for (;;) {
      const uint32_t seen = epoch_.load();
      if (ready()) break;
      sleep_while(seen);  // returns at once if notify() came after `seen` was read
    }
    sleepers_.fetch_sub(1);
  }

  void notify() {
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) wake_all();
  }

 private:
#ifdef __linux__
  uint32_t* word() { return reinterpret_cast<uint32_t*>(&epoch_); }
  void sleep_while(uint32_t seen) {
    syscall(SYS_futex, word(), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
  }
  void wake_all() { syscall(SYS_futex, word(), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0); }
#else
  void sleep_while(uint32_t) { std::this_thread::yield(); }
  void wake_all() {}
#endif
  std::atomic<uint32_t> epoch_{0};   // bumped by notify(); the futex word
  std::atomic<int32_t> sleepers_{0};
};
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");

// One direction's split time loop (NOTE [Unit split]): `steps` steps of `chunks` chunks each.
struct SplitBoard {
  int64_t steps = 0, chunks = 0;
  int64_t per_owner = 1;  // chunk c is participant (c / per_owner)'s own
  std::unique_ptr<std::atomic<int64_t>[]> next;  // (chunks,) first step it is unclaimed at
  std::atomic<int64_t> finished{0};  // chunks done, all steps: step k is done at (k + 1) * chunks
  StepSignal signal;
  std::function<void(int64_t, int64_t)> run;  // run(k, c), for a claimed chunk
  std::mutex mutex;
  std::exception_ptr error;  // the first chunk's exception, rethrown by the caller

  bool done(int64_t k) const { return finished.load() >= (k + 1) * chunks; }
};

// Participant `who` of one split loop: claims and runs chunks, step after step, until every
// step is claimed (NOTE [Unit split]). Returns without waiting for others' chunks.
void take_part(SplitBoard& b, int64_t who) {
  const int64_t C = b.chunks;
  std::vector<int64_t> order;  // own chunks, then the others' from the far end
  for (int64_t c = 0; c < C; ++c)
    if (c / b.per_owner == who) order.push_back(c);
  for (int64_t c = C - 1; c >= 0; --c)
    if (c / b.per_owner != who) order.push_back(c);
  for (int64_t k = b.finished.load() / C; k < b.steps; ++k) {
    if (k > 0) b.signal.wait([&] { return b.done(k - 1); });
    for (int64_t c : order) {
      int64_t expected = k;
      if (b.next[c].load(std::memory_order_relaxed) != k ||
          !b.next[c].compare_exchange_strong(expected, k + 1))
        continue;
      try {
        b.run(k, c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(b.mutex);
        if (!b.error) b.error = std::current_exception();
      }
      if (b.finished.fetch_add(1) + 1 == (k + 1) * C) b.signal.notify();
    }
  }
}

// Whether the loop of `jobs` on `threads` threads splits its steps by units (NOTE [Unit split]).
template <typename Job>
bool split_units(const std::vector<Job>& jobs, const Layout& L, int64_t threads) {
  if (L.max_active != 1 || threads < 2 * static_cast<int64_t>(jobs.size()) ||
      !use_small_gemm(1))
    return false;
  for (const Job& job : jobs)
    if (!job.splits_units() || job.flops_per_row_step() < kMinSplitStepFlops) return false;
  return true;
}

// Runs the loop of every job with its steps split by units over `threads` participants:
// threads / jobs per job, the calling thread and helpers (NOTE [Unit split]). A job offers
// units() and step_units(t, t_prev, u0, u1) besides ascending().
template <typename Job>
void run_split(const std::vector<Job>& jobs, const Layout& L, int64_t threads,
               unsigned fp_bits) {
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  const int64_t per_job = threads / n_jobs;
  const int64_t T_steps = static_cast<int64_t>(L.sizes.size());
  std::vector<SplitBoard> boards(n_jobs);
  std::vector<std::vector<int64_t>> order(n_jobs), bounds(n_jobs);  // per job: steps, units
  for (int64_t j = 0; j < n_jobs; ++j) {
    const Job& job = jobs[j];
    for (int64_t k = 0; k < T_steps; ++k) {  // the steps with an active row, in loop order
      const int64_t t = job.ascending() ? k : T_steps - 1 - k;
      if (L.sizes[t] > 0) order[j].push_back(t);
    }
    const int64_t blocks = (job.units() + kSplitUnitAlign - 1) / kSplitUnitAlign;
    const int64_t C = std::min(per_job * kChunksPerThread, blocks);
    for (int64_t c = 0; c <= C; ++c)
      bounds[j].push_back(std::min(job.units(), c * blocks / C * kSplitUnitAlign));
    SplitBoard& b = boards[j];
    b.steps = static_cast<int64_t>(order[j].size());
    b.chunks = C;
    b.per_owner = (C + per_job - 1) / per_job;
    b.next.reset(new std::atomic<int64_t>[C]);
    for (int64_t c = 0; c < C; ++c) b.next[c].store(0);
    b.run = [&job, &steps = order[j], &units = bounds[j]](int64_t k, int64_t c) {
      job.step_units(steps[k], k > 0 ? steps[k - 1] : -1, units[c], units[c + 1]);
    };
  }
  g_split_loops.fetch_add(1, std::memory_order_relaxed);
  // Participant p belongs to job p % n_jobs, then helps the others in turn.
  auto participate = [&](int64_t p) {
    SubnormalMode fp(fp_bits);  // NOTE [Subnormals]
    SingleThreadedBlas guard;
    for (int64_t i = 0; i < n_jobs; ++i) take_part(boards[(p + i) % n_jobs], p / n_jobs);
  };
  // As a team (NOTE [Unit split]): a member that starts late finds no chunk left.
  at::parallel_for(0, per_job * n_jobs, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) participate(p);
  });
  for (const SplitBoard& b : boards)
    if (b.error) std::rethrow_exception(b.error);
}

// Runs the time loop of every job (one direction each) on every slab, all (job, slab) tasks in
// one parallel call (NOTE [Row slabs], NOTE [Direction tasks], NOTE [Helpers, not a team]), or
// split by units (NOTE [Unit split]). A job offers ascending() (its visiting order),
// flops_per_row_step() and step(t, r0, r1): step t on rows [r0, r1) (never empty), called
// concurrently for disjoint row ranges and different jobs; and kSplitsUnits (if true, what
// run_split needs).
template <typename Job>
void run_jobs(const std::vector<Job>& jobs, const Layout& L) {
  const int64_t T_steps = static_cast<int64_t>(L.sizes.size());
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  double flops = 0;
  int64_t active_rows = 0;
  for (int64_t b_t : L.sizes) active_rows += b_t;
  for (const Job& job : jobs) flops += double(active_rows) * job.flops_per_row_step();
  const LoopPlan plan = loop_plan(flops);  // NOTE [Threads]
  const int64_t threads = plan.threads;
  const auto slabs = make_slabs(L, std::max<int64_t>(1, threads / n_jobs));
  std::vector<std::pair<const Job*, Slab>> tasks;
  for (const Job& job : jobs)
    for (const Slab& slab : slabs) tasks.emplace_back(&job, slab);
  const unsigned fp_bits = SubnormalMode::current();  // set by the entry point's guard
  if constexpr (Job::kSplitsUnits) {
    if (split_units(jobs, L, threads)) return run_split(jobs, L, threads, fp_bits);
  }
  auto loop = [&](const Job& job, const Slab& slab) {
    SubnormalMode fp(fp_bits);  // NOTE [Subnormals]: every thread, restored at task end
    SingleThreadedBlas guard;  // each thread (or the one thread) runs its own BLAS calls
    for (int64_t k = 0; k < T_steps; ++k) {
      const int64_t t = job.ascending() ? k : T_steps - 1 - k;
      const int64_t r1 = std::min(slab.r1, L.sizes[t]);
      if (slab.r0 < r1) job.step(t, slab.r0, r1);
    }
  };
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  if (threads == 1 || n_tasks == 1) {
    for (const auto& task : tasks) loop(*task.first, task.second);
    return;
  }
  if (!plan.team) {
    run_with_helpers(n_tasks, std::min(threads, n_tasks) - 1,
                     [&](int64_t i) { loop(*tasks[i].first, tasks[i].second); });
    return;
  }
  // grain: at::parallel_for starts min(torch's threads, tasks / grain) threads
  const int64_t grain = (n_tasks + threads - 1) / threads;
  at::parallel_for(0, n_tasks, grain, [&](int64_t i0, int64_t i1) {
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
  at::Tensor output, h_n, c_n, S, act, cells, r_all, bias, w_hh_t, w_hr_t;
  int64_t act_width;
  const T *gx, *whh, *whr, *whh_t, *whr_t, *bias_p, *h0p;
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
    h0p = in.h0.data_ptr<T>();
    whh = in.w_hh.data_ptr<T>();
    whr = P > 0 ? in.w_hr->data_ptr<T>() : nullptr;
    const int64_t blas = blas_steps(*L), one_row = static_cast<int64_t>(L->sizes.size()) - blas;
    if (blas >= kMinStepsToTranspose ||  // NOTE [Transposed weights]
        (Hout <= kMaxNnGemvDepth && one_row >= kMinStepsToTranspose)) {
      w_hh_t = transposed<T>(in.w_hh);                          // (H_out, G*H)
      if (P > 0) w_hr_t = transposed<T>(*in.w_hr);              // (H, P)
    }
    whh_t = w_hh_t.defined() ? w_hh_t.data_ptr<T>() : nullptr;
    whr_t = w_hr_t.defined() ? w_hr_t.data_ptr<T>() : nullptr;
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

  // NOTE [Unit split]: the steps of a one-row loop split by hidden units.
  static constexpr bool kSplitsUnits = true;
  bool splits_units() const { return d.P == 0; }
  int64_t units() const { return d.H; }

  // Step t of a one-row loop (b_0 = 1) on hidden units [u0, u1) only; t_prev = the step before
  // it in the loop (-1: none, the state is h0). Reads the whole previous state from h0 or
  // t_prev's output row (never from h, which the other chunks of step t write) and writes units
  // [u0, u1) of S, act, c, cells, the output row and h.
  void step_units(int64_t t, int64_t t_prev, int64_t u0, int64_t u1) const {
    const int64_t H = d.H, Hout = d.Hout, GH = d.G * d.H, n = u1 - u0;
    const int64_t off = L->offsets[t];
    const T* h_prev = t_prev < 0 ? h0p : out + L->offsets[t_prev] * Hout;  // (1, H_out)
    const T* gx_t = gx + off * GH;
    T* out_t = out + off * Hout;
    T* act_t = act_p ? act_p + (need_backward ? off : 0) * act_width : nullptr;
    for (int64_t g = 0; g < d.G; ++g) prefetch_rows(gx_t + g * H + u0, n * sizeof(T));
    // S[g*H + u0 : g*H + u1] = h_prev @ w_hh[g*H + u0 : g*H + u1]^T, each gate g: (1, n)
    for (int64_t g = 0; g < d.G; ++g)
      step_gemm_nt<T>(1, n, Hout, h_prev, Hout, whh + (g * H + u0) * Hout, Hout, nullptr,
                      s + g * H + u0, GH);
    if (d.mode == Mode::kLstm) {
      lstm_fwd_rows_run(LstmFwd<T>{gx_t, s, act_t, c, out_t, Hout, H, u0, u1}, 0, 1);
      if (cells_p) std::memcpy(cells_p + off * H + u0, c + u0, sizeof(T) * n);
      std::memcpy(h + u0, out_t + u0, sizeof(T) * n);
    } else if (d.mode == Mode::kGru) {
      gru_fwd_rows_run(GruFwd<T>{gx_t, s, bias_p, act_t, h, out_t, H, u0, u1}, 0, 1);
    } else {
      rnn_fwd_rows_run(RnnFwd<T>{gx_t, s, h, out_t, H, d.mode == Mode::kRnnRelu, u0, u1}, 0, 1);
    }
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
    step_gemm_nt<T>(m, GH, Hout, h + r0 * Hout, Hout, whh, Hout, whh_t, s + r0 * GH, GH);
    if (d.mode == Mode::kLstm) {
      T* hr = P > 0 ? r_t : out_t;
      lstm_fwd_rows_run(LstmFwd<T>{gx_t, s, act_t, c, hr, P > 0 ? H : Hout, H, 0, H}, r0, r1);
      if (cells_p) copy_rows<T>(cells_p + off * H, H, c, H, r0, r1, H);
      if (P > 0) {
        // output[r0:r1] = r[r0:r1] @ w_hr^T: (m, H) x (H, P)
        step_gemm_nt<T>(m, P, H, r_t + r0 * H, H, whr, H, whr_t, out_t + r0 * P, P);
      }
      copy_rows<T>(h, Hout, out_t, Hout, r0, r1, Hout);
    } else if (d.mode == Mode::kGru) {
      gru_fwd_rows_run(GruFwd<T>{gx_t, s, bias_p, act_t, h, out_t, H, 0, H}, r0, r1);
    } else {
      rnn_fwd_rows_run(RnnFwd<T>{gx_t, s, h, out_t, H, d.mode == Mode::kRnnRelu, 0, H}, r0, r1);
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
  static constexpr bool kSplitsUnits = false;  // NOTE [Unit split]: forward only
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
        step_gemm_nn<T>(m, H, P, dh + r0 * P, P, whr, H, T(0), dr_scratch + r0 * H, H);
        dr = dr_scratch;
        ld_dr = H;
      }
      const T* cprev0 = split > 0 ? cells + prev_off * H : c0p;
      lstm_bwd_rows_run(LstmBwd<T>{act + off * act_width, cells + off * H, cprev0, c0p, split,
                                   dr, ld_dr, dc, dgx + off * GH, H},
                        r0, r1);
      // dh[r0:r1] = dgates rows @ w_hh: (m, 4H) x (4H, H_out)
      step_gemm_nn<T>(m, Hout, GH, dgx + (off + r0) * GH, GH, whh, Hout, T(0),
                 dh + r0 * Hout, Hout);
    } else if (d.mode == Mode::kGru) {
      gru_bwd_rows_run(GruBwd<T>{act + off * act_width, hprev_t, dh, dgx + off * GH,
                                 dgh + off * GH, H},
                       r0, r1);
      // dh[r0:r1] = z * dh + dgh rows @ w_hh: (m, 3H) x (3H, H)
      step_gemm_nn<T>(m, Hout, GH, dgh + (off + r0) * GH, GH, whh, Hout, T(1),
                 dh + r0 * Hout, Hout);
    } else {
      rnn_bwd_rows_run(RnnBwd<T>{out + off * Hout, dh, dgx + off * GH, H,
                                 d.mode == Mode::kRnnRelu},
                       r0, r1);
      step_gemm_nn<T>(m, Hout, GH, dgx + (off + r0) * GH, GH, whh, Hout, T(0),
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
    if (!threaded_gemm(2.0 * GH * Hout * N)) serial_blas.emplace();
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

namespace {

// x @ w_ih^T (+ bias (+ bias2)): the input projection of every row for one direction,
// (N, G*H), into a buffer of the cache (its page faults cost ~10 % of an inference forward at
// B = 256 otherwise). The rows start as the bias (summed once when there are two: rnn/lstm's
// b_ih + b_hh) and one BLAS call adds the product: at B = 1 the aten calls of
// addmm(b_ih + b_hh, x, w_ih.t()) (the add, the transposed view, the bias's broadcast copy)
// cost about as much as the product itself.
at::Tensor project(const at::Tensor& x, const at::Tensor& w_ih,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias2,
                   const char* name, int64_t index) {
  TORCH_CHECK_VALUE(w_ih.dim() == 2 && w_ih.size(1) == x.size(1) &&
                        w_ih.scalar_type() == x.scalar_type(),
                    name, "[", index, "]: expected a (G*H, ", x.size(1), ") tensor of dtype ",
                    x.scalar_type(), ", got ", w_ih.sizes(), " ", w_ih.scalar_type());
  const int64_t N = x.size(0), E = x.size(1), GH = w_ih.size(0);
  for (const auto* b : {&bias, &bias2}) {
    TORCH_CHECK_VALUE(!b->has_value() || ((*b)->dim() == 1 && (*b)->size(0) == GH &&
                                          (*b)->scalar_type() == x.scalar_type()),
                      name, "[", index, "] bias: expected a (", GH, ",) tensor of dtype ",
                      x.scalar_type(), ", got ", (*b)->sizes(), " ", (*b)->scalar_type());
  }
  at::Tensor g = empty_rows(N, GH, x.options());  // (N, G*H)
  if (N == 0 || GH == 0) return g;
  const at::Tensor rows = x.contiguous(), w = w_ih.contiguous();
  std::optional<SingleThreadedBlas> serial_blas;  // NOTE [Threads]
  const bool threaded = threaded_gemm(2.0 * N * E * GH);
  if (!threaded) serial_blas.emplace();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "packrnn_project", [&] {
    scalar_t* out = g.data_ptr<scalar_t>();
    if (bias.has_value()) {
      const at::Tensor b1 = bias->contiguous();
      const at::Tensor b2 = bias2.has_value() ? bias2->contiguous() : at::Tensor();
      const scalar_t* p1 = b1.data_ptr<scalar_t>();
      const scalar_t* p2 = b2.defined() ? b2.data_ptr<scalar_t>() : nullptr;
      for (int64_t j = 0; j < GH; ++j) out[j] = p2 ? p1[j] + p2[j] : p1[j];
      at::parallel_for(1, N, threaded ? 256 : N, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) std::memcpy(out + r * GH, out, GH * sizeof(scalar_t));
      });
    }
    gemm_rm<scalar_t>(false, true, N, GH, E, rows.data_ptr<scalar_t>(), std::max<int64_t>(E, 1),
                      w.data_ptr<scalar_t>(), std::max<int64_t>(E, 1),
                      scalar_t(bias.has_value() ? 1 : 0), out, GH);
  });
  return g;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected shape (N, E), got ", x.sizes());
  TORCH_CHECK_TYPE(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
}

}  // namespace

std::vector<at::Tensor> layer_forward(
    const std::string& mode, const at::Tensor& batch_sizes, const at::Tensor& x,
    at::TensorList w_ih, const c10::List<std::optional<at::Tensor>>& bias, at::TensorList h0,
    const c10::List<std::optional<at::Tensor>>& c0, at::TensorList w_hh,
    const c10::List<std::optional<at::Tensor>>& b_hh,
    const c10::List<std::optional<at::Tensor>>& w_hr, bool need_backward, bool padded) {
  const size_t D = w_ih.size();
  TORCH_CHECK_VALUE(D == 1 || D == 2, "w_ih: expected 1 or 2 directions, got ", D);
  check_count(bias.size(), D, "bias");
  check_input(x);
  std::vector<at::Tensor> gates;
  for (size_t k = 0; k < D; ++k)
    gates.push_back(project(x, w_ih[k], bias.get(k), std::nullopt, "w_ih", k));
  return recurrence_forward_directions(mode, batch_sizes, gates, h0, c0, w_hh, b_hh, w_hr,
                                       need_backward, padded);
}

std::vector<at::Tensor> stack_forward(const std::string& mode, const at::Tensor& batch_sizes,
                                      const at::Tensor& x, at::TensorList weights,
                                      const std::optional<at::Tensor>& h0_in,
                                      const std::optional<at::Tensor>& c0_in, int64_t num_layers,
                                      bool bidirectional, bool has_bias, bool padded) {
  const Mode kind = parse_mode(mode);
  const bool lstm = kind == Mode::kLstm, gru = kind == Mode::kGru;
  const int64_t D = bidirectional ? 2 : 1;
  TORCH_CHECK_VALUE(num_layers >= 1, "num_layers: expected >= 1, got ", num_layers);
  check_input(x);
  // Per layer and direction: w_ih, w_hh[, b_ih, b_hh][, w_hr] (torch's flat order).
  const int64_t slots = num_layers * D, base = has_bias ? 4 : 2;
  const int64_t per = static_cast<int64_t>(weights.size()) / slots;
  TORCH_CHECK_VALUE(per * slots == static_cast<int64_t>(weights.size()) &&
                        (per == base || (lstm && per == base + 1)),
                    "weights: expected ", base * slots, lstm ? " or " : "",
                    lstm ? std::to_string((base + 1) * slots) : std::string(),
                    " tensors for num_layers=", num_layers, ", bidirectional=", bidirectional,
                    ", bias=", has_bias, ", got ", weights.size());
  const bool has_proj = per == base + 1;
  const int64_t GH = weights[1].dim() == 2 ? weights[1].size(0) : 0;
  const int64_t H = GH / gate_count(kind), Hout = has_proj ? weights[per - 1].size(0) : H;
  for (int64_t i = 0; i < slots; ++i) {  // what the kernels below do not check: the biases
    for (int64_t j = 2; has_bias && j < 4; ++j) {
      const at::Tensor& b = weights[i * per + j];
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == GH, "weights[", i * per + j, "] (",
                        j == 2 ? "b_ih" : "b_hh", " of layer ", i / D, i % D ? ", reverse" : "",
                        "): expected shape (", GH, ",), got ", b.sizes());
    }
  }
  // Absent initial states are zeros, one (B, H_out) / (B, H) tensor that every layer and
  // direction reads (the kernel copies it into its running state); B = the rows of a step
  // (padded layout: N / T).
  check_batch_sizes(batch_sizes);
  const int64_t steps = batch_sizes.numel();
  const int64_t batch = steps == 0 ? 0 : padded ? x.size(0) / steps
                                               : batch_sizes.data_ptr<int64_t>()[0];
  const auto opts = x.options();
  if (h0_in.has_value()) {
    TORCH_CHECK_VALUE(h0_in->dim() == 3 && h0_in->size(0) == slots, "h0: expected shape (",
                      slots, ", B, H_out), got ", h0_in->sizes());
  }
  if (lstm && c0_in.has_value()) {
    TORCH_CHECK_VALUE(c0_in->dim() == 3 && c0_in->size(0) == slots, "c0: expected shape (",
                      slots, ", B, H), got ", c0_in->sizes());
  }
  const int64_t state_rows = h0_in.has_value() ? h0_in->size(1) : batch;
  const at::Tensor zero_h = h0_in.has_value() ? at::Tensor() : at::zeros({batch, Hout}, opts);
  const at::Tensor zero_c =
      lstm && !c0_in.has_value() ? at::zeros({state_rows, H}, opts) : at::Tensor();
  at::Tensor input = x;  // (N, E), then (N, D*H_out) between layers
  std::vector<at::Tensor> h_n, c_n;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    std::vector<ForwardArgs> dirs;
    for (int64_t k = 0; k < D; ++k) {
      const int64_t idx = layer * D + k;
      const at::Tensor* w = weights.data() + idx * per;
      std::optional<at::Tensor> bias, bias2;  // b_ih (+ b_hh folded in, but for gru)
      if (has_bias) bias = w[2];
      if (has_bias && !gru) bias2 = w[3];
      std::optional<at::Tensor> c0;
      if (lstm) c0 = c0_in.has_value() ? c0_in->select(0, idx) : zero_c;
      dirs.push_back(ForwardArgs{project(input, w[0], bias, bias2, "weights", idx * per),
                                 h0_in.has_value() ? h0_in->select(0, idx) : zero_h, c0,
                                 w[1], gru && has_bias ? std::optional<at::Tensor>(w[3])
                                                       : std::nullopt,
                                 has_proj ? std::optional<at::Tensor>(w[per - 1]) : std::nullopt,
                                 /*reverse=*/k == 1});
    }
    const auto out = forward_directions(mode, batch_sizes, std::move(dirs), false, padded);
    const size_t n = out.size() / D;  // [output, h_n, (c_n)] per direction
    std::vector<at::Tensor> outputs;
    for (int64_t k = 0; k < D; ++k) {
      outputs.push_back(out[k * n]);
      h_n.push_back(out[k * n + 1]);
      if (lstm) c_n.push_back(out[k * n + 2]);
    }
    input = D == 1 ? outputs[0] : at::cat(outputs, 1);  // (N, D*H_out)
  }
  // (N, D*H_out), (L*D, B, H_out), (L*D, B, H); one state: a view, no copy
  auto states = [](const std::vector<at::Tensor>& s) {
    return s.size() == 1 ? s[0].unsqueeze(0) : at::stack(s);
  };
  std::vector<at::Tensor> result{input, states(h_n)};
  if (lstm) result.push_back(states(c_n));
  return result;
}

void clear_cache() { BufferCache::instance().clear(); }

void set_kernel_threads(int64_t threads) {
  TORCH_CHECK_VALUE(threads >= 0, "threads: expected 0 (auto) or a positive int, got ", threads);
  g_kernel_threads.store(threads);
}

int64_t kernel_threads() { return g_kernel_threads.load(); }

int64_t split_loops() { return g_split_loops.load(); }

at::Tensor empty_buffer(int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "empty_buffer: expected non-negative sizes, got (",
                    rows, ", ", cols, ")");
  return empty_rows(rows, cols, at::TensorOptions().dtype(dtype));
}

std::string kernel_info() {
  std::string simd = cpu_has_avx512f()    ? "avx512f (one-row GEMV avx512f)"
                     : cpu_has_avx2_fma() ? "avx2+fma"
                                          : "baseline";
  if (!cpu_has_avx512f() && simd_capped_at_avx2()) simd += " (PACKRNN_SIMD=avx2)";
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
  m.def(
      "stack_forward(str mode, Tensor batch_sizes, Tensor x, Tensor[] weights, Tensor? h0, "
      "Tensor? c0, int num_layers, bool bidirectional, bool has_bias, bool padded) -> Tensor[]");
  m.def("kernel_info() -> str", &packrnn::kernel_info);
  m.def("clear_cache() -> ()", &packrnn::clear_cache);
  m.def("set_kernel_threads(int threads) -> ()", &packrnn::set_kernel_threads);
  m.def("kernel_threads() -> int", &packrnn::kernel_threads);
  m.def("split_loops() -> int", &packrnn::split_loops);
  m.def("empty_buffer(int rows, int cols, ScalarType dtype) -> Tensor", &packrnn::empty_buffer);
}

TORCH_LIBRARY_IMPL(packrnn, CPU, m) {
  m.impl("recurrence_forward", &packrnn::recurrence_forward);
  m.impl("recurrence_backward", &packrnn::recurrence_backward);
  m.impl("recurrence_forward_directions", &packrnn::recurrence_forward_directions);
  m.impl("recurrence_backward_directions", &packrnn::recurrence_backward_directions);
  m.impl("layer_forward", &packrnn::layer_forward);
  m.impl("stack_forward", &packrnn::stack_forward);
}

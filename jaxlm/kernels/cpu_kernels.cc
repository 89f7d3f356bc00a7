// y = x @ w for a few rows of x (decode steps: M = batch <= 32), float32, on the CPU.
//
// Why: XLA:CPU's GEMM (Eigen) packs the weight matrix into panels on every call. At M = 1 it takes
// a matrix-vector path that streams the weight once, but at M = 4-32 the packing copy halves the
// rate at which weights are read (measured: 27 GB/s at M = 1, 10 GB/s at M = 8), and a decode step
// is nothing but weight reads. These kernels read each weight element from memory exactly once per
// call, whatever M, with every row of x reusing it from registers:
//   JaxlmMatmulKN: w is [K, N] (jaxlm's Dense kernels, fan-in first);
//   JaxlmMatmulNK: w is [N, K], y = x @ w.T (the tied embedding as the output projection).
// Work is split over column (KN) or row (NK) ranges of w and run on XLA's intra-op thread pool.
// Built with AVX-512 when the compiler targets it; without it the library reports itself unusable
// and jaxlm keeps XLA's dot (jaxlm/kernels/__init__.py).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <cmath>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define JAXLM_FAST 1
#else
#define JAXLM_FAST 0
#endif

namespace ffi = xla::ffi;

// Built for AVX-512 and running on a CPU that has it (the library may be copied elsewhere).
extern "C" int JaxlmKernelsUsable() {
#if JAXLM_FAST
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  return 0;
#endif
}

namespace {

// Splits n into one range per thread, each a multiple of `align`.
int64_t Grain(ffi::ThreadPool& pool, int64_t n, int64_t align) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = (n + threads - 1) / threads;
  return std::max(align, (per + align - 1) / align * align);
}

// Runs body(begin, end) over [0, n) in chunks of `grain`, on the calling thread and the pool's.
// Participants take chunks from a shared counter, so a task that starts late finds no work and a
// busy pool never blocks the caller for longer than one chunk.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, Body body) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, grain, n, body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      body(c * grain, std::min(n, (c + 1) * grain));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

#if JAXLM_FAST

// Tuned on a 2-core AVX-512 Xeon with GPT-2 small shapes (768 x 768 / 3072, 8 rows: 19-22 GB/s,
// XLA's dot 7-9 GB/s); a wider block or a longer prefetch distance measured no better.
constexpr int kKBlock = 32;   // rows of w per pass over a column range: 32 forward streams
constexpr int kKnAhead = 64;  // software prefetch distance along a row of w, in floats (2 tiles)

// KN: y[m, n0:n1] for m in [0, M), over all K, streaming rows k of w[k, n0:n1] in blocks of
// kKBlock. Accumulators live in y between blocks (L1/L2-resident: M x (n1 - n0) floats).
// Register tile: MR rows of x by 2 vectors (32 columns) of w.
template <int MR>
inline void KnTile(const float* x, int64_t K, const float* w, int64_t N, float* y, int64_t k0,
                   int64_t k1, int64_t n, __mmask16 m0, __mmask16 m1) {
  __m512 acc[MR][2];
  _Pragma("GCC unroll 8")
  for (int r = 0; r < MR; ++r) {
    if (k0 == 0) {
      acc[r][0] = _mm512_setzero_ps();
      acc[r][1] = _mm512_setzero_ps();
    } else {
      acc[r][0] = _mm512_maskz_loadu_ps(m0, y + r * N + n);
      acc[r][1] = _mm512_maskz_loadu_ps(m1, y + r * N + n + 16);
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    const float* wr = w + k * N + n;
    _mm_prefetch(reinterpret_cast<const char*>(wr + kKnAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wr + kKnAhead + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_maskz_loadu_ps(m0, wr);
    const __m512 w1 = _mm512_maskz_loadu_ps(m1, wr + 16);
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  _Pragma("GCC unroll 8")
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * N + n, m0, acc[r][0]);
    _mm512_mask_storeu_ps(y + r * N + n + 16, m1, acc[r][1]);
  }
}

inline __mmask16 Mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

void KnRange(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y,
             int64_t n0, int64_t n1) {
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
    for (int64_t n = n0; n < n1; n += 32) {
      const __mmask16 m0 = Mask(n1 - n), m1 = Mask(n1 - n - 16);
      int64_t r = 0;
      for (; r + 8 <= M; r += 8) KnTile<8>(x + r * K, K, w, N, y + r * N, k0, k1, n, m0, m1);
      switch (M - r) {
        case 7: KnTile<7>(x + r * K, K, w, N, y + r * N, k0, k1, n, m0, m1); break;
        case 6: KnTile<6>(x + r * K, K, w, N, y + r * N, k0, k1, n, m0, m1); break;
        case 5: KnTile<5>(x + r * K, K, w, N, y + r * N, k0, k1, n, m0, m1); break;
        case 4: KnTile<4>(x + r * K, K, w, N, y + r * N, k0, k1, n, m0, m1); break;
        case 3: KnTile<3>(x + r * K, K, w, N, y + r * N, k0, k1, n, m0, m1); break;
        case 2: KnTile<2>(x + r * K, K, w, N, y + r * N, k0, k1, n, m0, m1); break;
        case 1: KnTile<1>(x + r * K, K, w, N, y + r * N, k0, k1, n, m0, m1); break;
        default: break;
      }
    }
  }
}

// NK: y[m, n] = dot(x[m, :], w[n, :]) for NR rows n of w at a time and MR rows m of x, 16 lanes of
// K per step; every row of w is read once (the tile's rows stay in L1 across m-groups), and the
// next tile's rows are prefetched while this one is computed.
template <int MR, int NR>
inline void NkTile(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t n) {
  __m512 acc[MR][NR];
  _Pragma("GCC unroll 8")
  for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 8")
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = Mask(K - k);
    __m512 wv[NR];
    _Pragma("GCC unroll 8")
    for (int c = 0; c < NR; ++c) {
      wv[c] = _mm512_maskz_loadu_ps(mk, w + (n + c) * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + c + NR) * K + k), _MM_HINT_T0);
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + r * K + k);
      _Pragma("GCC unroll 8")
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  _Pragma("GCC unroll 8")
  for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 8")
    for (int c = 0; c < NR; ++c) y[r * N + n + c] = _mm512_reduce_add_ps(acc[r][c]);
}

template <int NR>
void NkRows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N, int64_t n) {
  int64_t r = 0;
  for (; r + 8 <= M; r += 8) NkTile<8, NR>(x + r * K, K, w, y + r * N, N, n);
  switch (M - r) {
    case 7: NkTile<7, NR>(x + r * K, K, w, y + r * N, N, n); break;
    case 6: NkTile<6, NR>(x + r * K, K, w, y + r * N, N, n); break;
    case 5: NkTile<5, NR>(x + r * K, K, w, y + r * N, N, n); break;
    case 4: NkTile<4, NR>(x + r * K, K, w, y + r * N, N, n); break;
    case 3: NkTile<3, NR>(x + r * K, K, w, y + r * N, N, n); break;
    case 2: NkTile<2, NR>(x + r * K, K, w, y + r * N, N, n); break;
    case 1: NkTile<1, NR>(x + r * K, K, w, y + r * N, N, n); break;
    default: break;
  }
}

void NkRange(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y,
             int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3) NkRows<3>(x, M, K, w, y, N, n);
  for (; n < n1; ++n) NkRows<1>(x, M, K, w, y, N, n);
}


// Decode attention: one query per row over the cache as it lies ([B, KH, S, Dh], heads before
// slots), G = H / KH query heads per cache head. Reads each valid cache slot once per (row, cache
// head) and skips masked ones, so a step reads only the slots written so far.
inline __m512 Exp(__m512 x) {  // e^x, float32, |relative error| < 2e-7 (range reduction + degree 6)
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

void AttendOne(const float* q, const float* k, const float* v, const bool* valid, float* out, int64_t G,
               int64_t S, int64_t D, float scale, float* scores) {
  const int64_t nd = (D + 15) / 16;  // 16-lane chunks of a head; the last may be partial
  auto lanes = [=](int64_t c) { return Mask(D - 16 * c); };
  float best[64];
  for (int64_t g = 0; g < G; ++g) best[g] = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (!valid[s]) continue;
    const float* ks = k + s * D;
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < nd; ++c) {
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes(c), q + g * D + 16 * c),
                              _mm512_maskz_loadu_ps(lanes(c), ks + 16 * c), acc);
      }
      const float x = _mm512_reduce_add_ps(acc) * scale;
      scores[g * S + s] = x;
      best[g] = std::max(best[g], x);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores + g * S;
    const __m512 mx = _mm512_set1_ps(best[g]);
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {
      __mmask16 m = Mask(S - s);
      for (int j = 0; j < 16 && s + j < S; ++j)
        if (!valid[s + j]) m &= __mmask16(~(1u << j));
      const __m512 e = _mm512_maskz_mov_ps(m, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + s), mx)));
      _mm512_mask_storeu_ps(sc + s, Mask(S - s), e);
      total = _mm512_add_ps(total, e);
    }
    const float sum = _mm512_reduce_add_ps(total);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // no valid slot (a filler row): zeros
    for (int64_t s = 0; s < S; ++s) sc[s] *= inv;
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[16];
    for (int64_t c = 0; c < nd; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      if (!valid[s]) continue;
      const __m512 p = _mm512_set1_ps(scores[g * S + s]);
      for (int64_t c = 0; c < nd; ++c)
        acc[c] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(lanes(c), v + s * D + 16 * c), acc[c]);
    }
    for (int64_t c = 0; c < nd; ++c)
      _mm512_mask_storeu_ps(out + g * D + 16 * c, lanes(c), acc[c]);
  }
}

#endif  // JAXLM_FAST

// x [M, K] times w [K, N] (kTransposed: w [N, K], y = x @ w.T) -> y [M, N]. One range of output
// columns per thread: long forward runs along the rows of w for the prefetchers.
template <bool kTransposed>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
#if JAXLM_FAST
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[kTransposed ? 0 : 1];
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, N, Grain(pool, N, kTransposed ? 3 : 32), [=](int64_t n0, int64_t n1) {
    if (kTransposed) {
      NkRange(xp, M, K, wp, N, yp, n0, n1);
    } else {
      KnRange(xp, M, K, wp, N, yp, n0, n1);
    }
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("jaxlm's CPU kernels were built without AVX-512");
#endif
}

// q [B, T, H, D], k and v [B, KH, S, D], valid [B, T, S] -> out [B, T, H, D] (H = KH * G, G <= 64):
// T queries per row (a decode step, or a speculative round's few), each with its own valid slots.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid, ffi::ResultBuffer<ffi::F32> out,
                           float scale) {
#if JAXLM_FAST
  const int64_t B = k.dimensions()[0], KH = k.dimensions()[1], S = k.dimensions()[2], D = k.dimensions()[3];
  const int64_t T = q.dimensions()[1], G = q.dimensions()[2] / KH;
  if (G > 64 || D > 256) return ffi::Error::InvalidArgument("decode attention: G <= 64 and D <= 256 only");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* mp = valid.typed_data();
  float* op = out->typed_data();
  // One range of (row, query, cache head) triples i = (b * T + t) * KH + h per thread: one scores
  // buffer each, not one per triple.
  ParallelFor(pool, B * T * KH, Grain(pool, B * T * KH, 1), [=](int64_t i0, int64_t i1) {
    std::vector<float> scores(G * S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bt = i / KH, cache = (bt / T) * KH + i % KH;
      AttendOne(qp + i * G * D, kp + cache * S * D, vp + cache * S * D, mp + bt * S, op + i * G * D, G, S, D, scale,
                scores.data());
    }
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("jaxlm's CPU kernels were built without AVX-512");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmMatmulKN, Matmul<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmMatmulNK, Matmul<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

"""C++ source of the CPU kernels (compiled on first use by :mod:`.cpu`).

AVX2 + F16C intrinsics where the compiler targets them (``-march=native``), with scalar loops
that compute bit-identical results (tails, and the whole job on other CPUs).  Compiled with
``-ffp-contract=off`` so no multiply-add is ever fused: the format (reference.py) specifies
separately rounded float32 operations.  Threads: torch's intra-op pool (``at::parallel_for``)
with dynamic chunking.  The functions are registered as torch operators
(``torch.ops.<name>.*``, see :func:`registration`).
"""

CPP_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <algorithm>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define FP_SIMD 1
#else
#define FP_SIMD 0
#endif

namespace {

using at::Half;
using at::BFloat16;
constexpr int64_t CH = 4096;  // elements per chunk (multiple of 128)
constexpr float INF = std::numeric_limits<float>::infinity();
constexpr uint32_t MIX_C1 = 0x7feb352du;
constexpr uint32_t MIX_C2 = 0x846ca68bu;

struct Keys { bool on; uint32_t k1, k2; };

// ------------------------------------------------------------------ scalar element access
inline float ld1(const float* p) { return *p; }
inline float ld1(const Half* p) { return static_cast<float>(*p); }
inline float ld1(const BFloat16* p) { return static_cast<float>(*p); }
inline void st1(float* p, float v) { *p = v; }
inline void st1(Half* p, float v) { *p = Half(v); }
inline void st1(BFloat16* p, float v) { *p = BFloat16(v); }
inline bool finite1(float v) { return std::fabs(v) < INF; }

#if FP_SIMD
inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 ld8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 ld8(const BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void st8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void st8(Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void st8(BFloat16* p, __m256 v) {  // round to nearest even, NaN -> 0x7fc0 (as c10)
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  __m256i p16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(p16));
}
inline __m256 finite8(__m256 v) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return _mm256_cmp_ps(_mm256_and_ps(v, absmask), _mm256_set1_ps(INF), _CMP_LT_OQ);
}
inline __m256i mix8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(MIX_C1)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(MIX_C2)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}
#endif

inline uint32_t mix1(uint32_t h) {
  h ^= h >> 16; h *= MIX_C1; h ^= h >> 15; h *= MIX_C2; h ^= h >> 16;
  return h;
}
inline float uniform1(int64_t idx, const Keys& k) {
  uint64_t i = static_cast<uint64_t>(idx);
  const uint32_t key = mix1(static_cast<uint32_t>(i >> 32) ^ k.k2) ^ k.k1;
  const uint32_t h = mix1(static_cast<uint32_t>(i) ^ key);
  return static_cast<float>(h >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// u for the flat indices base .. base + m - 1
void fill_uniform(int64_t base, int64_t m, const Keys& k, float* u) {
  int64_t i = 0;
#if FP_SIMD
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 two24 = _mm256_set1_ps(5.9604644775390625e-08f);
  // the high index word is constant until the low word wraps (then: scalar loop)
  const uint32_t key = mix1(static_cast<uint32_t>(static_cast<uint64_t>(base) >> 32) ^ k.k2) ^ k.k1;
  const __m256i vkey = _mm256_set1_epi32(static_cast<int>(key));
  for (; i + 8 <= m; i += 8) {
    uint64_t b = static_cast<uint64_t>(base + i);
    if ((b & 0xffffffffull) > 0xfffffff7ull) break;  // lanes would straddle a 2^32 boundary
    __m256i lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(b))), iota);
    __m256i h = mix8(_mm256_xor_si256(lo, vkey));
    __m256 f = _mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8));
    _mm256_storeu_ps(u + i, _mm256_mul_ps(f, two24));
  }
#endif
  for (; i < m; ++i) u[i] = uniform1(base + i, k);
}

// ------------------------------------------------------------------ min / max of finite values
struct MinMax { float mn = INF, mx = -INF; bool bad = false; };

template <typename T>
void minmax_finite(const T* x, int64_t n, MinMax& r) {
  int64_t i = 0;
#if FP_SIMD
  if (n >= 8) {
    // z = x * 0 is +-0 for finite x and NaN otherwise, so y = x + z is x or NaN, and
    // min_ps / max_ps(y, acc) return acc when y is NaN: NaN and +-Inf are skipped without
    // blends.  OR-ing the bits of z flags them (finite: only a sign bit can be set).
    __m256 vmn = _mm256_set1_ps(INF), vmx = _mm256_set1_ps(-INF);
    __m256 nz = _mm256_setzero_ps();
    const __m256 zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      __m256 v = ld8(x + i);
      __m256 z = _mm256_mul_ps(v, zero);
      __m256 y = _mm256_add_ps(v, z);
      vmn = _mm256_min_ps(y, vmn);
      vmx = _mm256_max_ps(y, vmx);
      nz = _mm256_or_ps(nz, z);
    }
    alignas(32) float a[8], b[8];
    _mm256_store_ps(a, vmn);
    _mm256_store_ps(b, vmx);
    for (int j = 0; j < 8; ++j) {
      r.mn = a[j] < r.mn ? a[j] : r.mn;
      r.mx = b[j] > r.mx ? b[j] : r.mx;
    }
    const __m256i mag = _mm256_and_si256(_mm256_castps_si256(nz), _mm256_set1_epi32(0x7fffffff));
    if (!_mm256_testz_si256(mag, mag)) r.bad = true;
  }
#endif
  for (; i < n; ++i) {
    float v = ld1(x + i);
    if (finite1(v)) {
      r.mn = v < r.mn ? v : r.mn;
      r.mx = v > r.mx ? v : r.mx;
    } else {
      r.bad = true;
    }
  }
}

inline void canonical(MinMax& r) {  // no finite value -> 0, 0; -0.0 -> +0.0
  if (r.mn > r.mx) { r.mn = 0.0f; r.mx = 0.0f; }
  r.mn = r.mn + 0.0f;
  r.mx = r.mx + 0.0f;
}

// ------------------------------------------------------------------ float <-> float buffers
template <typename T>
void load_run(const T* src, int64_t m, float* dst) {
  int64_t i = 0;
#if FP_SIMD
  for (; i + 8 <= m; i += 8) _mm256_storeu_ps(dst + i, ld8(src + i));
#endif
  for (; i < m; ++i) dst[i] = ld1(src + i);
}

template <typename T>
void store_run(const float* src, int64_t m, T* dst) {
  int64_t i = 0;
#if FP_SIMD
  for (; i + 8 <= m; i += 8) st8(dst + i, _mm256_loadu_ps(src + i));
#endif
  for (; i < m; ++i) st1(dst + i, src[i]);
}

// ------------------------------------------------------------------ codes
// c[i] = clamp(floor((v[i] - z) / s + r_i), 0, qmax), 0 if s == 0 or v[i] not finite;
// r_i = 0.5 (deterministic) or u[i] (stochastic).
void codes_chunk(const float* v, const float* u, int64_t m, float z, float s, float qmax,
                 uint8_t* c) {
  if (!(s != 0.0f)) { std::memset(c, 0, m); return; }
  int64_t i = 0;
#if FP_SIMD
  const __m256 vz = _mm256_set1_ps(z), vs = _mm256_set1_ps(s), vq = _mm256_set1_ps(qmax);
  const __m256 half = _mm256_set1_ps(0.5f), zero = _mm256_setzero_ps();
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; i + 32 <= m; i += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      __m256 x = _mm256_loadu_ps(v + i + 8 * j);
      x = _mm256_add_ps(x, _mm256_mul_ps(x, zero));  // NaN unless finite (see minmax_finite)
      __m256 t = _mm256_div_ps(_mm256_sub_ps(x, vz), vs);
      t = _mm256_add_ps(t, u ? _mm256_loadu_ps(u + i + 8 * j) : half);
      t = _mm256_floor_ps(t);
      t = _mm256_min_ps(_mm256_max_ps(t, zero), vq);  // max_ps(NaN, 0) = 0: code 0
      q[j] = _mm256_cvttps_epi32(t);
    }
    __m256i a = _mm256_packus_epi32(q[0], q[1]);
    __m256i b = _mm256_packus_epi32(q[2], q[3]);
    __m256i r = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b), perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i), r);
  }
#endif
  for (; i < m; ++i) {
    float x = v[i];
    float t = (x - z) / s;
    t = std::floor(t + (u ? u[i] : 0.5f));
    t = t < 0.0f ? 0.0f : t;
    t = t > qmax ? qmax : t;
    c[i] = finite1(x) ? static_cast<uint8_t>(t) : 0;
  }
}

// m unpacked codes -> ceil(m * bits / 8) bytes, LSB first
void pack(const uint8_t* c, int64_t m, int bits, uint8_t* out) {
  if (bits == 8) { std::memcpy(out, c, m); return; }
  const int k = 8 / bits;
  int64_t i = 0;  // code index
#if FP_SIMD
  if (bits == 4) {
    const __m256i lo = _mm256_set1_epi16(0x000f), hi = _mm256_set1_epi16(0x00f0);
    for (; i + 64 <= m; i += 64) {
      __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i));
      __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i + 32));
      a = _mm256_or_si256(_mm256_and_si256(a, lo), _mm256_and_si256(_mm256_srli_epi16(a, 4), hi));
      b = _mm256_or_si256(_mm256_and_si256(b, lo), _mm256_and_si256(_mm256_srli_epi16(b, 4), hi));
      __m256i r = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2), r);
    }
  } else {
    const __m256i m0 = _mm256_set1_epi32(0x03), m1 = _mm256_set1_epi32(0x0c);
    const __m256i m2 = _mm256_set1_epi32(0x30), m3 = _mm256_set1_epi32(0xc0);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; i + 128 <= m; i += 128) {
      __m256i p[4];
      for (int j = 0; j < 4; ++j) {
        __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i + 32 * j));
        __m256i r = _mm256_and_si256(w, m0);
        r = _mm256_or_si256(r, _mm256_and_si256(_mm256_srli_epi32(w, 6), m1));
        r = _mm256_or_si256(r, _mm256_and_si256(_mm256_srli_epi32(w, 12), m2));
        r = _mm256_or_si256(r, _mm256_and_si256(_mm256_srli_epi32(w, 18), m3));
        p[j] = r;
      }
      __m256i a = _mm256_packus_epi32(p[0], p[1]);
      __m256i b = _mm256_packus_epi32(p[2], p[3]);
      __m256i r = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b), perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 4), r);
    }
  }
#endif
  for (int64_t j = i / k; j * k < m; ++j) {
    uint32_t byte = 0;
    for (int q = 0; q < k && j * k + q < m; ++q) byte |= uint32_t(c[j * k + q]) << (q * bits);
    out[j] = static_cast<uint8_t>(byte);
  }
}

// ceil(m * bits / 8) bytes -> m codes
void unpack(const uint8_t* in, int64_t m, int bits, uint8_t* c) {
  if (bits == 8) { std::memcpy(c, in, m); return; }
  const int k = 8 / bits;
  const uint32_t mask = (1u << bits) - 1;
  int64_t i = 0;
#if FP_SIMD
  if (bits == 4) {
    const __m256i lo = _mm256_set1_epi16(0x000f), hi = _mm256_set1_epi16(0x00f0);
    for (; i + 32 <= m; i += 32) {
      __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i / 2)));
      w = _mm256_or_si256(_mm256_and_si256(w, lo), _mm256_slli_epi16(_mm256_and_si256(w, hi), 4));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i), w);
    }
  } else {
    const __m256i m0 = _mm256_set1_epi32(0x03), m1 = _mm256_set1_epi32(0x0c);
    const __m256i m2 = _mm256_set1_epi32(0x30), m3 = _mm256_set1_epi32(0xc0);
    for (; i + 32 <= m; i += 32) {
      __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + i / 4)));
      __m256i r = _mm256_and_si256(w, m0);
      r = _mm256_or_si256(r, _mm256_slli_epi32(_mm256_and_si256(w, m1), 6));
      r = _mm256_or_si256(r, _mm256_slli_epi32(_mm256_and_si256(w, m2), 12));
      r = _mm256_or_si256(r, _mm256_slli_epi32(_mm256_and_si256(w, m3), 18));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i), r);
    }
  }
#endif
  for (; i < m; ++i) c[i] = static_cast<uint8_t>((in[i / k] >> ((i % k) * bits)) & mask);
}

// y = z + float(code) * s  (multiply, then add: never fused)
template <typename T>
void dequant_run(const uint8_t* c, int64_t m, float z, float s, T* out) {
  int64_t i = 0;
#if FP_SIMD
  const __m256 vz = _mm256_set1_ps(z), vs = _mm256_set1_ps(s);
  for (; i + 8 <= m; i += 8) {
    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i)));
    st8(out + i, _mm256_add_ps(vz, _mm256_mul_ps(_mm256_cvtepi32_ps(q), vs)));
  }
#endif
  for (; i < m; ++i) {
    float p = static_cast<float>(c[i]) * s;
    st1(out + i, z + p);
  }
}

// Like at::parallel_for, but the threads take chunks of `grain` items from a shared counter:
// a thread that the OS deschedules (2 cores shared with a data loader, other processes...)
// then delays the call by at most one chunk instead of its whole static share.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int nt = at::get_num_threads();
  if (n <= grain || nt <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t b = next.fetch_add(grain);
      if (b >= n) break;
      f(b, std::min(n, b + grain));
    }
  });
}

// ------------------------------------------------------------------ group mode
// Returns bit 0: some input is not finite; bit 1: some max - min overflowed float32.
template <typename T>
int group_quantize_impl(const T* x, int64_t n, int bits, int64_t G, const Keys& keys,
                         uint8_t* out, float* scale, float* zero) {
  const int64_t ng = (n + G - 1) / G;
  const float qmax = static_cast<float>((1 << bits) - 1);
  std::atomic<int> flags{0};
  const int64_t grain = std::max<int64_t>(1, 32768 / G);
  parallel_chunks(ng, grain, [&](int64_t g0, int64_t g1) {
    std::vector<float> vbuf(std::is_same<T, float>::value ? 0 : CH), ubuf(keys.on ? CH : 0);
    std::vector<uint8_t> cbuf(CH);
    bool local_bad = false, local_ovf = false;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t start = g * G, len = std::min(G, n - start);
      MinMax r;
      minmax_finite(x + start, len, r);
      local_bad |= r.bad;
      canonical(r);
      const float s = (r.mx - r.mn) / qmax;
      local_ovf |= !(s < INF);
      scale[g] = s;
      zero[g] = r.mn;
      uint8_t* og = out + start * bits / 8;
      for (int64_t off = 0; off < len; off += CH) {
        const int64_t m = std::min(CH, len - off);
        const float* v;
        if constexpr (std::is_same<T, float>::value) {
          v = x + start + off;
        } else {
          load_run(x + start + off, m, vbuf.data());
          v = vbuf.data();
        }
        const float* u = nullptr;
        if (keys.on) { fill_uniform(start + off, m, keys, ubuf.data()); u = ubuf.data(); }
        codes_chunk(v, u, m, r.mn, s, qmax, cbuf.data());
        pack(cbuf.data(), m, bits, og + off * bits / 8);
      }
    }
    if (local_bad || local_ovf) flags.fetch_or((local_bad ? 1 : 0) | (local_ovf ? 2 : 0));
  });
  return flags.load();
}

template <typename T>
void group_dequantize_impl(const uint8_t* codes, const float* scale, const float* zero,
                           int bits, int64_t G, int64_t n, T* out) {
  const int64_t ng = (n + G - 1) / G;
  const int64_t grain = std::max<int64_t>(1, 32768 / G);
  parallel_chunks(ng, grain, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> cbuf(CH);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t start = g * G, len = std::min(G, n - start);
      const uint8_t* in = codes + start * bits / 8;
      for (int64_t off = 0; off < len; off += CH) {
        const int64_t m = std::min(CH, len - off);
        const uint8_t* c;
        if (bits == 8) {
          c = in + off;
        } else {
          unpack(in + off * bits / 8, m, bits, cbuf.data());
          c = cbuf.data();
        }
        dequant_run(c, m, zero[g], scale[g], out + start + off);
      }
    }
  });
}

// ------------------------------------------------------------------ channel modes
template <typename T>
bool channel_minmax_impl(const T* x, int64_t N, int64_t C, int64_t inner, float* mn, float* mx) {
  const int nt = at::get_num_threads();
  std::vector<float> pmn(static_cast<size_t>(nt) * C, INF), pmx(static_cast<size_t>(nt) * C, -INF);
  std::vector<char> pbad(nt, 0);
  if (inner >= 16) {
    const int64_t grain = std::max<int64_t>(1, 32768 / inner);
    parallel_chunks(N * C, grain, [&](int64_t r0, int64_t r1) {
      const int tid = at::get_thread_num();
      float* tmn = pmn.data() + static_cast<size_t>(tid) * C;
      float* tmx = pmx.data() + static_cast<size_t>(tid) * C;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C;
        MinMax m;
        minmax_finite(x + r * inner, inner, m);
        tmn[c] = m.mn < tmn[c] ? m.mn : tmn[c];
        tmx[c] = m.mx > tmx[c] ? m.mx : tmx[c];
        if (m.bad) pbad[tid] = 1;
      }
    });
  } else {
    const int64_t row = C * inner;
    const int64_t grain = std::max<int64_t>(1, 32768 / row);
    parallel_chunks(N, grain, [&](int64_t n0, int64_t n1) {
      const int tid = at::get_thread_num();
      float* tmn = pmn.data() + static_cast<size_t>(tid) * C;
      float* tmx = pmx.data() + static_cast<size_t>(tid) * C;
      bool bad = false;
      for (int64_t n = n0; n < n1; ++n) {
        const T* xr = x + n * row;
        int64_t c = 0;
#if FP_SIMD
        if (inner == 1) {
          const __m256 pinf = _mm256_set1_ps(INF), ninf = _mm256_set1_ps(-INF);
          for (; c + 8 <= C; c += 8) {
            __m256 v = ld8(xr + c);
            __m256 fin = finite8(v);
            _mm256_storeu_ps(tmn + c, _mm256_min_ps(_mm256_loadu_ps(tmn + c), _mm256_blendv_ps(pinf, v, fin)));
            _mm256_storeu_ps(tmx + c, _mm256_max_ps(_mm256_loadu_ps(tmx + c), _mm256_blendv_ps(ninf, v, fin)));
            if (_mm256_movemask_ps(fin) != 0xff) bad = true;
          }
        }
#endif
        for (; c < C; ++c) {
          for (int64_t s = 0; s < inner; ++s) {
            float v = ld1(xr + c * inner + s);
            if (finite1(v)) {
              tmn[c] = v < tmn[c] ? v : tmn[c];
              tmx[c] = v > tmx[c] ? v : tmx[c];
            } else {
              bad = true;
            }
          }
        }
      }
      if (bad) pbad[tid] = 1;
    });
  }
  bool bad = false;
  for (int t = 0; t < nt; ++t) bad |= pbad[t] != 0;
  for (int64_t c = 0; c < C; ++c) {
    MinMax r;
    for (int t = 0; t < nt; ++t) {
      const float a = pmn[static_cast<size_t>(t) * C + c], b = pmx[static_cast<size_t>(t) * C + c];
      r.mn = a < r.mn ? a : r.mn;
      r.mx = b > r.mx ? b : r.mx;
    }
    canonical(r);
    mn[c] = r.mn;
    mx[c] = r.mx;
  }
  return bad;
}

// Positions per (tile, channel) work item.  A tile is k whole rows (n) of every channel,
// so that work items (t, c) in order t-major / c-minor read x in memory order; k makes the
// tile a multiple of 4 positions (every channel stream byte aligned at every width), keeps
// all channels of a tile within ~512 KB (L2) and a work item at >= 64 positions.
inline int64_t tile_positions(int64_t C, int64_t inner) {
  const int64_t align = inner % 4 == 0 ? 1 : (inner % 2 == 0 ? 2 : 4);
  int64_t k = (131072 / std::max<int64_t>(C * inner, 1)) / align * align;
  k = std::max(k, align);
  while (k * inner < 64) k += align;
  return k * inner;
}

// Visit the contiguous runs of channel c's stream positions [p0, p1):
// f(flat_index_of_first, length, position_offset_within_tile).
template <typename F>
inline void for_runs(int64_t C, int64_t inner, int64_t c, int64_t p0, int64_t p1, F f) {
  int64_t n = p0 / inner, s = p0 % inner, p = p0;
  while (p < p1) {
    const int64_t len = std::min(inner - s, p1 - p);
    f((n * C + c) * inner + s, len, p - p0);
    p += len;
    s = 0;
    ++n;
  }
}

template <typename T>
void channel_quantize_impl(const T* x, int64_t N, int64_t C, int64_t inner, const uint8_t* bits_c,
                           const float* scale, const float* zero, const int64_t* offsets,
                           const Keys& keys, uint8_t* out) {
  const int64_t M = N * inner;
  const int64_t tp = tile_positions(C, inner);
  const int64_t nt = (M + tp - 1) / tp;
  const int64_t grain = std::max<int64_t>(1, 32768 / tp);  // small inputs: no threads
  parallel_chunks(nt * C, grain, [&](int64_t w0, int64_t w1) {
    std::vector<float> vbuf(tp), ubuf(keys.on ? tp : 0);
    std::vector<uint8_t> cbuf(tp);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t = w / C, c = w % C;
      const int64_t p0 = t * tp, p1 = std::min(M, p0 + tp), m = p1 - p0;
      const float* v = vbuf.data();
      float* u = keys.on ? ubuf.data() : nullptr;
      const int64_t row0 = p0 / inner;
      if (std::is_same<T, float>::value && (p1 - 1) / inner == row0) {
        // one contiguous run: read the input in place
        const int64_t flat = (row0 * C + c) * inner + (p0 - row0 * inner);
        v = reinterpret_cast<const float*>(x + flat);
        if (u) fill_uniform(flat, m, keys, u);
      } else {
        float* vb = vbuf.data();
        for_runs(C, inner, c, p0, p1, [&](int64_t flat, int64_t len, int64_t at) {
          if (len == 1) {
            vb[at] = ld1(x + flat);
            if (u) u[at] = uniform1(flat, keys);
          } else {
            load_run(x + flat, len, vb + at);
            if (u) fill_uniform(flat, len, keys, u + at);
          }
        });
      }
      const int b = bits_c[c];
      codes_chunk(v, u, m, zero[c], scale[c], static_cast<float>((1 << b) - 1), cbuf.data());
      pack(cbuf.data(), m, b, out + offsets[c] + p0 * b / 8);
    }
  });
}

template <typename T>
void channel_dequantize_impl(const uint8_t* codes, int64_t N, int64_t C, int64_t inner,
                             const uint8_t* bits_c, const float* scale, const float* zero,
                             const int64_t* offsets, T* out) {
  const int64_t M = N * inner;
  const int64_t tp = tile_positions(C, inner);
  const int64_t nt = (M + tp - 1) / tp;
  const int64_t grain = std::max<int64_t>(1, 32768 / tp);  // small inputs: no threads
  parallel_chunks(nt * C, grain, [&](int64_t w0, int64_t w1) {
    std::vector<float> vbuf(tp);
    std::vector<uint8_t> cbuf(tp);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t = w / C, c = w % C;
      const int64_t p0 = t * tp, p1 = std::min(M, p0 + tp), m = p1 - p0;
      const int b = bits_c[c];
      const uint8_t* in = codes + offsets[c] + p0 * b / 8;
      const uint8_t* q = in;
      if (b != 8) {
        unpack(in, m, b, cbuf.data());
        q = cbuf.data();
      }
      const int64_t row0 = p0 / inner;
      if ((p1 - 1) / inner == row0) {  // one contiguous run: write the output in place
        dequant_run(q, m, zero[c], scale[c], out + (row0 * C + c) * inner + (p0 - row0 * inner));
        continue;
      }
      float* v = vbuf.data();
      dequant_run(q, m, zero[c], scale[c], v);
      for_runs(C, inner, c, p0, p1, [&](int64_t flat, int64_t len, int64_t at) {
        if (len == 1) st1(out + flat, v[at]);
        else store_run(v + at, len, out + flat);
      });
    }
  });
}

#define FP_DISPATCH(dtype, ...)                                                    \
  [&] {                                                                            \
    if ((dtype) == at::kFloat) { using scalar_t = float; return __VA_ARGS__(); }   \
    if ((dtype) == at::kHalf) { using scalar_t = Half; return __VA_ARGS__(); }     \
    if ((dtype) == at::kBFloat16) { using scalar_t = BFloat16; return __VA_ARGS__(); } \
    TORCH_CHECK(false, "fedplan cpu kernels: unsupported dtype ", dtype);          \
  }()

void check_input(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), "fedplan cpu kernels need CPU tensors");
  TORCH_CHECK(x.is_contiguous(), "fedplan cpu kernels need contiguous tensors");
  TORCH_CHECK(x.dim() == dim, "expected a ", dim, "-d tensor");
}

Keys make_keys(bool on, int64_t k1, int64_t k2) {
  return Keys{on, static_cast<uint32_t>(k1), static_cast<uint32_t>(k2)};
}

}  // namespace

std::vector<at::Tensor> group_quantize(at::Tensor x, int64_t bits, int64_t group_size,
                                       bool stochastic, int64_t k1, int64_t k2) {
  check_input(x, 1);
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8");
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0, "group_size must be a multiple of 4");
  const int64_t n = x.numel(), ng = (n + group_size - 1) / group_size;
  auto codes = at::empty({(n * bits + 7) / 8}, x.options().dtype(at::kByte));
  auto f32 = x.options().dtype(at::kFloat);
  auto scale = at::empty({ng}, f32), zero = at::empty({ng}, f32);
  const Keys keys = make_keys(stochastic, k1, k2);
  int flags = FP_DISPATCH(x.scalar_type(), [&] {
    return group_quantize_impl(x.data_ptr<scalar_t>(), n, static_cast<int>(bits), group_size,
                               keys, codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                               zero.data_ptr<float>());
  });
  return {codes, scale, zero, at::scalar_tensor(flags, x.options().dtype(at::kLong))};
}

void group_dequantize(at::Tensor codes, at::Tensor scale, at::Tensor zero, int64_t bits,
                      int64_t group_size, at::Tensor out) {
  check_input(codes, 1);
  check_input(out, 1);
  const int64_t n = out.numel();
  TORCH_CHECK(codes.numel() == (n * bits + 7) / 8, "codes size mismatch");
  TORCH_CHECK(scale.numel() == (n + group_size - 1) / group_size, "scale size mismatch");
  FP_DISPATCH(out.scalar_type(), [&] {
    group_dequantize_impl(codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                          zero.data_ptr<float>(), static_cast<int>(bits), group_size, n,
                          out.data_ptr<scalar_t>());
  });
}

std::vector<at::Tensor> channel_minmax(at::Tensor x3) {
  check_input(x3, 3);
  const int64_t N = x3.size(0), C = x3.size(1), inner = x3.size(2);
  auto f32 = x3.options().dtype(at::kFloat);
  auto mn = at::empty({C}, f32), mx = at::empty({C}, f32);
  bool bad = FP_DISPATCH(x3.scalar_type(), [&] {
    return channel_minmax_impl(x3.data_ptr<scalar_t>(), N, C, inner, mn.data_ptr<float>(),
                               mx.data_ptr<float>());
  });
  return {mn, mx, at::scalar_tensor(bad, x3.options().dtype(at::kBool))};
}

at::Tensor channel_quantize(at::Tensor x3, at::Tensor bits_c, at::Tensor scale, at::Tensor zero,
                            at::Tensor offsets, int64_t total_bytes, bool stochastic, int64_t k1,
                            int64_t k2) {
  check_input(x3, 3);
  const int64_t N = x3.size(0), C = x3.size(1), inner = x3.size(2);
  TORCH_CHECK(bits_c.numel() == C && scale.numel() == C && zero.numel() == C &&
              offsets.numel() == C, "per-channel tensor size mismatch");
  auto out = at::empty({total_bytes}, x3.options().dtype(at::kByte));
  const Keys keys = make_keys(stochastic, k1, k2);
  FP_DISPATCH(x3.scalar_type(), [&] {
    channel_quantize_impl(x3.data_ptr<scalar_t>(), N, C, inner, bits_c.data_ptr<uint8_t>(),
                          scale.data_ptr<float>(), zero.data_ptr<float>(),
                          offsets.data_ptr<int64_t>(), keys, out.data_ptr<uint8_t>());
  });
  return out;
}

void channel_dequantize(at::Tensor codes, at::Tensor bits_c, at::Tensor scale, at::Tensor zero,
                        at::Tensor offsets, at::Tensor out3) {
  check_input(out3, 3);
  const int64_t N = out3.size(0), C = out3.size(1), inner = out3.size(2);
  TORCH_CHECK(bits_c.numel() == C && scale.numel() == C && zero.numel() == C &&
              offsets.numel() == C, "per-channel tensor size mismatch");
  FP_DISPATCH(out3.scalar_type(), [&] {
    channel_dequantize_impl(codes.data_ptr<uint8_t>(), N, C, inner, bits_c.data_ptr<uint8_t>(),
                            scale.data_ptr<float>(), zero.data_ptr<float>(),
                            offsets.data_ptr<int64_t>(), out3.data_ptr<scalar_t>());
  });
}

bool simd_enabled() { return FP_SIMD != 0; }
"""

FUNCTIONS = [
    "group_quantize",
    "group_dequantize",
    "channel_minmax",
    "channel_quantize",
    "channel_dequantize",
    "simd_enabled",
]


def registration(namespace: str) -> str:
    """The TORCH_LIBRARY block that exposes FUNCTIONS as ``torch.ops.<namespace>.*``.

    Operators registered through the dispatcher (instead of a pybind11 module) need only the
    light ATen headers, which keeps the one-off build around 20 s instead of over a minute.
    """
    defs = "\n".join(f'  m.def("{f}", &{f});' for f in FUNCTIONS)
    return f"\nTORCH_LIBRARY({namespace}, m) {{\n{defs}\n}}\n"

// Inner loops of the direct sparse convolution (csrc/cpu/sparse_conv.cpp), compiled once per instruction
// set: sparse_conv.cpp includes this file three times, each inside its own namespace and under its own
// `#pragma GCC target`, so no wide instruction leaks into code that runs on a CPU without it. No include
// guard on purpose; it includes nothing itself (the includer has <cstdint>).
//
// Both loops run over a tile of a flattened plane whose length is a multiple of 32 bytes (CV<T>::H
// elements): the driver lays the operands out so that every stored weight entry reads a plane at a
// constant offset (phase-split padded input, zero-margined grad_y) and pads every plane with zeros up to
// that length, so there is neither border arithmetic nor a scalar tail in here. (32 rather than 64 bytes:
// a 7x7 image's 55 positions would compute 64 instead of 56.)

#ifndef SC_INLINE
#define SC_INLINE inline __attribute__((always_inline))
#endif

// SC_NATIVE: the includer's native vector width in bytes (16 SSE, 32 AVX2, 64 AVX-512). The kernels use
// vectors of exactly that width: wider GNU vectors are split by the compiler through the stack, which cost
// five times the time (the one exception, a 32-byte half vector at the end of an AVX-512 tile, is narrower).
// W (CV<T>::W, 64 bytes of elements) is the width of an entry's dtheta lanes, H (32 bytes) the unit the
// driver pads planes to.
#ifndef SC_NATIVE
#define SC_NATIVE 16
#endif

// A GNU vector of BYTES bytes with unaligned loads and stores.
template <typename T, int BYTES>
struct Vec {
  typedef T v __attribute__((vector_size(BYTES)));
  typedef T vu __attribute__((vector_size(BYTES), aligned(sizeof(T)), may_alias));
  static constexpr int N = BYTES / sizeof(T);
  static SC_INLINE v load(const T* p) { return *reinterpret_cast<const vu*>(p); }
  static SC_INLINE void store(T* p, v x) { *reinterpret_cast<vu*>(p) = x; }
};

template <typename T>
struct CV {
  typedef Vec<T, SC_NATIVE> Native;
  // the 32-byte half unit: one AVX2 vector, half an AVX-512 one, two SSE ones (HK of Half)
  typedef Vec<T, (SC_NATIVE < 32 ? SC_NATIVE : 32)> Half;
  static constexpr int N = Native::N;      // elements per native vector
  static constexpr int W = 64 / sizeof(T);  // elements per 64-byte unit
  static constexpr int U = W / N;           // native vectors per unit
  static constexpr int H = 32 / sizeof(T);  // elements per 32-byte half unit
  static constexpr int HK = H / Half::N;    // Half vectors per half unit
  static constexpr bool HALF = N > H;       // a tile can end in half a native vector (AVX-512)
  // register tile: R native vectors (8 SSE/AVX2 of 16, 4 AVX-512 of 32 registers), S elements
  static constexpr int R = SC_NATIVE == 64 ? 4 : 8;
  static constexpr int S = R * N;
};

// out[i] = sum_k v[k] * base[off[k] + t + i] for i in [0, K native vectors and, if HALF, a 32-byte half
// unit after them): the tile stays in registers over all n entries (one load per FMA, no accumulator
// traffic).
template <typename T, int K, bool HALF>
SC_INLINE void gather_tile(T* __restrict out, const T* base, int64_t t, const int64_t* off, const T* v,
                           int64_t n) {
  typedef typename CV<T>::Native Nv;
  typedef typename CV<T>::Half Hv;
  constexpr int N = Nv::N, HN = Hv::N, HK = HALF ? CV<T>::HK : 0;
  typename Nv::v a[K > 0 ? K : 1];
  typename Hv::v h[HK > 0 ? HK : 1];
  for (int r = 0; r < K; ++r) a[r] = typename Nv::v{};
  for (int u = 0; u < HK; ++u) h[u] = typename Hv::v{};
  for (int64_t k = 0; k < n; ++k) {
    const T* s = base + off[k] + t;
    const T vk = v[k];
    for (int r = 0; r < K; ++r) a[r] += vk * Nv::load(s + r * N);
    for (int u = 0; u < HK; ++u) h[u] += vk * Hv::load(s + K * N + u * HN);
  }
  for (int r = 0; r < K; ++r) Nv::store(out + r * N, a[r]);
  for (int u = 0; u < HK; ++u) Hv::store(out + K * N + u * HN, h[u]);
}

// The shape of a register tile: K native vectors and, if HALF, a 32-byte half unit after them.
template <int K_, bool HALF_>
struct TileShape {
  static constexpr int K = K_;
  static constexpr bool HALF = HALF_;
};

// Calls tile(TileShape<K, HALF>{}) for the last rem positions of a pass (0 < rem < S, a multiple of H):
// rem / N native vectors and, where a native vector is wider than 32 bytes, a half unit, in one tile. One
// sweep over the entries (a sweep per vector rereads every entry's offset and value per vector and gives
// each sweep one FMA chain: the 7x7 forward took 2.07 instead of 1.55 ms so).
template <typename T, int K = 0, typename F>
SC_INLINE void rest_tile(int64_t rem, const F& tile) {
  constexpr int N = CV<T>::N;
  if constexpr (K + 1 < CV<T>::R) {
    if (rem >= (K + 1) * N) return rest_tile<T, K + 1>(rem, tile);
  }
  if constexpr (CV<T>::HALF) {
    if (rem > K * N) return tile(TileShape<K, true>{});
  }
  tile(TileShape<K, false>{});
}

// out[t] = sum_k v[k] * base[off[k] + t] for t in [0, len), len a multiple of H: register tiles of R
// native vectors, then one tile of the rest (the caller sizes its pass so that the source rows it reads
// stay in L1).
template <typename T>
SC_INLINE void gather_t(T* __restrict out, int64_t len, const T* base, const int64_t* off, const T* v, int64_t n) {
  constexpr int R = CV<T>::R, S = CV<T>::S;
  int64_t t = 0;
  for (; t + S <= len; t += S) gather_tile<T, R, false>(out + t, base, t, off, v, n);
  if (t < len)
    rest_tile<T>(len - t, [&](auto shape) {
      gather_tile<T, decltype(shape)::K, decltype(shape)::HALF>(out + t, base, t, off, v, n);
    });
}

// lanes[k*W + i] += sum g[t] * base[off[k] + t] over the tile's positions t (K native vectors and, if
// HALF, a half unit after them), each product into lane t mod W (the half unit's into the first H lanes).
// The grad_y tile is held in registers across the n entries; each entry's W lanes live in memory and
// are reduced by the caller once per batch chunk.
template <typename T, int K, bool HALF>
SC_INLINE void dot_tile(const T* __restrict g, int64_t t, const T* base, const int64_t* off, int64_t n,
                        T* __restrict lanes) {
  typedef typename CV<T>::Native Nv;
  typedef typename CV<T>::Half Hv;
  constexpr int N = Nv::N, U = CV<T>::U, W = CV<T>::W, UK = K < U ? K : U;  // lane vectors the tile reaches
  typename Nv::v gv[K > 0 ? K : 1];
  typename Hv::v gh = typename Hv::v{};
  for (int r = 0; r < K; ++r) gv[r] = Nv::load(g + t + r * N);
  if (HALF) gh = Hv::load(g + t + K * N);
  for (int64_t k = 0; k < n; ++k) {
    const T* s = base + off[k] + t;
    T* l = lanes + k * W;
    typename Nv::v a[UK > 0 ? UK : 1];
    for (int u = 0; u < UK; ++u) a[u] = Nv::load(l + u * N);
    for (int r = 0; r < K; ++r) a[r % U] += gv[r] * Nv::load(s + r * N);
    for (int u = 0; u < UK; ++u) Nv::store(l + u * N, a[u]);
    // the half unit after the store (its load then lies within the stored vector: forwarded, where
    // widening it in registers went through the stack)
    if (HALF) Hv::store(l, Hv::load(l) + gh * Hv::load(s + K * N));
  }
}

// dot_tile over t in [0, len), len a multiple of H: tiles of R native vectors, then one tile of the rest.
template <typename T>
SC_INLINE void dot_t(const T* __restrict g, int64_t len, const T* base, const int64_t* off, int64_t n,
                     T* __restrict lanes) {
  constexpr int R = CV<T>::R, S = CV<T>::S;
  int64_t t = 0;
  for (; t + S <= len; t += S) dot_tile<T, R, false>(g, t, base, off, n, lanes);
  if (t < len)
    rest_tile<T>(len - t, [&](auto shape) {
      dot_tile<T, decltype(shape)::K, decltype(shape)::HALF>(g, t, base, off, n, lanes);
    });
}

#if SC_NATIVE >= 32
#include "transpose8.h"
#endif

// dst[j * ds + i] = src[i * ss + j] for i < rows, j < cols: the channels_last layout copies (a row of
// pixels x channels into one row per channel, and back). float in 8x8 register blocks where a register
// holds 8 floats, the last block of a row or column shifted back to overlap the one before (it rewrites
// some elements with the same values) instead of an element-by-element edge. One thread, AVX-512, 16->16 at
// 28x28 fwd / bwd: element by element 2.18 / 5.82 ms, blocks with element-wise edges 1.85 / 4.98, with
// shifted last blocks 1.70 / 4.66 (contiguous x 1.91 / 3.63). Fewer than 8 rows or columns, and double,
// element by element.
template <typename T>
SC_INLINE void transpose_t(const T* __restrict src, int64_t ss, int64_t rows, int64_t cols, T* __restrict dst,
                           int64_t ds) {
#if SC_NATIVE >= 32
  if constexpr (sizeof(T) == 4) {
    if (rows >= 8 && cols >= 8) {
      for (int64_t i = 0; i < rows; i += 8) {
        const int64_t i0 = i + 8 <= rows ? i : rows - 8;
        for (int64_t j = 0; j < cols; j += 8) {
          const int64_t j0 = j + 8 <= cols ? j : cols - 8;
          f8 r[8];
          for (int k = 0; k < 8; ++k) r[k] = *reinterpret_cast<const f8u*>(src + (i0 + k) * ss + j0);
          transpose8x8(r);
          for (int k = 0; k < 8; ++k) *reinterpret_cast<f8u*>(dst + (j0 + k) * ds + i0) = r[k];
        }
      }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
}

void transpose(const float* src, int64_t ss, int64_t rows, int64_t cols, float* dst, int64_t ds) {
  transpose_t<float>(src, ss, rows, cols, dst, ds);
}
void transpose(const double* src, int64_t ss, int64_t rows, int64_t cols, double* dst, int64_t ds) {
  transpose_t<double>(src, ss, rows, cols, dst, ds);
}

void gather(float* out, int64_t len, const float* base, const int64_t* off, const float* v, int64_t n) {
  gather_t<float>(out, len, base, off, v, n);
}
void gather(double* out, int64_t len, const double* base, const int64_t* off, const double* v, int64_t n) {
  gather_t<double>(out, len, base, off, v, n);
}
void dot(const float* g, int64_t len, const float* base, const int64_t* off, int64_t n, float* lanes) {
  dot_t<float>(g, len, base, off, n, lanes);
}
void dot(const double* g, int64_t len, const double* base, const int64_t* off, int64_t n, double* lanes) {
  dot_t<double>(g, len, base, off, n, lanes);
}

// Inner loops of the direct sparse convolution (csrc/cpu/sparse_conv.cpp), compiled once per instruction
// set: sparse_conv.cpp includes this file three times, each inside its own namespace and under its own
// `#pragma GCC target`, so no wide instruction leaks into code that runs on a CPU without it. No include
// guard on purpose; it includes nothing itself (the includer has <cstdint>).
//
// Both loops run over a tile of a flattened plane whose length is a multiple of the 64-byte vector
// (CV<T>::W elements): the driver lays the operands out so that every stored weight entry reads a plane
// at a constant offset (phase-split padded input, zero-margined grad_y) and pads every plane with zeros
// up to that length, so there is neither border arithmetic nor a scalar tail in here.

#ifndef SC_INLINE
#define SC_INLINE inline __attribute__((always_inline))
#endif

// SC_NATIVE: the includer's native vector width in bytes (16 SSE, 32 AVX2, 64 AVX-512). The kernels use
// vectors of exactly that width: wider GNU vectors are split by the compiler through the stack, which cost
// five times the time. W (CV<T>::W, 64 bytes of elements) stays the unit the driver pads planes to.
#ifndef SC_NATIVE
#define SC_NATIVE 16
#endif

template <typename T>
struct CV {
  typedef T v __attribute__((vector_size(SC_NATIVE)));
  typedef T vu __attribute__((vector_size(SC_NATIVE), aligned(sizeof(T)), may_alias));
  static constexpr int N = SC_NATIVE / sizeof(T);  // elements per native vector
  static constexpr int W = 64 / sizeof(T);         // elements per 64-byte unit
  static constexpr int U = W / N;                  // native vectors per unit
  // register tile: R native vectors (8 SSE/AVX2 of 16, 4 AVX-512 of 32 registers), S elements
  static constexpr int R = SC_NATIVE == 64 ? 4 : 8;
  static constexpr int S = R * N;
};

template <typename T>
SC_INLINE typename CV<T>::v cld(const T* p) {
  return *reinterpret_cast<const typename CV<T>::vu*>(p);
}
template <typename T>
SC_INLINE void cst(T* p, typename CV<T>::v x) {
  *reinterpret_cast<typename CV<T>::vu*>(p) = x;
}

// out[i] = sum_k v[k] * base[off[k] + t + i] for i in [0, K native vectors): the tile stays in registers
// over all n entries (one load per FMA, no accumulator traffic).
template <typename T, int K>
SC_INLINE void gather_tile(T* __restrict out, const T* base, int64_t t, const int64_t* off, const T* v,
                           int64_t n) {
  typedef typename CV<T>::v V;
  constexpr int N = CV<T>::N;
  V a[K];
  for (int r = 0; r < K; ++r) a[r] = V{};
  for (int64_t k = 0; k < n; ++k) {
    const T* s = base + off[k] + t;
    const T vk = v[k];
    for (int r = 0; r < K; ++r) a[r] += vk * cld<T>(s + r * N);
  }
  for (int r = 0; r < K; ++r) cst<T>(out + r * N, a[r]);
}

// out[t] = sum_k v[k] * base[off[k] + t] for t in [0, len), len a multiple of W: register tiles of R
// native vectors, then of one 64-byte unit (the caller sizes its pass so that the source rows it reads
// stay in L1).
template <typename T>
SC_INLINE void gather_t(T* __restrict out, int64_t len, const T* base, const int64_t* off, const T* v, int64_t n) {
  constexpr int R = CV<T>::R, S = CV<T>::S, U = CV<T>::U, W = CV<T>::W;
  int64_t t = 0;
  for (; t + S <= len; t += S) gather_tile<T, R>(out + t, base, t, off, v, n);
  for (; t < len; t += W) gather_tile<T, U>(out + t, base, t, off, v, n);
}

// lanes[k*W + i] += sum_t g[t] * base[off[k] + t] over t = i mod W in [0, len), len a multiple of W. The
// grad_y tile is held in registers across the n entries; each entry's W lanes live in memory and are
// reduced by the caller once per batch chunk.
template <typename T>
SC_INLINE void dot_t(const T* __restrict g, int64_t len, const T* base, const int64_t* off, int64_t n,
                     T* __restrict lanes) {
  typedef typename CV<T>::v V;
  constexpr int N = CV<T>::N, R = CV<T>::R, S = CV<T>::S, U = CV<T>::U, W = CV<T>::W;
  int64_t t = 0;
  for (; t + S <= len; t += S) {
    V gv[R];
    for (int r = 0; r < R; ++r) gv[r] = cld<T>(g + t + r * N);
    for (int64_t k = 0; k < n; ++k) {
      const T* s = base + off[k] + t;
      T* l = lanes + k * W;
      V a[U];
      for (int u = 0; u < U; ++u) a[u] = cld<T>(l + u * N);
      for (int r = 0; r < R; ++r) a[r % U] += gv[r] * cld<T>(s + r * N);
      for (int u = 0; u < U; ++u) cst<T>(l + u * N, a[u]);
    }
  }
  for (; t < len; t += W) {
    for (int64_t k = 0; k < n; ++k) {
      const T* s = base + off[k] + t;
      T* l = lanes + k * W;
      for (int u = 0; u < U; ++u) cst<T>(l + u * N, cld<T>(l + u * N) + cld<T>(g + t + u * N) * cld<T>(s + u * N));
    }
  }
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

// Inner loops of the direct sparse convolution (csrc/cpu/sparse_conv.cpp), compiled once per instruction
// set: sparse_conv.cpp includes this file three times, each inside its own namespace and under its own
// `#pragma GCC target`, so no wide instruction leaks into code that runs on a CPU without it. No include
// guard on purpose; it includes nothing itself (the includer has <cstdint>).
//
// Both loops run over whole flattened planes whose length is a multiple of the 64-byte vector (CV<T>::W
// elements): the driver lays the operands out so that every stored weight entry reads a plane at a
// constant offset (phase-split padded input, zero-margined grad_y) and pads every plane with zeros up to
// that length, so there is neither border arithmetic nor a scalar tail in here. Entries are taken four at
// a time, so the destination plane (axpy) or the shared grad_y plane (dot_lanes) is loaded once per four FMAs.

#ifndef SC_INLINE
#define SC_INLINE inline __attribute__((always_inline))
#endif

template <typename T>
struct CV;
template <>
struct CV<float> {
  typedef float v __attribute__((vector_size(64)));
  typedef float vu __attribute__((vector_size(64), aligned(4), may_alias));
  static constexpr int W = 16;
};
template <>
struct CV<double> {
  typedef double v __attribute__((vector_size(64)));
  typedef double vu __attribute__((vector_size(64), aligned(8), may_alias));
  static constexpr int W = 8;
};

template <typename T>
SC_INLINE typename CV<T>::v cld(const T* p) {
  return *reinterpret_cast<const typename CV<T>::vu*>(p);
}
template <typename T>
SC_INLINE void cst(T* p, typename CV<T>::v x) {
  *reinterpret_cast<typename CV<T>::vu*>(p) = x;
}
// acc[t] += sum_k v[k] * src[k][t] for t in [0, L), L a multiple of CV<T>::W
template <typename T>
SC_INLINE void axpy_multi_t(T* __restrict acc, int64_t L, const T* const* src, const T* v, int64_t n) {
  typedef typename CV<T>::v V;
  constexpr int W = CV<T>::W;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const T* __restrict s0 = src[k];
    const T* __restrict s1 = src[k + 1];
    const T* __restrict s2 = src[k + 2];
    const T* __restrict s3 = src[k + 3];
    const T v0 = v[k], v1 = v[k + 1], v2 = v[k + 2], v3 = v[k + 3];
    for (int64_t t = 0; t < L; t += W) {
      V a = cld(acc + t);
      a += v0 * cld(s0 + t) + v1 * cld(s1 + t);
      a += v2 * cld(s2 + t) + v3 * cld(s3 + t);
      cst(acc + t, a);
    }
  }
  for (; k < n; ++k) {
    const T* __restrict s0 = src[k];
    const T v0 = v[k];
    for (int64_t t = 0; t < L; t += W) cst(acc + t, cld(acc + t) + v0 * cld(s0 + t));
  }
}

// lanes[k*W + i] += sum_b sum_t g[b*gs + t] * src[k][b*ss + t] over t = i mod W in [0, L), for nb batch
// rows; L a multiple of W = CV<T>::W. The per-entry vector lanes live in memory (the caller reduces them
// once per batch chunk), so the caller can walk the batch in its outer loop (one batch row of the input
// stays in cache across all output channels) without paying a horizontal sum per (row, entry).
template <typename T>
SC_INLINE void dot_lanes_t(const T* __restrict g, int64_t gs, int64_t L, const T* const* src, int64_t ss,
                           int64_t nb, int64_t n, T* __restrict lanes) {
  typedef typename CV<T>::v V;
  constexpr int W = CV<T>::W;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    T* l = lanes + k * W;
    V a0 = cld(l), a1 = cld(l + W), a2 = cld(l + 2 * W), a3 = cld(l + 3 * W);
    for (int64_t b = 0; b < nb; ++b) {
      const T* __restrict gb = g + b * gs;
      const T* __restrict s0 = src[k] + b * ss;
      const T* __restrict s1 = src[k + 1] + b * ss;
      const T* __restrict s2 = src[k + 2] + b * ss;
      const T* __restrict s3 = src[k + 3] + b * ss;
      for (int64_t t = 0; t < L; t += W) {
        const V gv = cld(gb + t);
        a0 += gv * cld(s0 + t);
        a1 += gv * cld(s1 + t);
        a2 += gv * cld(s2 + t);
        a3 += gv * cld(s3 + t);
      }
    }
    cst(l, a0);
    cst(l + W, a1);
    cst(l + 2 * W, a2);
    cst(l + 3 * W, a3);
  }
  for (; k < n; ++k) {
    T* l = lanes + k * W;
    V a0 = cld(l);
    for (int64_t b = 0; b < nb; ++b) {
      const T* __restrict gb = g + b * gs;
      const T* __restrict s0 = src[k] + b * ss;
      for (int64_t t = 0; t < L; t += W) a0 += cld(gb + t) * cld(s0 + t);
    }
    cst(l, a0);
  }
}

void axpy_multi(float* acc, int64_t L, const float* const* src, const float* v, int64_t n) {
  axpy_multi_t<float>(acc, L, src, v, n);
}
void axpy_multi(double* acc, int64_t L, const double* const* src, const double* v, int64_t n) {
  axpy_multi_t<double>(acc, L, src, v, n);
}
void dot_lanes(const float* g, int64_t gs, int64_t L, const float* const* src, int64_t ss, int64_t nb, int64_t n,
               float* lanes) {
  dot_lanes_t<float>(g, gs, L, src, ss, nb, n, lanes);
}
void dot_lanes(const double* g, int64_t gs, int64_t L, const double* const* src, int64_t ss, int64_t nb,
               int64_t n, double* lanes) {
  dot_lanes_t<double>(g, gs, L, src, ss, nb, n, lanes);
}

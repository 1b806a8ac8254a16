// Inner loops of the direct sparse convolution (csrc/cpu/sparse_conv.cpp), compiled once per instruction
// set: sparse_conv.cpp includes this file three times, each inside its own namespace and under its own
// `#pragma GCC target`, so no wide instruction leaks into code that runs on a CPU without it. No include
// guard on purpose; it includes nothing itself (the includer has <cstdint>).
//
// Both loops run over whole flattened planes of uniform length: the driver lays the operands out so that
// every stored weight entry reads a plane at a constant offset (phase-split padded input, zero-margined
// grad_y), which leaves no per-entry border arithmetic in here. Entries are taken four at a time so that
// the destination plane is loaded and stored once per four FMAs.

#ifndef SC_INLINE
#define SC_INLINE inline __attribute__((always_inline))
#endif

template <typename T>
SC_INLINE void axpy_multi_t(T* __restrict acc, int64_t L, const T* const* src, const T* v, int64_t n) {
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const T* __restrict s0 = src[k];
    const T* __restrict s1 = src[k + 1];
    const T* __restrict s2 = src[k + 2];
    const T* __restrict s3 = src[k + 3];
    const T v0 = v[k], v1 = v[k + 1], v2 = v[k + 2], v3 = v[k + 3];
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) acc[t] += (v0 * s0[t] + v1 * s1[t]) + (v2 * s2[t] + v3 * s3[t]);
  }
  if (k + 2 <= n) {
    const T* __restrict s0 = src[k];
    const T* __restrict s1 = src[k + 1];
    const T v0 = v[k], v1 = v[k + 1];
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) acc[t] += v0 * s0[t] + v1 * s1[t];
    k += 2;
  }
  if (k < n) {
    const T* __restrict s0 = src[k];
    const T v0 = v[k];
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) acc[t] += v0 * s0[t];
  }
}

template <typename T>
SC_INLINE void dot_multi_t(const T* __restrict g, int64_t L, const T* const* src, int64_t n, T* __restrict out) {
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const T* __restrict s0 = src[k];
    const T* __restrict s1 = src[k + 1];
    const T* __restrict s2 = src[k + 2];
    const T* __restrict s3 = src[k + 3];
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t t = 0; t < L; ++t) {
      const T gv = g[t];
      a0 += gv * s0[t];
      a1 += gv * s1[t];
      a2 += gv * s2[t];
      a3 += gv * s3[t];
    }
    out[k] += a0;
    out[k + 1] += a1;
    out[k + 2] += a2;
    out[k + 3] += a3;
  }
  for (; k < n; ++k) {
    const T* __restrict s0 = src[k];
    T a0 = 0;
#pragma omp simd reduction(+ : a0)
    for (int64_t t = 0; t < L; ++t) a0 += g[t] * s0[t];
    out[k] += a0;
  }
}

// acc[t] += sum_k v[k] * src[k][t] for t in [0, L)
void axpy_multi(float* acc, int64_t L, const float* const* src, const float* v, int64_t n) {
  axpy_multi_t<float>(acc, L, src, v, n);
}
void axpy_multi(double* acc, int64_t L, const double* const* src, const double* v, int64_t n) {
  axpy_multi_t<double>(acc, L, src, v, n);
}
// out[k] += <g, src[k]> over [0, L)
void dot_multi(const float* g, int64_t L, const float* const* src, int64_t n, float* out) {
  dot_multi_t<float>(g, L, src, n, out);
}
void dot_multi(const double* g, int64_t L, const double* const* src, int64_t n, double* out) {
  dot_multi_t<double>(g, L, src, n, out);
}

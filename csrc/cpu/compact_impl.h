// Row kernels of compact_linear (SpMM and SDDMM), compiled once per instruction set.
//
// Included by isa_*.cpp after their `#pragma GCC target`, so every function here gets that ISA; all of
// it has internal linkage (anonymous namespace), so the three copies never meet at link time and no
// wide instruction leaks into code that runs on a CPU without it.
//
// SpMM   Y[o, :] += theta(j) * X[idx(j), :]   over the stored entries j of output row o; the ':' is the
//        batch: a panel row of BC = NV vectors that stays in registers for the whole row.
// dX     P[col(j), :] += theta(j) * DY[row(j), :]   the transposed product from the CSR side (scatter
//        into a thread-private panel).
// SDDMM  g(j) = <DY[row(j), :], X[col(j), :]>  only on the pattern, summed over batch chunks; four
//        entries are reduced at once with one shuffle tree (the driver then applies g_m = g*w, g_w = g*m).
// BC == 1 (batch 1) is a gather-dot along the row instead.
// pack / unpack: the batch transposed into and out of the panels (8x8 register transposes for float).
// Every index is range-checked per row before it is used (one OR-reduction over the row's indices,
// which are in cache for the compute anyway): a corrupt index gives an error, never a wild read.

namespace {

using se_cpu::Dtype;
using se_cpu::SddmmArgs;
using se_cpu::SpmmArgs;

template <typename T>
struct VT;
template <>
struct VT<float> {
  typedef float v __attribute__((vector_size(64)));
  typedef float vu __attribute__((vector_size(64), aligned(4), may_alias));
  static constexpr int W = 16;
};
template <>
struct VT<double> {
  typedef double v __attribute__((vector_size(64)));
  typedef double vu __attribute__((vector_size(64), aligned(8), may_alias));
  static constexpr int W = 8;
};

#define SE_INLINE inline __attribute__((always_inline))

template <typename T>
SE_INLINE typename VT<T>::v ld(const T* p) {
  return *reinterpret_cast<const typename VT<T>::vu*>(p);
}
template <typename T>
SE_INLINE void st(T* p, typename VT<T>::v x) {
  *reinterpret_cast<typename VT<T>::vu*>(p) = x;
}

// One register of this ISA (SE_NATIVE_BYTES, set by the isa_*.cpp that includes this file). The panels
// are laid out in 64-byte vectors for every ISA, but GCC lowers arithmetic on a 64-byte vector type
// poorly where a register is narrower: under AVX2 the CSR SpMM kept its accumulators and pointers on
// the stack (store-forwarding stalls on every entry; measured slower than the SSE2 build). The SpMM
// therefore computes on native registers, NV * 64 / SE_NATIVE_BYTES of them per panel row.
#ifndef SE_NATIVE_BYTES
#define SE_NATIVE_BYTES 64
#endif
template <typename T>
struct NT {
  typedef T v __attribute__((vector_size(SE_NATIVE_BYTES)));
  typedef T vu __attribute__((vector_size(SE_NATIVE_BYTES), aligned(sizeof(T)), may_alias));
  static constexpr int W = SE_NATIVE_BYTES / sizeof(T);
};
template <typename T>
SE_INLINE typename NT<T>::v nld(const T* p) {
  return *reinterpret_cast<const typename NT<T>::vu*>(p);
}
template <typename T>
SE_INLINE void nst(T* p, typename NT<T>::v x) {
  *reinterpret_cast<typename NT<T>::vu*>(p) = x;
}

SE_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Is any of the 16 entries idx[j .. j+16) >= bound? I: int32_t, or uint16_t for the 16-bit column
// indices of the CSR forward (SpmmArgs::idx16). Native-width vector compares written out: GCC turns a
// scalar loop with a constant trip count into a chain of scalar max instructions, and spills 64-byte
// vectors where registers are narrower. The flags are OR-folded to 16 bytes, then to one word.
template <typename I>
SE_INLINE bool group16_out_of_range(const I* __restrict idx, int64_t j, uint32_t bound) {
  typedef std::conditional_t<sizeof(I) == 4, uint32_t, uint16_t> U;
  constexpr int BYTES = 16 * sizeof(U) < SE_NATIVE_BYTES ? 16 * sizeof(U) : SE_NATIVE_BYTES;
  constexpr int L = BYTES / sizeof(U);  // lanes per compare
  typedef U v __attribute__((vector_size(BYTES)));
  typedef U vu __attribute__((vector_size(BYTES), aligned(sizeof(U)), may_alias));
  typedef uint64_t q2 __attribute__((vector_size(16)));
  if (bound == 0) return true;  // every entry is out of range (and bound - 1 would wrap)
  // bound - 1 fits U: the bound of 16-bit columns is at most 65536 (checked by the caller).
  const U limit = static_cast<U>(bound - 1);
  v flags = reinterpret_cast<v>(*reinterpret_cast<const vu*>(idx + j) > limit);
#pragma GCC unroll 4
  for (int c = 1; c < 16 / L; ++c) flags |= reinterpret_cast<v>(*reinterpret_cast<const vu*>(idx + j + c * L) > limit);
  q2 q;
  if constexpr (BYTES == 64) {
    typedef uint64_t q8 __attribute__((vector_size(64)));
    typedef uint64_t q4 __attribute__((vector_size(32)));
    const q8 f = reinterpret_cast<q8>(flags);
    const q4 h = __builtin_shufflevector(f, f, 0, 1, 2, 3) | __builtin_shufflevector(f, f, 4, 5, 6, 7);
    q = __builtin_shufflevector(h, h, 0, 1) | __builtin_shufflevector(h, h, 2, 3);
  } else if constexpr (BYTES == 32) {
    typedef uint64_t q4 __attribute__((vector_size(32)));
    const q4 h = reinterpret_cast<q4>(flags);
    q = __builtin_shufflevector(h, h, 0, 1) | __builtin_shufflevector(h, h, 2, 3);
  } else {
    q = reinterpret_cast<q2>(flags);
  }
  return (q[0] | q[1]) != 0;
}

// Is any entry of idx[j0 .. j1) >= bound? Groups of 16 as above, the rest one by one. GCC's own
// vectorisation of the plain loop leaves a scalar tail of up to 15 int32 (31 uint16) entries per row,
// which cost the 16-bit panel SpMM 5-10 % at batch 16 (Zen 4, 10 % density, K <= 1536).
template <typename I>
SE_INLINE bool out_of_range(const I* __restrict idx, int64_t j0, int64_t j1, int64_t bound) {
  const uint32_t b = static_cast<uint32_t>(bound);
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16)
    if (group16_out_of_range(idx, j, b)) return true;
  uint32_t bad = 0;
  for (; j < j1; ++j) bad |= static_cast<uint32_t>(idx[j]) >= b;
  return bad != 0;
}

// Horizontal sums. hsum4 reduces four vectors at once: the halves of pairs are added first, so the
// tree costs 5 shuffles for 4 results instead of 4 per result.
SE_INLINE float hsum(VT<float>::v p) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(p, p, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(p, p, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
SE_INLINE double hsum(VT<double>::v p) {
  typedef double v4 __attribute__((vector_size(32)));
  typedef double v2 __attribute__((vector_size(16)));
  v4 a = __builtin_shufflevector(p, p, 0, 1, 2, 3) + __builtin_shufflevector(p, p, 4, 5, 6, 7);
  v2 b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}
SE_INLINE void hsum4(VT<float>::v p0, VT<float>::v p1, VT<float>::v p2, VT<float>::v p3, float* s) {
  typedef VT<float>::v V;
  V a = __builtin_shufflevector(p0, p1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
        __builtin_shufflevector(p0, p1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  V b = __builtin_shufflevector(p2, p3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
        __builtin_shufflevector(p2, p3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // a = [p0 8 | p1 8], b = [p2 8 | p3 8] -> c = [p0 4 | p1 4 | p2 4 | p3 4]
  V c = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
        __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  V d = c + __builtin_shufflevector(c, c, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  V e = d + __builtin_shufflevector(d, d, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  s[0] = e[0];
  s[1] = e[4];
  s[2] = e[8];
  s[3] = e[12];
}
SE_INLINE void hsum4(VT<double>::v p0, VT<double>::v p1, VT<double>::v p2, VT<double>::v p3, double* s) {
  typedef VT<double>::v V;
  V a = __builtin_shufflevector(p0, p1, 0, 1, 2, 3, 8, 9, 10, 11) +
        __builtin_shufflevector(p0, p1, 4, 5, 6, 7, 12, 13, 14, 15);
  V b = __builtin_shufflevector(p2, p3, 0, 1, 2, 3, 8, 9, 10, 11) +
        __builtin_shufflevector(p2, p3, 4, 5, 6, 7, 12, 13, 14, 15);
  V c = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13) +
        __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
  V d = c + __builtin_shufflevector(c, c, 1, 0, 3, 2, 5, 4, 7, 6);
  s[0] = d[0];
  s[1] = d[2];
  s[2] = d[4];
  s[3] = d[6];
}

template <typename T, bool HAS_M>
SE_INLINE T theta(const T* __restrict m, const T* __restrict w, int64_t j) {
  if constexpr (HAS_M) return m[j] * w[j];
  return w[j];
}

// ------------------------------------------------------------------------------------------ SpMM

// The two int32 entries of one 64-bit load, as unsigned (checked in range before).
SE_INLINE uint32_t first_of_pair(uint64_t q) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return static_cast<uint32_t>(q >> 32);
#else
  return static_cast<uint32_t>(q);
#endif
}
SE_INLINE uint32_t second_of_pair(uint64_t q) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return static_cast<uint32_t>(q);
#else
  return static_cast<uint32_t>(q >> 32);
#endif
}

// Entry E of the four uint16 entries of one 64-bit load.
template <int E>
SE_INLINE uint32_t quarter(uint64_t q) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return static_cast<uint32_t>((q >> (48 - 16 * E)) & 0xffff);
#else
  return static_cast<uint32_t>((q >> (16 * E)) & 0xffff);
#endif
}

// Four consecutive entries of θ as one small vector (an unaligned load, or m*w).
template <typename T>
struct Q4 {
  typedef T v __attribute__((vector_size(4 * sizeof(T))));
  typedef T vu __attribute__((vector_size(4 * sizeof(T)), aligned(sizeof(T)), may_alias));
};
template <typename T, bool HAS_M>
SE_INLINE typename Q4<T>::v theta4(const T* __restrict m, const T* __restrict w, int64_t j) {
  typedef typename Q4<T>::vu U;
  if constexpr (HAS_M) return *reinterpret_cast<const U*>(m + j) * *reinterpret_cast<const U*>(w + j);
  return *reinterpret_cast<const U*>(w + j);
}

// CSR, batch 1: y[r] = sum_j theta_j x[idx_j]. Four entries at a time: their indices come from one
// 64-bit load split in registers (two int32 or four uint16 entries), their x values are loaded one by one
// straight into the lanes of a 4-vector, and θ is read as one 4-vector, multiplied in and summed in four
// vector accumulators. Per entry that is one load of x and a quarter of a θ and an index load: the loads
// are what bind this loop (on Zen 4 three a cycle), and the scalar form before (one θ load per entry, four
// scalar FMA chains) was 1.1-1.3x slower at 300x784 and 4096² (10 %, every ISA, int32 and uint16 columns;
// stand-alone harness on this header). 8- and 16-wide gathers were slower still (Zen 3 and 4), and so was
// GCC's own vectorisation of the plain loop (it shuffles the indices through vector registers).
// The range check is fused: each group of 16 indices is checked (one vector compare, constant trip
// count) just before its 16 products, and the row's last < 16 entries one by one. A separate checking
// pass over the row, as the panel kernels do, cost 15-20 % here (Zen 4, 300x784 and 4096² at 10 %):
// at batch 1 there is too little arithmetic per index to hide it.
template <typename T, bool HAS_M, typename I>
int csr_spmv(const SpmmArgs& a, const I* __restrict idx, int64_t r0, int64_t r1) {
  static_assert(sizeof(I) == 4 || sizeof(I) == 2, "int32 or uint16 indices");
  typedef typename Q4<T>::v V4;
  const T* __restrict m = static_cast<const T*>(a.m);
  const T* __restrict w = static_cast<const T*>(a.w);
  const T* __restrict X = static_cast<const T*>(a.X);
  T* __restrict Y = static_cast<T*>(a.Y);
  const uint32_t bound = static_cast<uint32_t>(a.nin_blocks);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j1 = a.ptr[r + 1];
    int64_t j = a.ptr[r];
    V4 acc[4] = {};
    for (; j + 16 <= j1; j += 16) {
      if (group16_out_of_range(idx, j, bound)) return 1;  // so the unsigned reads below stay in range
#pragma GCC unroll 4
      for (int u = 0; u < 16; u += 4) {
        uint32_t k0, k1, k2, k3;
        if constexpr (sizeof(I) == 4) {
          uint64_t q0, q1;
          __builtin_memcpy(&q0, idx + j + u, 8);
          __builtin_memcpy(&q1, idx + j + u + 2, 8);
          k0 = first_of_pair(q0), k1 = second_of_pair(q0), k2 = first_of_pair(q1), k3 = second_of_pair(q1);
        } else {
          uint64_t q;
          __builtin_memcpy(&q, idx + j + u, 8);
          k0 = quarter<0>(q), k1 = quarter<1>(q), k2 = quarter<2>(q), k3 = quarter<3>(q);
        }
        const V4 xv = {X[k0], X[k1], X[k2], X[k3]};
        acc[u / 4] += theta4<T, HAS_M>(m, w, j + u) * xv;
      }
    }
    T s = 0;
    for (; j < j1; ++j) {
      const uint32_t k = static_cast<uint32_t>(idx[j]);
      if (k >= bound) return 1;
      s += theta<T, HAS_M>(m, w, j) * X[k];
    }
    const V4 t = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    Y[r] = ((t[0] + t[1]) + (t[2] + t[3])) + s;
  }
  return 0;
}

// CSR, panel of NV 64-byte vectors = NN native registers. Two accumulator sets where they fit in 8
// registers, so that consecutive entries do not serialise on the FMA latency; one set beyond (NN
// independent chains already hide it, and two would spill).
template <typename T, int NV, bool HAS_M, typename I>
int csr_spmm(const SpmmArgs& a, const I* __restrict idx, int64_t c, int64_t r0, int64_t r1) {
  typedef typename NT<T>::v V;
  constexpr int W = NT<T>::W;
  constexpr int NN = NV * VT<T>::W / W;
  constexpr int SETS = 2 * NN <= 8 ? 2 : 1;
  constexpr int64_t BC = NV * VT<T>::W;
  const T* __restrict m = static_cast<const T*>(a.m);
  const T* __restrict w = static_cast<const T*>(a.w);
  const T* __restrict X = static_cast<const T*>(a.X) + c * a.in_dim * BC;
  T* __restrict Y = static_cast<T*>(a.Y) + c * a.out_dim * BC;
  const uint32_t bound = static_cast<uint32_t>(a.nin_blocks);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j0 = a.ptr[r], j1 = a.ptr[r + 1];
    V acc[SETS][NN];
#pragma GCC unroll 16
    for (int v = 0; v < NN; ++v) {
      acc[0][v] = V{};
      acc[SETS - 1][v] = V{};
    }
    // Entries j, j+1 into the two sets (or j alone into set 0).
    auto two = [&](int64_t j) __attribute__((always_inline)) {
      const T t0 = theta<T, HAS_M>(m, w, j), t1 = theta<T, HAS_M>(m, w, j + 1);
      const T* x0 = X + static_cast<int64_t>(idx[j]) * BC;
      const T* x1 = X + static_cast<int64_t>(idx[j + 1]) * BC;
#pragma GCC unroll 16
      for (int v = 0; v < NN; ++v) {
        acc[0][v] += t0 * nld(x0 + v * W);
        acc[SETS - 1][v] += t1 * nld(x1 + v * W);
      }
    };
    auto one = [&](int64_t j) __attribute__((always_inline)) {
      const T t0 = theta<T, HAS_M>(m, w, j);
      const T* x0 = X + static_cast<int64_t>(idx[j]) * BC;
#pragma GCC unroll 16
      for (int v = 0; v < NN; ++v) acc[0][v] += t0 * nld(x0 + v * W);
    };
    // The range check goes group by group right before the group's products, as in csr_spmv: a
    // separate pass over the row first took the misses on the row's indices with nothing to overlap
    // them (~15 % of the 4096² batch-64 product in a profile).
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
      if (group16_out_of_range(idx, j, bound)) return 1;
      if constexpr (SETS == 2) {
#pragma GCC unroll 8
        for (int u = 0; u < 16; u += 2) two(j + u);
      } else {
#pragma GCC unroll 16
        for (int u = 0; u < 16; ++u) one(j + u);
      }
    }
    if (out_of_range(idx, j, j1, a.nin_blocks)) return 1;
    if constexpr (SETS == 2)
      for (; j + 2 <= j1; j += 2) two(j);
    for (; j < j1; ++j) one(j);
#pragma GCC unroll 16
    for (int v = 0; v < NN; ++v) nst(Y + r * BC + v * W, SETS == 2 ? acc[0][v] + acc[1][v] : acc[0][v]);
  }
  return 0;
}

// BSR (and the transposed pass): output block-row r covers element rows r*ob .. r*ob+ob-1.
// Value (j, o, q) sits at j*bn*bk + o*so + q*sq: (so, sq) = (bk, 1) forward, (1, bk) transposed.
// NV == 0 means batch 1 (scalar accumulator).
template <typename T, int NV, bool HAS_M>
int bsr_spmm(const SpmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  constexpr int W = VT<T>::W;
  constexpr int64_t BC = NV == 0 ? 1 : NV * W;
  typedef typename VT<T>::v V;
  const T* __restrict m = static_cast<const T*>(a.m);
  const T* __restrict w = static_cast<const T*>(a.w);
  const T* __restrict X = static_cast<const T*>(a.X) + c * a.in_dim * BC;
  T* __restrict Y = static_cast<T*>(a.Y) + c * a.out_dim * BC;
  const int64_t ob = a.trans ? a.bk : a.bn, ib = a.trans ? a.bn : a.bk;
  const int64_t so = a.trans ? 1 : a.bk, sq = a.trans ? a.bk : 1;
  const int64_t bsize = a.bn * a.bk;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j0 = a.ptr[r], j1 = a.ptr[r + 1];
    if (out_of_range(a.idx, j0, j1, a.nin_blocks)) return 1;
    const int64_t onum = min64(ob, a.out_dim - r * ob);
    for (int64_t o = 0; o < onum; ++o) {
      const int64_t orow = r * ob + o;
      if constexpr (NV == 0) {
        T s = 0;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t in0 = static_cast<int64_t>(a.idx[j]) * ib;
          const int64_t qn = min64(ib, a.in_dim - in0);
          const int64_t base = j * bsize + o * so;
          for (int64_t q = 0; q < qn; ++q) s += theta<T, HAS_M>(m, w, base + q * sq) * X[in0 + q];
        }
        Y[orow] = s;
      } else {
        V acc0[NV], acc1[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = V{};
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t in0 = static_cast<int64_t>(a.idx[j]) * ib;
          const int64_t qn = min64(ib, a.in_dim - in0);
          const int64_t base = j * bsize + o * so;
          const T* xb = X + in0 * BC;
          int64_t q = 0;
          for (; q + 2 <= qn; q += 2) {
            const T t0 = theta<T, HAS_M>(m, w, base + q * sq);
            const T t1 = theta<T, HAS_M>(m, w, base + (q + 1) * sq);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              acc0[v] += t0 * ld(xb + q * BC + v * W);
              acc1[v] += t1 * ld(xb + (q + 1) * BC + v * W);
            }
          }
          if (q < qn) {
            const T t0 = theta<T, HAS_M>(m, w, base + q * sq);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc0[v] += t0 * ld(xb + q * BC + v * W);
          }
        }
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) st(Y + orow * BC + v * W, acc0[v] + acc1[v]);
      }
    }
  }
  return 0;
}

// ------------------------------------------------------------------------------- dX by scatter
//
// dX = dY θ computed from the CSR side: P[col(j), :] += θ_j · DY[row, :] into a panel P private to the
// calling thread (the driver sums the threads' panels). The transposed (CSC) formulation would need θ
// in column order, i.e. a random gather of m and w through perm on every step, which costs more than
// the whole forward; this streams θ in storage order and touches P rows at random (in L2).
template <typename T, int NV, bool HAS_M>
int scatter_rows_k(const SpmmArgs& a, int64_t c, int64_t r0, int64_t r1, T* __restrict P) {
  typedef typename VT<T>::v V;
  constexpr int W = VT<T>::W;
  constexpr int64_t BC = NV == 0 ? 1 : NV * W;
  const T* __restrict m = static_cast<const T*>(a.m);
  const T* __restrict w = static_cast<const T*>(a.w);
  const T* __restrict D = static_cast<const T*>(a.X) + c * a.in_dim * BC;
  const int32_t* __restrict idx = a.idx;
  const bool csr = a.bn == 1 && a.bk == 1;
  const int64_t bn = a.bn, bk = a.bk, bsize = bn * bk;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j0 = a.ptr[r], j1 = a.ptr[r + 1];
    // the CSR panel loop below checks its indices group by group; every other case here, up front
    if (!(csr && NV > 0) && out_of_range(idx, j0, j1, a.nin_blocks)) return 1;
    const int64_t onum = csr ? 1 : min64(bn, a.in_dim - r * bn);
    for (int64_t o = 0; o < onum; ++o) {
      const int64_t drow = r * bn + o;
      if constexpr (NV == 0) {
        const T dy = D[drow];
        if (csr) {
          for (int64_t j = j0; j < j1; ++j) P[idx[j]] += theta<T, HAS_M>(m, w, j) * dy;
        } else {
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t in0 = static_cast<int64_t>(idx[j]) * bk, qn = min64(bk, a.out_dim - in0);
            const int64_t base = j * bsize + o * bk;
            for (int64_t q = 0; q < qn; ++q) P[in0 + q] += theta<T, HAS_M>(m, w, base + q) * dy;
          }
        }
      } else {
        // native registers (see NT): the 64-byte type spilled here as in the SpMM
        typedef typename NT<T>::v NV_t;
        constexpr int NWn = NT<T>::W, NN = NV * W / NWn;
        NV_t d[NN];
#pragma GCC unroll 16
        for (int v = 0; v < NN; ++v) d[v] = nld(D + drow * BC + v * NWn);
        if (csr) {
          auto one = [&](int64_t j) __attribute__((always_inline)) {
            const T t = theta<T, HAS_M>(m, w, j);
            T* p = P + static_cast<int64_t>(idx[j]) * BC;
#pragma GCC unroll 16
            for (int v = 0; v < NN; ++v) nst(p + v * NWn, nld(p + v * NWn) + t * d[v]);
          };
          const uint32_t bound = static_cast<uint32_t>(a.nin_blocks);
          int64_t j = j0;
          for (; j + 16 <= j1; j += 16) {
            if (group16_out_of_range(idx, j, bound)) return 1;
            for (int u = 0; u < 16; ++u) one(j + u);
          }
          if (out_of_range(idx, j, j1, a.nin_blocks)) return 1;
          for (; j < j1; ++j) one(j);
        } else {
          V dd[NV];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) dd[v] = ld(D + drow * BC + v * W);
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t in0 = static_cast<int64_t>(idx[j]) * bk, qn = min64(bk, a.out_dim - in0);
            const int64_t base = j * bsize + o * bk;
            for (int64_t q = 0; q < qn; ++q) {
              const T t = theta<T, HAS_M>(m, w, base + q);
              T* p = P + (in0 + q) * BC;
#pragma GCC unroll 4
              for (int v = 0; v < NV; ++v) st(p + v * W, ld(p + v * W) + t * dd[v]);
            }
          }
        }
      }
    }
  }
  return 0;
}

// ----------------------------------------------------------------------------------------- SDDMM

// Dot products of one DY panel row (NV vectors in registers) with the X panel rows listed by cols.
template <typename T, int NV>
SE_INLINE void dots(const typename VT<T>::v* d, const T* __restrict Xc, const int32_t* __restrict cols,
                    int64_t cnt, int64_t col_base_stride, int64_t col_offset, T* __restrict g,
                    int64_t g_stride) {
  // entry e uses X row cols[e]*col_base_stride + col_offset (or e + col_offset when cols is null) and
  // accumulates into g[e*g_stride].
  typedef typename VT<T>::v V;
  constexpr int W = VT<T>::W;
  constexpr int64_t BC = NV * W;
  auto xrow = [&](int64_t e) -> const T* {
    const int64_t rr = cols ? static_cast<int64_t>(cols[e]) * col_base_stride + col_offset : e + col_offset;
    return Xc + rr * BC;
  };
  int64_t e = 0;
  for (; e + 4 <= cnt; e += 4) {
    const T* x0 = xrow(e);
    const T* x1 = xrow(e + 1);
    const T* x2 = xrow(e + 2);
    const T* x3 = xrow(e + 3);
    V p0 = d[0] * ld(x0), p1 = d[0] * ld(x1), p2 = d[0] * ld(x2), p3 = d[0] * ld(x3);
#pragma GCC unroll 4
    for (int v = 1; v < NV; ++v) {
      p0 += d[v] * ld(x0 + v * W);
      p1 += d[v] * ld(x1 + v * W);
      p2 += d[v] * ld(x2 + v * W);
      p3 += d[v] * ld(x3 + v * W);
    }
    T s[4];
    hsum4(p0, p1, p2, p3, s);
    g[e * g_stride] += s[0];
    g[(e + 1) * g_stride] += s[1];
    g[(e + 2) * g_stride] += s[2];
    g[(e + 3) * g_stride] += s[3];
  }
  for (; e < cnt; ++e) {
    const T* x0 = xrow(e);
    V p0 = d[0] * ld(x0);
#pragma GCC unroll 4
    for (int v = 1; v < NV; ++v) p0 += d[v] * ld(x0 + v * W);
    g[e * g_stride] += hsum(p0);
  }
}

// g[j] (= g_w storage) for the entries of rows r0..r1 from batch chunk c: assigned for c == 0, added
// after. Chunks are separate passes (the driver puts a barrier between them) so that one chunk's X panel
// stays in L2 while every row reads it; the g_m/g_w epilogue runs once, after the last chunk.
template <typename T, int NV>
int csr_sddmm(const SddmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  typedef typename VT<T>::v V;
  constexpr int W = VT<T>::W;
  constexpr int64_t BC = NV == 0 ? 1 : NV * W;
  T* __restrict g = static_cast<T*>(a.g_w);
  const T* __restrict DY = static_cast<const T*>(a.DY);
  const T* __restrict X = static_cast<const T*>(a.X);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j0 = a.crow[r], j1 = a.crow[r + 1];
    if (out_of_range(a.col, j0, j1, a.nbc)) return 1;
    if constexpr (NV == 0) {
      const T dy = DY[r];
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) g[j] = dy * X[a.col[j]];
    } else {
      if (c == 0)
        for (int64_t j = j0; j < j1; ++j) g[j] = 0;
      const T* drow = DY + (c * a.n + r) * BC;
      V d[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) d[v] = ld(drow + v * W);
      dots<T, NV>(d, X + c * a.k * BC, a.col + j0, j1 - j0, 1, 0, g + j0, 1);
    }
  }
  return 0;
}

template <typename T, int NV>
int bsr_sddmm(const SddmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  typedef typename VT<T>::v V;
  constexpr int W = VT<T>::W;
  constexpr int64_t BC = NV == 0 ? 1 : NV * W;
  const int64_t bn = a.bn, bk = a.bk, bsize = bn * bk;
  T* __restrict g = static_cast<T*>(a.g_w);
  const T* __restrict DY = static_cast<const T*>(a.DY);
  const T* __restrict X = static_cast<const T*>(a.X);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j0 = a.crow[r], j1 = a.crow[r + 1];
    if (out_of_range(a.col, j0, j1, a.nbc)) return 1;
    if (c == 0)
      for (int64_t e = j0 * bsize; e < j1 * bsize; ++e) g[e] = 0;  // padding stays 0
    const int64_t onum = min64(bn, a.n - r * bn);
    for (int64_t o = 0; o < onum; ++o) {
      const T* drow = DY + (c * a.n + r * bn + o) * BC;
      if constexpr (NV == 0) {
        const T dy = drow[0];
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t in0 = static_cast<int64_t>(a.col[j]) * bk;
          const int64_t qn = min64(bk, a.k - in0);
          T* gb = g + j * bsize + o * bk;
          for (int64_t q = 0; q < qn; ++q) gb[q] += dy * X[in0 + q];
        }
      } else {
        V d[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) d[v] = ld(drow + v * W);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t in0 = static_cast<int64_t>(a.col[j]) * bk;
          const int64_t qn = min64(bk, a.k - in0);
          dots<T, NV>(d, X + c * a.k * BC, nullptr, qn, 0, in0, g + j * bsize + o * bk, 1);
        }
      }
    }
  }
  return 0;
}

// ------------------------------------------------------------------------------- pack / unpack
//
// The panels are the batch transposed: pack P[c][k][l] = x[c*BC + l][k], unpack y[c*BC + l][n] =
// P[c][n][l] (+ bias[n]). Element by element both are strided on one side (measured 0.46 ns per element
// packed, four times a plain copy: a third of a small layer's forward at batch 128-512). Where a
// register holds 8 floats, 8x8 blocks go through registers instead: 8 row loads, a 24-shuffle
// transpose, 8 row stores. Edges (lanes past B, the last k or n not in a whole block) stay scalar.

#if SE_NATIVE_BYTES >= 32
#include "transpose8.h"
#endif

// x (B, K) rows -> the panel P of chunk c (K rows of BC), columns k0 .. k1, rows past B zero.
template <typename T>
void pack_tile_t(const T* __restrict x, int64_t B, int64_t K, int64_t BC, int64_t c, int64_t k0, int64_t k1,
                 T* __restrict P) {
  T* dst = P + k0 * BC;
  int64_t l = 0;
#if SE_NATIVE_BYTES >= 32
  if constexpr (std::is_same<T, float>::value) {
    for (; l + 8 <= BC && c * BC + l + 8 <= B; l += 8) {
      const float* src = x + (c * BC + l) * K;
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {
        f8 r[8];
        for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const f8u*>(src + i * K + k);
        transpose8x8(r);
        for (int j = 0; j < 8; ++j) *reinterpret_cast<f8u*>(dst + (k - k0 + j) * BC + l) = r[j];
      }
      for (; k < k1; ++k)
        for (int i = 0; i < 8; ++i) dst[(k - k0) * BC + l + i] = src[i * K + k];
    }
  }
#endif
  for (; l < BC; ++l) {
    const int64_t b = c * BC + l;
    if (b < B) {
      const T* src = x + b * K;
      for (int64_t k = k0; k < k1; ++k) dst[(k - k0) * BC + l] = src[k];
    } else {
      for (int64_t k = k0; k < k1; ++k) dst[(k - k0) * BC + l] = T(0);
    }
  }
}

// The panel P of chunk c (N rows of BC), rows n0 .. n1 -> y (B, N) (+ bias).
template <typename T>
void unpack_tile_t(const T* __restrict P, int64_t B, int64_t N, int64_t BC, const T* __restrict bias, int64_t c,
                   int64_t n0, int64_t n1, T* __restrict y) {
  const T* src = P + n0 * BC;
  int64_t l = 0;
#if SE_NATIVE_BYTES >= 32
  if constexpr (std::is_same<T, float>::value) {
    for (; l + 8 <= BC && c * BC + l + 8 <= B; l += 8) {
      float* dst = y + (c * BC + l) * N;
      int64_t n = n0;
      for (; n + 8 <= n1; n += 8) {
        f8 r[8];
        for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const f8u*>(src + (n - n0 + i) * BC + l);
        transpose8x8(r);
        if (bias) {
          const f8 bv = *reinterpret_cast<const f8u*>(bias + n);
          for (int j = 0; j < 8; ++j) r[j] += bv;
        }
        for (int j = 0; j < 8; ++j) *reinterpret_cast<f8u*>(dst + j * N + n) = r[j];
      }
      for (; n < n1; ++n)
        for (int j = 0; j < 8; ++j) dst[j * N + n] = src[(n - n0) * BC + l + j] + (bias ? bias[n] : 0.0f);
    }
  }
#endif
  for (; l < BC; ++l) {
    const int64_t b = c * BC + l;
    if (b >= B) break;
    T* dst = y + b * N;
    if (bias) {
      for (int64_t n = n0; n < n1; ++n) dst[n] = src[(n - n0) * BC + l] + bias[n];
    } else {
      for (int64_t n = n0; n < n1; ++n) dst[n] = src[(n - n0) * BC + l];
    }
  }
}

// ------------------------------------------------------------------------------------- dispatch

template <typename T, int NV, bool HAS_M, typename I>
int csr_rows(const SpmmArgs& a, const I* idx, int64_t c, int64_t r0, int64_t r1) {
  if constexpr (NV == 0) return csr_spmv<T, HAS_M>(a, idx, r0, r1);
  else return csr_spmm<T, NV, HAS_M>(a, idx, c, r0, r1);
}

template <typename T, int NV>
int spmm_nv(const SpmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  const bool csr = a.bn == 1 && a.bk == 1;
  if (a.m) {
    if (csr) return a.idx16 ? csr_rows<T, NV, true>(a, a.idx16, c, r0, r1) : csr_rows<T, NV, true>(a, a.idx, c, r0, r1);
    return bsr_spmm<T, NV, true>(a, c, r0, r1);
  }
  if (csr) return a.idx16 ? csr_rows<T, NV, false>(a, a.idx16, c, r0, r1) : csr_rows<T, NV, false>(a, a.idx, c, r0, r1);
  return bsr_spmm<T, NV, false>(a, c, r0, r1);
}

template <typename T>
int spmm_t(const SpmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  switch (a.bc == 1 ? 0 : a.bc / VT<T>::W) {
    case 0: return spmm_nv<T, 0>(a, c, r0, r1);
    case 1: return spmm_nv<T, 1>(a, c, r0, r1);
    case 2: return spmm_nv<T, 2>(a, c, r0, r1);
    case 4: return spmm_nv<T, 4>(a, c, r0, r1);
    default: return 2;
  }
}

template <typename T, int NV>
int sddmm_nv(const SddmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  return a.bn == 1 && a.bk == 1 ? csr_sddmm<T, NV>(a, c, r0, r1) : bsr_sddmm<T, NV>(a, c, r0, r1);
}

template <typename T>
int sddmm_t(const SddmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  switch (a.bc == 1 ? 0 : a.bc / VT<T>::W) {
    case 0: return sddmm_nv<T, 0>(a, c, r0, r1);
    case 1: return sddmm_nv<T, 1>(a, c, r0, r1);
    case 2: return sddmm_nv<T, 2>(a, c, r0, r1);
    case 4: return sddmm_nv<T, 4>(a, c, r0, r1);
    default: return 2;
  }
}

template <typename T>
int scatter_t(const SpmmArgs& a, int64_t c, int64_t r0, int64_t r1, void* panel) {
  T* P = static_cast<T*>(panel);
  const bool hm = a.m != nullptr;
  switch (a.bc == 1 ? 0 : a.bc / VT<T>::W) {
    case 0: return hm ? scatter_rows_k<T, 0, true>(a, c, r0, r1, P) : scatter_rows_k<T, 0, false>(a, c, r0, r1, P);
    case 1: return hm ? scatter_rows_k<T, 1, true>(a, c, r0, r1, P) : scatter_rows_k<T, 1, false>(a, c, r0, r1, P);
    case 2: return hm ? scatter_rows_k<T, 2, true>(a, c, r0, r1, P) : scatter_rows_k<T, 2, false>(a, c, r0, r1, P);
    case 4: return hm ? scatter_rows_k<T, 4, true>(a, c, r0, r1, P) : scatter_rows_k<T, 4, false>(a, c, r0, r1, P);
    default: return 2;
  }
}

int scatter_rows(Dtype dt, const SpmmArgs& a, int64_t c, int64_t r0, int64_t r1, void* panel) {
  return dt == se_cpu::kFloat32 ? scatter_t<float>(a, c, r0, r1, panel) : scatter_t<double>(a, c, r0, r1, panel);
}

int spmm_rows(Dtype dt, const SpmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  return dt == se_cpu::kFloat32 ? spmm_t<float>(a, c, r0, r1) : spmm_t<double>(a, c, r0, r1);
}

int sddmm_rows(Dtype dt, const SddmmArgs& a, int64_t c, int64_t r0, int64_t r1) {
  return dt == se_cpu::kFloat32 ? sddmm_t<float>(a, c, r0, r1) : sddmm_t<double>(a, c, r0, r1);
}

void pack_tile(Dtype dt, const void* x, int64_t B, int64_t K, int64_t BC, int64_t c, int64_t k0, int64_t k1,
               void* P) {
  if (dt == se_cpu::kFloat32)
    pack_tile_t(static_cast<const float*>(x), B, K, BC, c, k0, k1, static_cast<float*>(P));
  else
    pack_tile_t(static_cast<const double*>(x), B, K, BC, c, k0, k1, static_cast<double*>(P));
}

void unpack_tile(Dtype dt, const void* P, int64_t B, int64_t N, int64_t BC, const void* bias, int64_t c,
                 int64_t n0, int64_t n1, void* y) {
  if (dt == se_cpu::kFloat32)
    unpack_tile_t(static_cast<const float*>(P), B, N, BC, static_cast<const float*>(bias), c, n0, n1,
                  static_cast<float*>(y));
  else
    unpack_tile_t(static_cast<const double*>(P), B, N, BC, static_cast<const double*>(bias), c, n0, n1,
                  static_cast<double*>(y));
}

}  // namespace

// Direct sparse 2-D convolution on CPU: y = conv(x, theta) + b, theta = m*w stored only at the active
// coordinates of a CSR over the (O, C*kh*kw) view of the weight. No im2col: the work is
// nnz * B * Ho * Wq (Wq ~ Wo + kw/stride), with no (B*Ho*Wo, C*kh*kw) patch matrix, whose copy alone
// cost more than the whole dense convolution at the shapes this layout is for.
//
// Layout trick (what makes the inner loops plain, border-free streams):
//   * the input is zero-padded and split into its stride phases once per call:
//       xs[b, c, pr, pc, r, q] = xpad[r*sh + pr, q*sw + pc],  planes of Hq x Wq = ceil(Hp/sh) x ceil(Wp/sw).
//     A weight entry (o, c, i, j) then reads ONE phase plane at the constant offset
//       off = (i / sh) * Wq + j / sw     for every output position t = ho*Wq + wo,
//     so the forward is, per (b, o), acc[t] += theta * xs_plane[t + off] over t in [0, (Ho-1)*Wq + Wo):
//     a stride-1 axpy over the whole flattened plane. Columns wo >= Wo are computed and dropped (Wq - Wo
//     of them per row: the stride-1 loops are worth more than that waste).
//   * dX: grad_y is copied into zero-margined planes gye[b, o, M + t] (M = the largest offset; zero in the
//     dropped columns), so the transposed product gathers per (b, c) over the phase rows that hold x:
//       gxs_plane[t] += theta * gye[M - off + t] — again border-free and race-free (CSC side of the index
//     groups the entries by input channel), then the phases are folded back into g_x.
//   * dtheta (SDDMM): g(e) = sum_b <gye[b, o], xs_plane(b, c) + off>, partial sums per (o, batch chunk)
//     item added in chunk order (independent of the thread count), then the g_m = g*w, g_w = g*m epilogue.
//   * every streamed plane is padded with zeros to whole 64-byte vectors (no scalar tails, which cost a
//     third of the time at 7x7 planes), and the SDDMM keeps its lane sums over a whole batch chunk, in
//     memory, so that it can walk the batch outermost (cache reuse of each image's input rows).
// Any stride and zero padding; dilation 1 and groups 1 only (nn/conv.py keeps the unfold path otherwise).
// One difference from the reference with non-finite inputs: the dropped columns read real input values
// times a zero grad_y, so an inf in x can turn into NaN in dtheta entries the reference keeps finite
// (the forward output and the loss are non-finite then anyway).
#include "sparse_conv.h"

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <memory>
#include <vector>

namespace se_conv_base {
#include "sparse_conv_impl.h"
}  // namespace se_conv_base

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SC_HAVE_X86 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace se_conv_avx2 {
#include "sparse_conv_impl.h"
}  // namespace se_conv_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")
#endif
namespace se_conv_avx512 {
#include "sparse_conv_impl.h"
}  // namespace se_conv_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace se_cpu {

namespace {

template <typename T>
struct ConvKernels {
  void (*axpy)(T*, int64_t, const T* const*, const T*, int64_t);
  void (*dot)(const T*, int64_t, int64_t, const T* const*, int64_t, int64_t, int64_t, T*);
};

// The variant of the compact_linear row kernels in use (set_isa / use_isa steer both).
template <typename T>
ConvKernels<T> kernels() {
  const char* isa = isa_name();
#ifdef SC_HAVE_X86
  if (!std::strcmp(isa, "avx512")) return {&se_conv_avx512::axpy_multi, &se_conv_avx512::dot_lanes};
  if (!std::strcmp(isa, "avx2")) return {&se_conv_avx2::axpy_multi, &se_conv_avx2::dot_lanes};
#endif
  (void)isa;
  return {&se_conv_base::axpy_multi, &se_conv_base::dot_lanes};
}

bool worth_threads(int64_t work) { return work >= (1 << 15) && omp_get_max_threads() > 1; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

// Elements of one 64-byte vector: every streamed plane is padded with zeros to a multiple of it.
template <typename T>
constexpr int64_t vec_elems() {
  return 64 / sizeof(T);
}

struct Plan {
  int64_t P;       // stride phases sh * sw
  int64_t Hq, Wq;  // one phase plane
  int64_t plane;   // Hq * Wq
  int64_t L;       // flattened output positions computed: (Ho - 1) * Wq + Wo
  int64_t M;       // largest entry offset (the zero margin in front of each grad_y plane)
  int64_t Lp;      // L rounded up to whole vectors
  int64_t accs;    // stride of the dX accumulator's phase planes: a plane plus one vector
  int64_t ps;      // stride of the phase planes in xs: every read off + [0, Lp) stays inside its own plane
  int64_t E;       // one grad_y plane with its zero margins
  Plan(const ConvGeom& g, int64_t W) {
    P = g.sh * g.sw;
    Hq = ceil_div(g.H + 2 * g.ph, g.sh);
    Wq = ceil_div(g.W + 2 * g.pw, g.sw);
    plane = Hq * Wq;
    L = (g.Ho - 1) * Wq + g.Wo;
    M = ((g.kh - 1) / g.sh) * Wq + (g.kw - 1) / g.sw;
    Lp = round_up(L, W);
    accs = round_up(plane, W) + W;
    ps = round_up(plane > M + Lp ? plane : M + Lp, W);
    E = M + (Lp > accs ? Lp : accs);
  }
};

// (phase, offset) of column k = c*kh*kw + i*kw + j, as an offset into one batch row of xs.
int64_t entry_offset(const ConvGeom& g, const Plan& p, int64_t k, int64_t* phase_out, int64_t* off_out) {
  const int64_t khw = g.kh * g.kw, c = k / khw, r = k % khw, i = r / g.kw, j = r % g.kw;
  const int64_t phase = (i % g.sh) * g.sw + j % g.sw, off = (i / g.sh) * p.Wq + j / g.sw;
  if (phase_out) *phase_out = phase;
  if (off_out) *off_out = off;
  return (c * p.P + phase) * p.ps + off;
}

// xs (B, C, P, ps) from x (B, C, H, W): padded with zeros, split into stride phases (Hq x Wq each), each
// phase plane followed by zeros up to its stride ps.
template <typename T>
void phase_split(const ConvGeom& g, const Plan& p, const T* __restrict x, T* __restrict xs) {
  const int64_t BC = g.B * g.C;
#pragma omp parallel for schedule(static) if (worth_threads(BC * p.P * p.ps))
  for (int64_t bc = 0; bc < BC; ++bc) {
    const T* src = x + bc * g.H * g.W;
    T* dst = xs + bc * p.P * p.ps;
    for (int64_t pr = 0; pr < g.sh; ++pr) {
      for (int64_t pc = 0; pc < g.sw; ++pc) {
        T* d = dst + (pr * g.sw + pc) * p.ps;
        for (int64_t q = p.plane; q < p.ps; ++q) d[q] = T(0);
        for (int64_t r = 0; r < p.Hq; ++r) {
          const int64_t h = r * g.sh + pr - g.ph;
          T* drow = d + r * p.Wq;
          if (h < 0 || h >= g.H) {
            for (int64_t q = 0; q < p.Wq; ++q) drow[q] = T(0);
            continue;
          }
          const T* srow = src + h * g.W;
          if (g.sw == 1) {
            // the common case: a zero border and one contiguous copy
            const int64_t lo = g.pw < p.Wq ? g.pw : p.Wq;
            const int64_t n = g.W < p.Wq - lo ? g.W : p.Wq - lo;
            for (int64_t q = 0; q < lo; ++q) drow[q] = T(0);
            std::memcpy(drow + lo, srow, n * sizeof(T));
            for (int64_t q = lo + n; q < p.Wq; ++q) drow[q] = T(0);
          } else {
            for (int64_t q = 0; q < p.Wq; ++q) {
              const int64_t w = q * g.sw + pc - g.pw;
              drow[q] = (w >= 0 && w < g.W) ? srow[w] : T(0);
            }
          }
        }
      }
    }
  }
}

template <typename T>
std::vector<T> theta_values(const T* m, const T* w, int64_t nnz) {
  std::vector<T> theta(nnz);
  for (int64_t e = 0; e < nnz; ++e) theta[e] = m ? m[e] * w[e] : w[e];
  return theta;
}

template <typename T>
int forward_t(const ConvGeom& g, const T* x, const T* m, const T* w, const T* bias, const int32_t* crow,
              const int32_t* col, int64_t nnz, T* y) {
  const int64_t B = g.B, O = g.O, out_plane = g.Ho * g.Wo;
  if (B == 0 || O == 0 || out_plane == 0) return 0;
  const Plan p(g, vec_elems<T>());
  const ConvKernels<T> kern = kernels<T>();
  const std::vector<T> theta = theta_values(m, w, nnz);
  std::vector<int64_t> xoff(nnz);
  for (int64_t e = 0; e < nnz; ++e) xoff[e] = entry_offset(g, p, col[e], nullptr, nullptr);
  int64_t max_row = 0;
  for (int64_t o = 0; o < O; ++o) max_row = crow[o + 1] - crow[o] > max_row ? crow[o + 1] - crow[o] : max_row;
  const int64_t xrow = g.C * p.P * p.ps;
  std::unique_ptr<T[]> xs(new T[B * xrow > 0 ? B * xrow : 1]);
  if (nnz > 0) phase_split(g, p, x, xs.get());
  const int64_t items = B * O;
#pragma omp parallel if (worth_threads(nnz * B * p.L + items * out_plane) && items > 1)
  {
    std::vector<T> acc(p.Lp);
    std::vector<const T*> src(max_row > 0 ? max_row : 1);
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / O, o = it % O, e0 = crow[o], n = crow[o + 1] - e0;
      T* dst = y + it * out_plane;
      const T bo = bias ? bias[o] : T(0);
      if (n == 0) {
        for (int64_t t = 0; t < out_plane; ++t) dst[t] = bo;
        continue;
      }
      const T* xb = xs.get() + b * xrow;
      for (int64_t k = 0; k < n; ++k) src[k] = xb + xoff[e0 + k];
      std::memset(acc.data(), 0, p.Lp * sizeof(T));
      kern.axpy(acc.data(), p.Lp, src.data(), theta.data() + e0, n);
      for (int64_t ho = 0; ho < g.Ho; ++ho)
        for (int64_t wo = 0; wo < g.Wo; ++wo) dst[ho * g.Wo + wo] = acc[ho * p.Wq + wo] + bo;
    }
  }
  return 0;
}

template <typename T>
int backward_t(const ConvGeom& g, const T* gy, const T* x, const T* m, const T* w, const int32_t* crow,
               const int32_t* col, const int32_t* ccol, const int32_t* row_t, const int32_t* perm, int64_t nnz,
               T* gx, T* gm, T* gw) {
  const int64_t B = g.B, O = g.O, C = g.C, out_plane = g.Ho * g.Wo, khw = g.kh * g.kw;
  if (B == 0 || nnz == 0 || out_plane == 0) {
    // dtheta is an empty sum, and no entry carries grad_y back into x
    std::memset(gw, 0, nnz * sizeof(T));
    if (gm) std::memset(gm, 0, nnz * sizeof(T));
    if (gx) std::memset(gx, 0, B * C * g.H * g.W * sizeof(T));
    return 0;
  }
  const Plan p(g, vec_elems<T>());
  const ConvKernels<T> kern = kernels<T>();
  const std::vector<T> theta = theta_values(m, w, nnz);
  const int64_t work = nnz * B * p.L;

  // grad_y with zero margins, rows padded to Wq
  std::unique_ptr<T[]> gye(new T[B * O * p.E]);
#pragma omp parallel for schedule(static) if (worth_threads(B * O * p.E))
  for (int64_t bo = 0; bo < B * O; ++bo) {
    T* d = gye.get() + bo * p.E;
    const T* s = gy + bo * out_plane;
    std::memset(d, 0, p.E * sizeof(T));
    for (int64_t ho = 0; ho < g.Ho; ++ho)
      std::memcpy(d + p.M + ho * p.Wq, s + ho * g.Wo, g.Wo * sizeof(T));
  }

  if (gx) {
    // per input channel: the CSC columns c*khw .. (c+1)*khw, processed phase by phase
    int64_t max_col = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = ccol[(c + 1) * khw] - ccol[c * khw];
      max_col = n > max_col ? n : max_col;
    }
    const int64_t items = B * C;
    std::vector<int64_t> wcol(g.W);  // column w of g_x inside its phase row: (pc * accs) + q
    for (int64_t x0 = 0; x0 < g.W; ++x0) wcol[x0] = ((x0 + g.pw) % g.sw) * p.accs + (x0 + g.pw) / g.sw;
    // Per row phase, the phase rows that hold rows of x (the rest is padding, never folded back): the
    // accumulation runs over [t0, t0 + len) only, len rounded up to whole vectors (within accs, and the
    // grad_y reads within E: t0 + len <= plane + W - 1).
    std::vector<int64_t> t0s(g.sh), lens(g.sh);
    for (int64_t pr = 0; pr < g.sh; ++pr) {
      const int64_t lo = g.ph - pr > 0 ? ceil_div(g.ph - pr, g.sh) : 0;
      const int64_t hi = g.ph + g.H - 1 - pr >= 0 ? (g.ph + g.H - 1 - pr) / g.sh : -1;
      t0s[pr] = lo * p.Wq;
      lens[pr] = hi >= lo ? round_up((hi - lo + 1) * p.Wq, vec_elems<T>()) : 0;
    }
#pragma omp parallel if (worth_threads(work) && items > 1)
    {
      std::vector<T> acc(p.P * p.accs);
      std::vector<const T*> src(max_col > 0 ? max_col : 1);
      std::vector<T> val(max_col > 0 ? max_col : 1);
#pragma omp for schedule(dynamic, 4)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t b = it / C, c = it % C;
        T* dst = gx + it * g.H * g.W;
        if (ccol[(c + 1) * khw] == ccol[c * khw]) {
          std::memset(dst, 0, g.H * g.W * sizeof(T));
          continue;
        }
        std::memset(acc.data(), 0, p.P * p.accs * sizeof(T));
        const T* gyb = gye.get() + b * O * p.E + p.M;
        for (int64_t ph = 0; ph < p.P; ++ph) {
          const int64_t t0 = t0s[ph / g.sw], len = lens[ph / g.sw];
          if (len == 0) continue;
          int64_t n = 0;
          for (int64_t k = c * khw; k < (c + 1) * khw; ++k) {
            int64_t phase, off;
            entry_offset(g, p, k, &phase, &off);
            if (phase != ph) continue;
            for (int64_t s = ccol[k]; s < ccol[k + 1]; ++s) {
              src[n] = gyb + row_t[s] * p.E - off + t0;
              val[n] = theta[perm[s]];
              ++n;
            }
          }
          if (n) kern.axpy(acc.data() + ph * p.accs + t0, len, src.data(), val.data(), n);
        }
        // fold the phases back: g_x[h, w] = gx_pad[h + ph, w + pw] (per-column offsets precomputed: no
        // integer division per element)
        for (int64_t h = 0; h < g.H; ++h) {
          const int64_t hp = h + g.ph;
          const T* arow = acc.data() + (hp % g.sh) * g.sw * p.accs + (hp / g.sh) * p.Wq;
          T* drow = dst + h * g.W;
          if (g.sw == 1) {
            std::memcpy(drow, arow + g.pw, g.W * sizeof(T));
          } else {
            for (int64_t x0 = 0; x0 < g.W; ++x0) drow[x0] = arow[wcol[x0]];
          }
        }
      }
    }
  }

  // dtheta on the pattern. Items are batch chunks (a fixed number, chosen from B alone); inside one, the
  // batch is the outer loop and the output channels the inner one, so the input rows of a few images stay
  // in cache while every entry reads them (output channel outside streamed the whole chunk's input once
  // per channel). Each entry keeps vector lanes over the chunk, reduced once into its chunk's partial
  // sums, which are added in chunk order afterwards: the result does not depend on the thread count.
  const int64_t xrow = C * p.P * p.ps;
  std::unique_ptr<T[]> xs(new T[B * xrow]);
  phase_split(g, p, x, xs.get());
  std::vector<int64_t> xoff(nnz);
  for (int64_t e = 0; e < nnz; ++e) xoff[e] = entry_offset(g, p, col[e], nullptr, nullptr);
  int64_t max_row = 0;
  for (int64_t o = 0; o < O; ++o) max_row = crow[o + 1] - crow[o] > max_row ? crow[o + 1] - crow[o] : max_row;
  const int64_t nchunks = B < 8 ? B : 8, chunk = ceil_div(B, nchunks);
  constexpr int64_t W = vec_elems<T>();
  // batch rows per pass over an entry's lanes: enough streamed work (about 512 elements) to hide the
  // lane loads and stores on small planes, few enough that their input rows stay in cache
  const int64_t nb_pass = p.Lp >= 512 ? 1 : (512 / p.Lp < 4 ? 512 / p.Lp : 4);
  std::vector<T> partial(static_cast<size_t>(nchunks) * nnz, T(0));
#pragma omp parallel if (worth_threads(work) && nchunks > 1)
  {
    std::vector<const T*> src(max_row > 0 ? max_row : 1);
    std::vector<T> lanes(nnz * W);
#pragma omp for schedule(dynamic, 1)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t b0 = ch * chunk, b1 = (ch + 1) * chunk < B ? (ch + 1) * chunk : B;
      if (b1 <= b0) continue;
      std::fill(lanes.begin(), lanes.end(), T(0));
      for (int64_t b = b0; b < b1; b += nb_pass) {
        const int64_t nb = b1 - b < nb_pass ? b1 - b : nb_pass;
        const T* xb = xs.get() + b * xrow;
        for (int64_t o = 0; o < O; ++o) {
          const int64_t e0 = crow[o], n = crow[o + 1] - e0;
          if (n == 0) continue;
          for (int64_t k = 0; k < n; ++k) src[k] = xb + xoff[e0 + k];
          kern.dot(gye.get() + (b * O + o) * p.E + p.M, O * p.E, p.Lp, src.data(), xrow, nb, n,
                   lanes.data() + e0 * W);
        }
      }
      T* mine = partial.data() + ch * nnz;
      for (int64_t e = 0; e < nnz; ++e) {
        T s = T(0);
        for (int64_t i = 0; i < W; ++i) s += lanes[e * W + i];
        mine[e] = s;
      }
    }
  }
  const int64_t team = nchunks;
  for (int64_t e = 0; e < nnz; ++e) {
    T s = partial[e];
    for (int t = 1; t < team; ++t) s += partial[static_cast<int64_t>(t) * nnz + e];
    if (gm) {
      gm[e] = s * w[e];
      gw[e] = s * m[e];
    } else {
      gw[e] = s;
    }
  }
  return 0;
}

}  // namespace

int sparse_conv2d_forward(Dtype dt, const ConvGeom& g, const void* x, const void* m, const void* w,
                          const void* bias, const int32_t* crow, const int32_t* col, int64_t nnz, void* y) {
  if (dt == kFloat32)
    return forward_t<float>(g, static_cast<const float*>(x), static_cast<const float*>(m),
                            static_cast<const float*>(w), static_cast<const float*>(bias), crow, col, nnz,
                            static_cast<float*>(y));
  return forward_t<double>(g, static_cast<const double*>(x), static_cast<const double*>(m),
                           static_cast<const double*>(w), static_cast<const double*>(bias), crow, col, nnz,
                           static_cast<double*>(y));
}

int sparse_conv2d_backward(Dtype dt, const ConvGeom& g, const void* gy, const void* x, const void* m,
                           const void* w, const int32_t* crow, const int32_t* col, const int32_t* ccol,
                           const int32_t* row_t, const int32_t* perm, int64_t nnz, void* gx, void* gm, void* gw) {
  if (dt == kFloat32)
    return backward_t<float>(g, static_cast<const float*>(gy), static_cast<const float*>(x),
                             static_cast<const float*>(m), static_cast<const float*>(w), crow, col, ccol, row_t,
                             perm, nnz, static_cast<float*>(gx), static_cast<float*>(gm), static_cast<float*>(gw));
  return backward_t<double>(g, static_cast<const double*>(gy), static_cast<const double*>(x),
                            static_cast<const double*>(m), static_cast<const double*>(w), crow, col, ccol, row_t,
                            perm, nnz, static_cast<double*>(gx), static_cast<double*>(gm), static_cast<double*>(gw));
}

}  // namespace se_cpu

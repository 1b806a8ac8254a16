// Direct sparse 2-D convolution on CPU: y = conv(x, theta) + b, theta = m*w stored only at the active
// coordinates of a CSR over the (O, C*kh*kw) view of the weight. No im2col: the work is
// nnz * B * Ho * Wq (Wq ~ Wo + kw/stride), with no (B*Ho*Wo, C*kh*kw) patch matrix, whose copy alone
// cost more than the whole dense convolution at the shapes this layout is for.
//
// Layout trick (what makes the inner loops plain, border-free streams):
//   * each image's input is zero-padded and split into its stride phases (per thread, right before use):
//       xs[c, pr, pc, r, q] = xpad[r*sh + pr, q*sw + pc],  planes of Hq x Wq = ceil(Hp/sh) x ceil(Wp/sw)
//     (at stride 1 along the width, Wq = W + pw: the border between two rows is shared, see Plan).
//     A weight entry (o, c, i, j) then reads ONE phase plane at the constant offset
//       off = (i / sh) * Wq + j / sw     for every output position t = ho*Wq + wo,
//     so the forward is, per (b, o), y[t] = sum_e theta_e * xs_plane_e[t + off_e] over t in
//     [0, (Ho-1)*Wq + Wo): stride-1 loads over the flattened plane. Columns wo >= Wo are computed and
//     dropped (Wq - Wo of them per row: the stride-1 loops are worth more than that waste).
//   * dX: each image's grad_y is copied into zero-margined planes gye[o, M + t] (M = the largest offset;
//     zero in the dropped columns), so the transposed product gathers per (c, phase) over the phase rows
//     that hold x: gxs_plane[t] = sum theta * gye[M - off + t] — again border-free and race-free (the
//     CSC side of the index groups the entries by input channel), then the phases are folded back.
//   * dtheta (SDDMM): g(e) = sum_b <gye[b, o], xs_plane(b, c) + off>, vector lanes per entry over a batch
//     chunk, chunks added in order (independent of the thread count), then the g_m = g*w, g_w = g*m
//     epilogue.
// Speed (the loops are bound by loads, one per FMA at best): the microkernels keep a register tile of
// output positions (forward, dX) or of grad_y (dtheta) across all entries of a row, in vectors of the
// CPU's native width, and every pass is cut into tiles of positions whose source rows, for all source
// planes, fit in L1 (l1_tile). Every plane is padded with zeros to whole 32-byte units (no scalar tails).
// Any stride and zero padding; dilation 1 and groups 1 only (nn/conv.py keeps the unfold path otherwise).
// One difference from the reference with non-finite inputs: the dropped columns read real input values
// times a zero grad_y, so an inf in x can turn into NaN in dtheta entries the reference keeps finite
// (the forward output and the loss are non-finite then anyway).
#include "sparse_conv.h"

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#define SC_NATIVE 16
namespace se_conv_base {
#include "sparse_conv_impl.h"
}  // namespace se_conv_base
#undef SC_NATIVE

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SC_HAVE_X86 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define SC_NATIVE 32
namespace se_conv_avx2 {
#include "sparse_conv_impl.h"
}  // namespace se_conv_avx2
#undef SC_NATIVE
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")
#endif
#define SC_NATIVE 64
namespace se_conv_avx512 {
#include "sparse_conv_impl.h"
}  // namespace se_conv_avx512
#undef SC_NATIVE
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
  void (*gather)(T*, int64_t, const T*, const int64_t*, const T*, int64_t);
  void (*dot)(const T*, int64_t, const T*, const int64_t*, int64_t, T*);
  void (*transpose)(const T*, int64_t, int64_t, int64_t, T*, int64_t);  // the channels_last copies
};

// The variant of the compact_linear row kernels in use (set_isa / use_isa steer both).
template <typename T>
ConvKernels<T> kernels() {
  const char* isa = isa_name();
#ifdef SC_HAVE_X86
  if (!std::strcmp(isa, "avx512"))
    return {&se_conv_avx512::gather, &se_conv_avx512::dot, &se_conv_avx512::transpose};
  if (!std::strcmp(isa, "avx2")) return {&se_conv_avx2::gather, &se_conv_avx2::dot, &se_conv_avx2::transpose};
#endif
  (void)isa;
  return {&se_conv_base::gather, &se_conv_base::dot, &se_conv_base::transpose};
}

bool worth_threads(int64_t work) { return work >= (1 << 15) && omp_get_max_threads() > 1; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A dynamic schedule in which each thread knows its next item: it claims the next one before it works on
// the current one, and prefetches for the item it will really do. Under omp's schedule(dynamic) the item
// after the current one usually goes to the other thread, so the prefetch of "image b + 1" pulled that
// thread's rows into the wrong core (for the output rows, in exclusive state).
struct Claims {
  std::atomic<int64_t> next{0};
  int64_t take() { return next.fetch_add(1, std::memory_order_relaxed); }
};

int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

// Elements of one 64-byte vector (the width of an entry's dtheta lanes).
template <typename T>
constexpr int64_t vec_elems() {
  return 64 / sizeof(T);
}

// Elements of 32 bytes: every streamed plane is padded with zeros to a multiple of it (the kernels' last
// tile may be a half vector).
template <typename T>
constexpr int64_t unit_elems() {
  return 32 / sizeof(T);
}

// Tile length (a multiple of four vectors, at most Lp) of the flattened output positions per pass: the
// source rows that one tile reads in all `planes` source planes (tile + margin elements each) fit in
// about 24 KiB, so the register-tiled loops load them from L1 for every entry after the first.
template <typename T>
int64_t l1_tile(int64_t planes, int64_t margin, int64_t Lp) {
  constexpr int64_t W4 = 4 * vec_elems<T>(), budget = 24 * 1024 / sizeof(T);
  int64_t tl = (budget / (planes > 0 ? planes : 1) - margin) / W4 * W4;
  tl = tl < W4 ? W4 : tl;
  return tl < Lp ? tl : Lp;
}

struct Plan {
  int64_t P;       // stride phases sh * sw
  int64_t Hq, Wq;  // one phase plane
  int64_t plane;   // Hq * Wq
  int64_t L;       // flattened output positions computed: (Ho - 1) * Wq + Wo
  int64_t M;       // largest entry offset (the zero margin in front of each grad_y plane)
  int64_t Lp;      // L rounded up to whole units
  int64_t accs;    // stride of the dX accumulator's phase planes: a plane plus one unit
  int64_t ps;      // stride of the phase planes in xs: every read off + [0, Lp) stays inside its own plane
  int64_t E;       // one grad_y plane with its zero margins
  Plan(const ConvGeom& g, int64_t W) {
    P = g.sh * g.sw;
    Hq = ceil_div(g.H + 2 * g.ph, g.sh);
    // Stride 1: the pw zero columns right of one row are the left border of the next, so a row takes
    // W + pw, not W + 2pw (reads past a row's end land in the next row's border; at least Wo, the
    // positions of one output row). 7x7 with padding 1: 55 positions instead of 61.
    const int64_t wide = g.W + g.pw > g.Wo ? g.W + g.pw : g.Wo;
    Wq = g.sw == 1 ? wide : ceil_div(g.W + 2 * g.pw, g.sw);
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

// Every entry's offset into one batch row of xs, through a table over the C*kh*kw columns (the three
// integer divisions per entry of entry_offset cost 2 % of a 64->64 step at 7x7).
std::vector<int64_t> entry_offsets(const ConvGeom& g, const Plan& p, const int32_t* col, int64_t nnz) {
  std::vector<int64_t> column(g.C * g.kh * g.kw), off(nnz);
  for (int64_t k = 0; k < static_cast<int64_t>(column.size()); ++k) column[k] = entry_offset(g, p, k, nullptr, nullptr);
  for (int64_t e = 0; e < nnz; ++e) off[e] = column[col[e]];
  return off;
}

// Software prefetch of the next image's operands into L2 while the current image computes, a few lines
// per step of its loop: the layout copies read and write every image's rows in memory for the first time
// and otherwise wait for them (`perf`: memmove 22 % of a 16->16 step at 28x28, x and grad_y being 6.4 MB
// each at batch 128).
struct Prefetch {
  const char* p = nullptr;
  int64_t left = 0, per_step = 0;
  bool write = false;
  void start(const void* base, int64_t bytes, int64_t steps, bool for_write) {
    p = static_cast<const char*>(base);
    left = bytes;
    per_step = ceil_div(ceil_div(bytes, 64), steps > 0 ? steps : 1) * 64;
    write = for_write;
  }
  void step() {
    const int64_t n = per_step < left ? per_step : left;
    if (write)
      for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 1, 2);
    else
      for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, 2);
    p += n;
    left -= n;
  }
};

// One image's xs (C, P, ps) from its x (C, H, W): padded with zeros, split into stride phases (Hq x Wq
// each), each phase plane followed by zeros up to its stride ps. Done per image into a per-thread buffer
// right before use (it stays in cache; a whole-batch copy cost a round trip through memory). Only the
// positions that hold x are written: where the zeros go depends on the geometry alone, so xs must start
// zeroed (a fresh std::vector) and keeps its zeros from one image to the next (rewriting them per image
// cost a memset per border and per row).
// Phases with pr >= kh or pc >= kw (a 1x1 kernel with stride 2 reads one of four) hold no entry's
// reads and are left unwritten. An NHWC image is transposed on the way, one phase row of pixels x
// channels at a time (kern.transpose).
template <typename T>
void split_image(const ConvGeom& g, const Plan& p, const ConvKernels<T>& kern, const T* __restrict x,
                 T* __restrict xs) {
  const int64_t nr = g.sh < g.kh ? g.sh : g.kh, nc = g.sw < g.kw ? g.sw : g.kw;
  const int64_t cstride = g.nhwc ? 1 : g.H * g.W, wstride = g.nhwc ? g.C : 1;  // of x's (c, w)
  for (int64_t pr = 0; pr < nr; ++pr) {
    for (int64_t pc = 0; pc < nc; ++pc) {
      // the columns q whose source w = q*sw + pc - pw lies in [0, W)
      const int64_t s0 = pc - g.pw;
      int64_t lo = s0 < 0 ? ceil_div(-s0, g.sw) : 0, hi = ceil_div(g.W - s0, g.sw);
      hi = hi < p.Wq ? (hi > 0 ? hi : 0) : p.Wq;
      if (lo >= hi) continue;
      for (int64_t r = 0; r < p.Hq; ++r) {
        const int64_t h = r * g.sh + pr - g.ph;
        if (h < 0 || h >= g.H) continue;
        // channel c's pixel q of this phase row at src + c * cstride + q * sw * wstride
        const T* src = x + (h * g.W + s0 + lo * g.sw) * wstride;
        T* drow = xs + (pr * g.sw + pc) * p.ps + r * p.Wq + lo;  // channel c's at drow + c * P * ps
        if (g.nhwc) {
          kern.transpose(src, g.sw * g.C, hi - lo, g.C, drow, p.P * p.ps);
          continue;
        }
        for (int64_t c = 0; c < g.C; ++c, src += cstride, drow += p.P * p.ps) {
          if (g.sw == 1)
            std::memcpy(drow, src, (hi - lo) * sizeof(T));
          else  // branch-free strided copy (a bounds test per element cost three times the forward gather)
            for (int64_t q = 0; q < hi - lo; ++q) drow[q] = src[q * g.sw];
        }
      }
    }
  }
}

// One image's grad_y (O, Ho, Wo) into zero-margined planes gye (O, E): row ho at M + ho * Wq. As in
// split_image, only the rows are written: gye must start zeroed and keeps its margins, dropped columns
// and tail at zero.
template <typename T>
void margin_image(const ConvGeom& g, const Plan& p, const ConvKernels<T>& kern, const T* __restrict gy,
                  T* __restrict gye) {
  if (g.nhwc) {  // transposed one row (Wo pixels x O channels) at a time
    for (int64_t ho = 0; ho < g.Ho; ++ho)
      kern.transpose(gy + ho * g.Wo * g.O, g.O, g.Wo, g.O, gye + p.M + ho * p.Wq, p.E);
    return;
  }
  for (int64_t o = 0; o < g.O; ++o) {
    T* d = gye + o * p.E + p.M;
    const T* s = gy + o * g.Ho * g.Wo;
    for (int64_t ho = 0; ho < g.Ho; ++ho) std::memcpy(d + ho * p.Wq, s + ho * g.Wo, g.Wo * sizeof(T));
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
  const Plan p(g, unit_elems<T>());
  const ConvKernels<T> kern = kernels<T>();
  const std::vector<T> theta = theta_values(m, w, nnz);
  const std::vector<int64_t> xoff = entry_offsets(g, p, col, nnz);
  const int64_t xrow = g.C * p.P * p.ps;
  // Items: images (times output-channel blocks when the batch is too small to feed the threads). Per
  // image, tile by tile over the output positions, every output channel gathers its entries from the
  // tile's input rows, which stay in L1 across the channels.
  const int64_t TL = l1_tile<T>(g.C * p.P, p.M, p.Lp);
  const int64_t nob = B >= 8 ? 1 : (O < 8 ? O : 8), oblock = ceil_div(O, nob), items = B * nob;
  Claims claims;
#pragma omp parallel if (worth_threads(nnz * B * p.L + B * O * out_plane) && items > 1)
  {
    std::vector<T> acc(oblock * p.Lp), xs(xrow);
    Prefetch next_x, next_y;
    for (int64_t it = claims.take(), after; it < items; it = after) {
      after = claims.take();
      const int64_t b = it / nob, o0 = (it % nob) * oblock, o1 = o0 + oblock < O ? o0 + oblock : O;
      if (nnz > 0) split_image(g, p, kern, x + b * g.C * g.H * g.W, xs.data());
      if (nob == 1 && after < items) {
        const int64_t steps = ceil_div(p.Lp, TL) * O;
        next_x.start(x + after * g.C * g.H * g.W, g.C * g.H * g.W * sizeof(T), steps, false);
        next_y.start(y + after * O * out_plane, O * out_plane * sizeof(T), steps, true);
      }
      const T* xb = xs.data();
      for (int64_t t0 = 0; t0 < p.Lp; t0 += TL) {
        const int64_t len = p.Lp - t0 < TL ? p.Lp - t0 : TL;
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t e0 = crow[o], n = crow[o + 1] - e0;
          if (n) kern.gather(acc.data() + (o - o0) * p.Lp + t0, len, xb + t0, xoff.data() + e0, theta.data() + e0, n);
          next_x.step();
          next_y.step();
        }
      }
      if (g.nhwc) {
        // a channel without entries has a zero row in acc (the gather's n == 0 skipped it)
        for (int64_t o = o0; o < o1; ++o)
          if (crow[o + 1] == crow[o]) std::fill_n(acc.data() + (o - o0) * p.Lp, p.Lp, T(0));
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          T* dst = y + (b * g.Ho + ho) * g.Wo * O + o0;
          kern.transpose(acc.data() + ho * p.Wq, p.Lp, o1 - o0, g.Wo, dst, O);
          if (bias)
            for (int64_t wo = 0; wo < g.Wo; ++wo)
              for (int64_t o = o0; o < o1; ++o) dst[wo * O + o - o0] += bias[o];
        }
        continue;
      }
      for (int64_t o = o0; o < o1; ++o) {
        T* dst = y + (b * O + o) * out_plane;
        const T bo = bias ? bias[o] : T(0);
        if (crow[o + 1] == crow[o]) {
          for (int64_t t = 0; t < out_plane; ++t) dst[t] = bo;
          continue;
        }
        const T* a = acc.data() + (o - o0) * p.Lp;
        for (int64_t ho = 0; ho < g.Ho; ++ho)
          for (int64_t wo = 0; wo < g.Wo; ++wo) dst[ho * g.Wo + wo] = a[ho * p.Wq + wo] + bo;
      }
    }
  }
  return 0;
}

// What the transposed convolution (g_x) needs, computed once per call: per (input channel, phase) the
// list of entries of the channel's CSC columns that fall in that phase, as grad_y offsets (output channel
// row, minus the entry's offset) and θ values.
template <typename T>
struct XPlan {
  std::vector<int64_t> first, goff, wcol, t0s, lens;
  std::vector<T> gval;
  int64_t TL = 0, ntiles = 0;
  XPlan(const ConvGeom& g, const Plan& p, const T* theta, const int32_t* ccol, const int32_t* row_t,
        const int32_t* perm)
      : first(g.C * p.P + 1, 0), wcol(g.W), t0s(g.sh), lens(g.sh) {
    const int64_t khw = g.kh * g.kw;
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t ph = 0; ph < p.P; ++ph) {
        for (int64_t k = c * khw; k < (c + 1) * khw; ++k) {
          int64_t phase, off;
          entry_offset(g, p, k, &phase, &off);
          if (phase != ph) continue;
          for (int64_t s = ccol[k]; s < ccol[k + 1]; ++s) {
            goff.push_back(row_t[s] * p.E - off);
            gval.push_back(theta[perm[s]]);
          }
        }
        first[c * p.P + ph + 1] = static_cast<int64_t>(goff.size());
      }
    }
    // column w of g_x inside its phase row: (pc * accs) + q (no integer division per element)
    for (int64_t x0 = 0; x0 < g.W; ++x0) wcol[x0] = ((x0 + g.pw) % g.sw) * p.accs + (x0 + g.pw) / g.sw;
    // Per row phase, the phase rows that hold rows of x (the rest is padding, never folded back): the
    // accumulation runs over [t0, t0 + len) only, len rounded up to whole units (within accs, and the
    // grad_y reads within E: t0 + len <= plane + unit - 1).
    int64_t max_len = 0;
    for (int64_t pr = 0; pr < g.sh; ++pr) {
      const int64_t lo = g.ph - pr > 0 ? ceil_div(g.ph - pr, g.sh) : 0;
      const int64_t hi = g.ph + g.H - 1 - pr >= 0 ? (g.ph + g.H - 1 - pr) / g.sh : -1;
      t0s[pr] = lo * p.Wq;
      lens[pr] = hi >= lo ? round_up((hi - lo + 1) * p.Wq, unit_elems<T>()) : 0;
      max_len = lens[pr] > max_len ? lens[pr] : max_len;
    }
    TL = l1_tile<T>(g.O, p.M, max_len > 0 ? max_len : 1);
    ntiles = ceil_div(max_len, TL);
  }
};

// g_x of one image (C, H, W) by the transposed convolution: per input channel and stride phase, its
// entries gather the image's margined grad_y (gyb, O planes of E) into the phase-split accumulator acc
// (C * P planes of accs), tile by tile so that the tile's grad_y rows of all output channels stay in L1;
// then the phases are folded back into g_x.
template <typename T>
void image_x(const ConvGeom& g, const Plan& p, const XPlan<T>& xp, const ConvKernels<T>& kern, const T* gyb,
             T* acc, T* gx) {
  const int64_t CP = g.C * p.P;
  gyb += p.M;
  for (int64_t j = 0; j < xp.ntiles; ++j) {
    for (int64_t cp = 0; cp < CP; ++cp) {
      const int64_t pr = (cp % p.P) / g.sw, t0 = xp.t0s[pr] + j * xp.TL, rest = xp.lens[pr] - j * xp.TL;
      if (rest <= 0) continue;
      const int64_t len = rest < xp.TL ? rest : xp.TL, e0 = xp.first[cp], n = xp.first[cp + 1] - e0;
      T* a = acc + cp * p.accs + t0;
      if (n)
        kern.gather(a, len, gyb + t0, xp.goff.data() + e0, xp.gval.data() + e0, n);
      else
        std::memset(a, 0, len * sizeof(T));
    }
  }
  if (g.nhwc) {
    // Fold and transpose: g_x is written pixel by pixel, its C channels in a row, and read across the
    // channels' accumulator planes (in cache). A channel without entries reads zeros: the loop above
    // cleared its tiles, which cover every position the fold reads.
    const int64_t cs = p.P * p.accs;
    for (int64_t h = 0; h < g.H; ++h) {
      const int64_t hp = h + g.ph;
      const T* arow = acc + (hp % g.sh) * g.sw * p.accs + (hp / g.sh) * p.Wq;
      T* d = gx + h * g.W * g.C;
      if (g.sw == 1) {
        kern.transpose(arow + g.pw, cs, g.C, g.W, d, g.C);
        continue;
      }
      for (int64_t x0 = 0; x0 < g.W; ++x0, d += g.C) {
        const T* a = arow + xp.wcol[x0];
        for (int64_t c = 0; c < g.C; ++c) d[c] = a[c * cs];
      }
    }
    return;
  }
  for (int64_t c = 0; c < g.C; ++c) {
    T* dst = gx + c * g.H * g.W;
    if (xp.first[(c + 1) * p.P] == xp.first[c * p.P]) {
      std::memset(dst, 0, g.H * g.W * sizeof(T));
      continue;
    }
    // fold the phases back: g_x[h, w] = gx_pad[h + ph, w + pw]
    const T* ac = acc + c * p.P * p.accs;
    for (int64_t h = 0; h < g.H; ++h) {
      const int64_t hp = h + g.ph;
      const T* arow = ac + (hp % g.sh) * g.sw * p.accs + (hp / g.sh) * p.Wq;
      T* drow = dst + h * g.W;
      if (g.sw == 1) {
        std::memcpy(drow, arow + g.pw, g.W * sizeof(T));
      } else {
        for (int64_t x0 = 0; x0 < g.W; ++x0) drow[x0] = arow[xp.wcol[x0]];
      }
    }
  }
}

// Backward, one pass over the batch. Items are batch chunks (a fixed number, chosen from B alone); per
// image, the thread lays out its grad_y (margined) and x (phase split) in its own buffers, which stay in
// cache for both products: g_x (transposed convolution, image_x) and dtheta on the pattern, where per
// tile of output positions every output channel's entries read the tile's input rows (in L1) against the
// channel's grad_y tile (in registers). Each entry keeps W vector lanes over the chunk, reduced once into
// the chunk's partial sums, which are added in chunk order afterwards: the result does not depend on the
// thread count.
template <typename T>
int backward_t(const ConvGeom& g, const T* gy, const T* x, const T* m, const T* w, const int32_t* crow,
               const int32_t* col, const int32_t* ccol, const int32_t* row_t, const int32_t* perm, int64_t nnz,
               T* gx, T* gm, T* gw) {
  const int64_t B = g.B, O = g.O, C = g.C, out_plane = g.Ho * g.Wo;
  if (B == 0 || nnz == 0 || out_plane == 0) {
    // dtheta is an empty sum, and no entry carries grad_y back into x
    std::memset(gw, 0, nnz * sizeof(T));
    if (gm) std::memset(gm, 0, nnz * sizeof(T));
    if (gx) std::memset(gx, 0, B * C * g.H * g.W * sizeof(T));
    return 0;
  }
  const Plan p(g, unit_elems<T>());
  const ConvKernels<T> kern = kernels<T>();
  const std::vector<T> theta = theta_values(m, w, nnz);
  const int64_t work = nnz * B * p.L;
  const XPlan<T> xp(g, p, theta.data(), ccol, row_t, perm);  // O(nnz); unused without g_x
  const int64_t xrow = C * p.P * p.ps;
  const std::vector<int64_t> xoff = entry_offsets(g, p, col, nnz);
  // eight chunks: each one fills and reduces nnz * W lanes (236 KB at 64->64), and eight still give two
  // threads' dynamic schedule room to balance
  const int64_t nchunks = B < 8 ? B : 8, chunk = ceil_div(B, nchunks);
  constexpr int64_t W = vec_elems<T>();
  const int64_t TL = l1_tile<T>(C * p.P, p.M, p.Lp);
  std::vector<T> partial(static_cast<size_t>(nchunks) * nnz, T(0));
  Claims claims;
#pragma omp parallel if (worth_threads(work) && nchunks > 1)
  {
    std::vector<T> lanes(nnz * W), xs(xrow), gye(O * p.E), acc(gx ? C * p.P * p.accs : 0);
    Prefetch next_x, next_gy, next_gx;
    for (int64_t ch = claims.take(), after; ch < nchunks; ch = after) {
      after = claims.take();
      const int64_t b0 = ch * chunk, b1 = (ch + 1) * chunk < B ? (ch + 1) * chunk : B;
      if (b1 <= b0) continue;
      std::fill(lanes.begin(), lanes.end(), T(0));
      for (int64_t b = b0; b < b1; ++b) {
        margin_image(g, p, kern, gy + b * O * out_plane, gye.data());
        if (gx) image_x(g, p, xp, kern, gye.data(), acc.data(), gx + b * C * g.H * g.W);
        split_image(g, p, kern, x + b * C * g.H * g.W, xs.data());
        // the next image of this chunk, or the first of the next chunk this thread claimed
        const int64_t bn = b + 1 < b1 ? b + 1 : (after < nchunks ? after * chunk : B);
        if (bn < B) {
          const int64_t steps = ceil_div(p.Lp, TL) * O, xbytes = C * g.H * g.W * sizeof(T);
          next_x.start(x + bn * C * g.H * g.W, xbytes, steps, false);
          next_gy.start(gy + bn * O * out_plane, O * out_plane * sizeof(T), steps, false);
          next_gx.start(gx ? gx + bn * C * g.H * g.W : nullptr, gx ? xbytes : 0, steps, true);
        }
        const T* gb = gye.data() + p.M;
        for (int64_t t0 = 0; t0 < p.Lp; t0 += TL) {
          const int64_t len = p.Lp - t0 < TL ? p.Lp - t0 : TL;
          for (int64_t o = 0; o < O; ++o) {
            const int64_t e0 = crow[o], n = crow[o + 1] - e0;
            if (n) kern.dot(gb + o * p.E + t0, len, xs.data() + t0, xoff.data() + e0, n, lanes.data() + e0 * W);
            next_x.step();
            next_gy.step();
            next_gx.step();
          }
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
  for (int64_t e = 0; e < nnz; ++e) {
    T s = partial[e];
    for (int64_t t = 1; t < nchunks; ++t) s += partial[t * nnz + e];
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

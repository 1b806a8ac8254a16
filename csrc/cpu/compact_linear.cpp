// compact_linear on CPU: y = x theta^T + b, theta = m*w stored only at the active coordinates.
//
//   forward   SpMM over the rows of the CSR/BSR pattern                    work ∝ nnz * B
//   dX        the transposed SpMM computed from the CSR rows: scatter into thread-private panels
//             (the CSC form would gather m and w through perm at random on every step)
//   dtheta    SDDMM on the pattern only, with the g_m = g*w, g_w = g*m epilogue
//
// This file holds the portable part: instruction-set dispatch, batch-contiguous panels (pack/unpack
// are O(B*(N+K)), small next to O(nnz*B) at the densities this layout is for) and the OpenMP loops.
// The row kernels live in compact_impl.h, compiled once per ISA (isa_*.cpp).
#include <omp.h>

#include <unistd.h>

#include <atomic>
#include <cstring>

#include "kernels.h"

namespace se_cpu {

// ----------------------------------------------------------------------------------------- dispatch

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const KernelTable* best_table() {
  if (cpu_has_avx512() && table_avx512().name) return &table_avx512();
  if (cpu_has_avx2() && table_avx2().name) return &table_avx2();
  return &table_base();
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

const KernelTable& active_table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

bool set_isa(const char* name) {
  const KernelTable* t = nullptr;
  if (!std::strcmp(name, "auto")) t = best_table();
  else if (!std::strcmp(name, "base")) t = &table_base();
  else if (!std::strcmp(name, "avx2") && cpu_has_avx2() && table_avx2().name) t = &table_avx2();
  else if (!std::strcmp(name, "avx512") && cpu_has_avx512() && table_avx512().name) t = &table_avx512();
  if (!t) return false;
  g_table.store(t, std::memory_order_release);
  return true;
}

const char* isa_name() { return active_table().name; }

namespace {
// Bytes one chunk's panel may take before the batch is cut into narrower chunks: one core's L2, at most
// 512 KiB. The panel that matters is the one the row loops read or update at random (K rows: x in the
// forward and the SDDMM, the dX panel in the scatter); the other side streams. Measured at 1 thread, 90 %
// sparsity, best of interleaved rounds. On a 512 KiB-L2 core (Zen 3): where the 64-lane panel passes L2,
// 32 lanes are faster although the values and indices are read twice as often (forward of 4096x4096
// 1.47x / 1.55x at batch 64 / 128, 768x3072 1.24x at 128, backward of 4096x4096 1.29x / 1.55x); where it
// fits, 64 lanes are as fast or faster (3072x768, 1536x384, 300x784: 0.94-1.07x). On a 1 MiB-L2 core
// (Zen 4) a panel as large as L2 is too large while the machine's other tenants keep its L3 busy:
// 4096x4096 at batch 128 forward 16.6-17.5 vs 22.2-22.6 ms, backward 41.3-42.3 vs 58.2-60.1 ms with
// 512 KiB instead of 1 MiB (32 lanes instead of 64), 2048x2048 forward 3.44 vs 4.72 ms; at a quieter time
// 14.4 vs 14.7 and 33.4 vs 36.0 ms; layers whose panels fit either way time alike (0.95-1.07x). So the
// L2 size caps the budget but no longer sets it. set_panel_budget() overrides it (benchmarks, tests).
std::atomic<int64_t> g_panel_budget{0};  // 0: automatic

int64_t default_budget() {
  static const int64_t bytes = [] {
    long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);  // per core; 0 or -1 where the system does not say
#endif
    const int64_t lo = int64_t(256) << 10, hi = int64_t(512) << 10;
    if (v <= 0) return hi;
    return v < lo ? lo : (v > hi ? hi : static_cast<int64_t>(v));
  }();
  return bytes;
}

int64_t panel_budget() {
  const int64_t forced = g_panel_budget.load(std::memory_order_relaxed);
  return forced > 0 ? forced : default_budget();
}
}  // namespace

int64_t set_panel_budget(int64_t bytes) {
  g_panel_budget.store(bytes > 0 ? bytes : 0, std::memory_order_relaxed);
  return panel_budget();
}

int64_t panel_width(Dtype dt, int64_t B, int64_t rows) {
  if (B <= 1) return 1;
  const int64_t W = vector_width(dt), es = dt == kFloat32 ? 4 : 8;
  int64_t nv = B <= W ? 1 : (B <= 2 * W ? 2 : 4);
  while (nv > 1 && rows * nv * W * es > panel_budget()) nv /= 2;
  return nv * W;
}

// ------------------------------------------------------------------------------------------ panels

namespace {

constexpr int64_t kTile = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }
int64_t elem_size(Dtype dt) { return dt == kFloat32 ? 4 : 8; }

// Parallelise only when there is enough work to pay for waking the threads.
bool worth_threads(int64_t work) { return work >= (1 << 15) && omp_get_max_threads() > 1; }

// x (B, K) row-major -> P (nchunks, K, BC), rows past B zero; tile by tile (the ISA's transposes).
template <typename T>
void pack(const T* __restrict x, int64_t B, int64_t K, int64_t BC, T* __restrict P) {
  const Dtype dt = sizeof(T) == 4 ? kFloat32 : kFloat64;
  const KernelTable& t = active_table();
  const int64_t nchunks = ceil_div(B, BC), nkt = ceil_div(K, kTile);
#pragma omp parallel for collapse(2) schedule(static) if (worth_threads(nchunks * K * BC))
  for (int64_t c = 0; c < nchunks; ++c) {
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const int64_t k0 = kt * kTile, k1 = k0 + kTile < K ? k0 + kTile : K;
      t.pack_tile(dt, x, B, K, BC, c, k0, k1, P + c * K * BC);
    }
  }
}

// P (nchunks, N, BC) -> y (B, N) (+ bias).
template <typename T>
void unpack(const T* __restrict P, int64_t B, int64_t N, int64_t BC, const T* __restrict bias,
            T* __restrict y) {
  const Dtype dt = sizeof(T) == 4 ? kFloat32 : kFloat64;
  const KernelTable& t = active_table();
  const int64_t nchunks = ceil_div(B, BC), nnt = ceil_div(N, kTile);
#pragma omp parallel for collapse(2) schedule(static) if (worth_threads(B * N))
  for (int64_t c = 0; c < nchunks; ++c) {
    for (int64_t nt = 0; nt < nnt; ++nt) {
      const int64_t n0 = nt * kTile, n1 = n0 + kTile < N ? n0 + kTile : N;
      t.unpack_tile(dt, P + c * N * BC, B, N, BC, bias, c, n0, n1, y);
    }
  }
}

// Chunk c of x (B, K) -> its panel P (K, BC), and a chunk's output panel (N, BC) -> y (B, N) (+ bias).
void pack_chunk(Dtype dt, const void* x, int64_t B, int64_t K, int64_t BC, int64_t c, void* P) {
  const KernelTable& t = active_table();
  for (int64_t k0 = 0; k0 < K; k0 += kTile)
    t.pack_tile(dt, x, B, K, BC, c, k0, k0 + kTile < K ? k0 + kTile : K, P);
}
void unpack_chunk(Dtype dt, const void* P, int64_t B, int64_t N, int64_t BC, const void* bias, int64_t c,
                  void* y) {
  const KernelTable& t = active_table();
  for (int64_t n0 = 0; n0 < N; n0 += kTile)
    t.unpack_tile(dt, P, B, N, BC, bias, c, n0, n0 + kTile < N ? n0 + kTile : N, y);
}

template <typename T>
void add_bias_rows(T* y, int64_t B, int64_t N, const T* bias) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) y[b * N + n] += bias[n];
}

// (chunk, block of rows) work items, dynamically scheduled: rows differ in nnz.
int run_spmm(Dtype dt, const SpmmArgs& a, int64_t nchunks, int64_t nrows, int64_t work) {
  const KernelTable& t = active_table();
  if (!worth_threads(work)) {
    // Straight calls: an OpenMP region, even one that its `if` keeps serial, enters libgomp and hands
    // out the row blocks one by one (~0.3 µs of a ~10 µs batch-1 layer).
    for (int64_t c = 0; c < nchunks; ++c)
      if (const int e = t.spmm_rows(dt, a, c, 0, nrows)) return e;
    return 0;
  }
  const int nthreads = omp_get_max_threads();
  int64_t rb = nrows / (16 * static_cast<int64_t>(nthreads));
  rb = rb < 1 ? 1 : (rb > 64 ? 64 : rb);
  const int64_t nblk = ceil_div(nrows, rb), items = nchunks * nblk;
  int err = 0;
#pragma omp parallel for schedule(dynamic, 1) if (worth_threads(work) && items > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t c = it / nblk, r0 = (it % nblk) * rb;
    const int64_t r1 = r0 + rb < nrows ? r0 + rb : nrows;
    const int e = t.spmm_rows(dt, a, c, r0, r1);
    if (e) {
#pragma omp atomic write
      err = e;
    }
  }
  return err;
}

// Chunks c0 .. c1 - 1 one after the other (rows in dynamic blocks, a barrier between chunks: chunk c adds
// into the g that chunk c-1 wrote).
int run_sddmm(Dtype dt, const SddmmArgs& a, int64_t c0, int64_t c1, int64_t nrows, int64_t work) {
  const KernelTable& t = active_table();
  const int nthreads = omp_get_max_threads();
  int64_t rb = nrows / (16 * static_cast<int64_t>(nthreads));
  rb = rb < 1 ? 1 : (rb > 64 ? 64 : rb);
  const int64_t items = ceil_div(nrows, rb);
  int err = 0;
#pragma omp parallel if (worth_threads(work) && items > 1)
  for (int64_t c = c0; c < c1; ++c) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t r0 = it * rb, r1 = r0 + rb < nrows ? r0 + rb : nrows;
      const int e = t.sddmm_rows(dt, a, c, r0, r1);
      if (e) {
#pragma omp atomic write
        err = e;
      }
    }
  }
  return err;
}

// Once every chunk is in: g_m = g*w, g_w = g*m over all stored values (g is in g_w).
template <typename T>
void sddmm_epilogue(const SddmmArgs& a, int64_t nvalues) {
  if (!a.m) return;
  const T* __restrict m = static_cast<const T*>(a.m);
  const T* __restrict w = static_cast<const T*>(a.w);
  T* __restrict gm = static_cast<T*>(a.g_m);
  T* __restrict gw = static_cast<T*>(a.g_w);
#pragma omp parallel for simd schedule(static) if (worth_threads(nvalues))
  for (int64_t e = 0; e < nvalues; ++e) {
    const T g = gw[e];
    gm[e] = g * w[e];
    gw[e] = g * m[e];
  }
}

template <typename T>
int forward_t(const T* x, int64_t B, int64_t N, int64_t K, const T* m, const T* w, const T* bias,
              const int32_t* crow, const int32_t* col, const uint16_t* col16, int64_t bn, int64_t bk, T* y,
              void* ws) {
  const Dtype dt = sizeof(T) == 4 ? kFloat32 : kFloat64;
  if (col16 && (bn != 1 || bk != 1 || K > 65536)) return 2;  // the caller checks; never read them wrongly
  if (B == 0 || N == 0) return 0;
  const int64_t BC = panel_width(dt, B, K), nchunks = ceil_div(B, BC);
  const int64_t nbr = ceil_div(N, bn), nbc = ceil_div(K, bk);
  const int64_t nnzb = crow[nbr];
  const int64_t work = nnzb * bn * bk * BC * nchunks;
  SpmmArgs a{m, w, crow, col, nbc, N, K, bn, bk, false, x, y, BC, col16};
  if (BC == 1) {
    const int err = run_spmm(dt, a, nchunks, nbr, work);
    if (!err && bias) add_bias_rows(y, B, N, bias);
    return err;
  }
  T* XP = static_cast<T*>(ws);
  T* Y = reinterpret_cast<T*>(static_cast<char*>(ws) + align64(nchunks * K * BC * sizeof(T)));
  a.X = XP;
  a.Y = Y;
  if (nchunks > 1 && !worth_threads(work)) {
    // One thread: chunk by chunk through one panel pair that stays in L2 (pack, rows, unpack), rather
    // than all of x packed first (x of 512 x 1536 floats is 3 MB: its panels went out to L3 and back).
    // Threads keep the whole-x passes: rows shared dynamically hold up under a busy machine, and two
    // cores' L2s do not share panels anyway.
    const KernelTable& t = active_table();
    for (int64_t c = 0; c < nchunks; ++c) {
      pack_chunk(dt, x, B, K, BC, c, XP);
      if (const int e = t.spmm_rows(dt, a, 0, 0, nbr)) return e;
      unpack_chunk(dt, Y, B, N, BC, bias, c, y);
    }
    return 0;
  }
  pack(x, B, K, BC, XP);
  const int err = run_spmm(dt, a, nchunks, nbr, work);
  if (err) return err;
  unpack(Y, B, N, BC, bias, y);
  return 0;
}

// Threads that accumulate their own dX panel: all of them, unless the panels would pass 64 MiB.
int scatter_threads(Dtype dt, int64_t K, int64_t BC, int64_t work) {
  if (!worth_threads(work)) return 1;
  const int64_t per = K * BC * elem_size(dt);
  int64_t nt = omp_get_max_threads();
  if (per > 0 && nt * per > (int64_t(64) << 20)) nt = (int64_t(64) << 20) / per;
  if (nt > 256) nt = 256;  // scatter_dx's range table
  return static_cast<int>(nt < 1 ? 1 : nt);
}

// Row ranges of the dX scatter: `parts` contiguous ranges of block rows with about equal stored blocks
// each, fixed by the pattern alone. Range i always accumulates into panel i and the panels are summed
// in range order, so dX has the same bits whatever thread ran which range (OpenMP's dynamic schedule
// used to decide which rows shared a panel, and float sums in another order round differently).
void split_rows(const int32_t* crow, int64_t nbr, int parts, int64_t* bounds) {
  const int64_t nnzb = crow[nbr];
  bounds[0] = 0;
  int64_t r = 0;
  for (int i = 1; i < parts; ++i) {
    const int64_t target = nnzb * i / parts;
    while (r < nbr && crow[r] < target) ++r;
    bounds[i] = r;
  }
  bounds[parts] = nbr;
}

// dX (B, K) = dY θ by scatter from the CSR rows into per-range panels, chunk by chunk, summed
// straight into g_x (the sum doubles as the unpack).
template <typename T>
int scatter_dx(Dtype dt, const SpmmArgs& a, int64_t B, int64_t K, int64_t nbr, int64_t c0, int64_t c1, int nt,
               T* panels, T* gx) {
  const KernelTable& t = active_table();
  const int64_t BC = a.bc, psize = K * BC;
  const int parts = nt;
  int64_t bounds[257];
  split_rows(a.ptr, nbr, parts, bounds);
  const int64_t nkt = ceil_div(K, kTile);
  int err = 0;
#pragma omp parallel num_threads(parts) if (parts > 1)
  {
    for (int64_t c = c0; c < c1; ++c) {
#pragma omp for schedule(static, 1)
      for (int i = 0; i < parts; ++i) {
        T* P = panels + i * psize;
        std::memset(P, 0, psize * sizeof(T));
        const int e = bounds[i] < bounds[i + 1] ? t.scatter_rows(dt, a, c, bounds[i], bounds[i + 1], P) : 0;
        if (e) {
#pragma omp atomic write
          err = e;
        }
      }
      // implicit barrier: every panel of this chunk is complete. Panels 1.. are added into panel 0 in
      // order (contiguous, vectorised), then panel 0 is transposed into g_x like a forward's output.
#pragma omp for schedule(static)
      for (int64_t kt = 0; kt < nkt; ++kt) {
        const int64_t k0 = kt * kTile, k1 = k0 + kTile < K ? k0 + kTile : K;
        T* __restrict p0 = panels + k0 * BC;
        for (int i = 1; i < parts; ++i) {
          const T* __restrict pi = panels + i * psize + k0 * BC;
#pragma omp simd
          for (int64_t e = 0; e < (k1 - k0) * BC; ++e) p0[e] += pi[e];
        }
        t.unpack_tile(dt, panels, B, K, BC, nullptr, c, k0, k1, gx);
      }
      // implicit barrier before the panels are cleared for the next chunk
    }
  }
  return err;
}

template <typename T>
int backward_t(const T* gy, const T* x, int64_t B, int64_t N, int64_t K, const T* m, const T* w,
               const int32_t* crow, const int32_t* col, int64_t nnzb, int64_t bn, int64_t bk, T* gx, T* gm, T* gw,
               void* ws) {
  const Dtype dt = sizeof(T) == 4 ? kFloat32 : kFloat64;
  const int64_t bsize = bn * bk;
  const int64_t nbr = ceil_div(N, bn), nbc = ceil_div(K, bk);
  if (B == 0) {
    // dtheta is an empty sum: zero (g_x is empty).
    std::memset(gw, 0, nnzb * bsize * sizeof(T));
    if (gm) std::memset(gm, 0, nnzb * bsize * sizeof(T));
    return 0;
  }
  const int64_t BC = panel_width(dt, B, K), nchunks = ceil_div(B, BC);  // K: the panels read at random
  const int64_t work = nnzb * bsize * BC * nchunks;
  char* p = static_cast<char*>(ws);
  const T* X = x;
  const T* DY = gy;
  T* XP = nullptr;
  T* DYP = nullptr;
  if (BC > 1) {
    XP = reinterpret_cast<T*>(p);
    p += align64(nchunks * K * BC * sizeof(T));
    DYP = reinterpret_cast<T*>(p);
    p += align64(nchunks * N * BC * sizeof(T));
    X = XP;
    DY = DYP;
  }
  T* panels = reinterpret_cast<T*>(p);
  const bool with_dx = gx && K > 0;
  const int nt = with_dx ? scatter_threads(dt, K, BC, work) : 1;
  SpmmArgs a{m, w, crow, col, nbc, K, N, bn, bk, false, DY, nullptr, BC};
  SddmmArgs s{m, w, crow, col, nbc, N, K, bn, bk, DY, X, BC, nchunks, gm, gw};
  const int64_t nvalues = nnzb * bsize;
  if (BC > 1 && nchunks > 1 && !worth_threads(work)) {
    // One thread: each chunk packed, scattered into g_x and multiplied into g while its panels are in
    // L2 (as in the forward), instead of all of x and dY packed first.
    const KernelTable& t = active_table();
    for (int64_t c = 0; c < nchunks; ++c) {
      pack_chunk(dt, x, B, K, BC, c, XP + c * K * BC);
      pack_chunk(dt, gy, B, N, BC, c, DYP + c * N * BC);
      if (with_dx)
        if (const int e = scatter_dx(dt, a, B, K, nbr, c, c + 1, 1, panels, gx)) return e;
      if (const int e = t.sddmm_rows(dt, s, c, 0, nbr)) return e;
    }
    sddmm_epilogue<T>(s, nvalues);
    return 0;
  }
  if (BC > 1) {
    pack(x, B, K, BC, XP);
    pack(gy, B, N, BC, DYP);
  }
  if (with_dx)
    if (const int e = scatter_dx(dt, a, B, K, nbr, 0, nchunks, nt, panels, gx)) return e;
  if (const int e = run_sddmm(dt, s, 0, nchunks, nbr, work)) return e;
  sddmm_epilogue<T>(s, nvalues);
  return 0;
}

}  // namespace

int64_t forward_workspace_bytes(Dtype dt, int64_t B, int64_t N, int64_t K, int64_t, int64_t, int64_t) {
  const int64_t BC = panel_width(dt, B, K);
  if (BC == 1 || B == 0) return 0;
  const int64_t nchunks = ceil_div(B, BC), es = elem_size(dt);
  return align64(nchunks * K * BC * es) + align64(nchunks * N * BC * es);
}

int64_t backward_workspace_bytes(Dtype dt, int64_t B, int64_t N, int64_t K, int64_t nnzb, int64_t bn,
                                 int64_t bk, bool with_dx) {
  if (B == 0) return 0;
  const int64_t es = elem_size(dt);
  const int64_t BC = panel_width(dt, B, K), nchunks = ceil_div(B, BC);
  int64_t bytes = 0;
  if (BC > 1) bytes += align64(nchunks * K * BC * es) + align64(nchunks * N * BC * es);
  if (!with_dx) return bytes;
  const int nt = scatter_threads(dt, K, BC, nnzb * bn * bk * BC * nchunks);
  return bytes + align64(static_cast<int64_t>(nt) * K * BC * es);
}

int compact_linear_forward(Dtype dt, const void* x, int64_t B, int64_t N, int64_t K, const void* m,
                           const void* w, const void* bias, const int32_t* crow, const int32_t* col,
                           const uint16_t* col16, int64_t bn, int64_t bk, void* y, void* ws) {
  if (dt == kFloat32)
    return forward_t<float>(static_cast<const float*>(x), B, N, K, static_cast<const float*>(m),
                            static_cast<const float*>(w), static_cast<const float*>(bias), crow, col, col16,
                            bn, bk, static_cast<float*>(y), ws);
  return forward_t<double>(static_cast<const double*>(x), B, N, K, static_cast<const double*>(m),
                           static_cast<const double*>(w), static_cast<const double*>(bias), crow, col, col16,
                           bn, bk, static_cast<double*>(y), ws);
}

int compact_linear_backward(Dtype dt, const void* gy, const void* x, int64_t B, int64_t N, int64_t K,
                            const void* m, const void* w, const int32_t* crow, const int32_t* col,
                            int64_t nnzb,
                            int64_t bn, int64_t bk, void* gx, void* gm, void* gw, void* ws) {
  if (dt == kFloat32)
    return backward_t<float>(static_cast<const float*>(gy), static_cast<const float*>(x), B, N, K,
                             static_cast<const float*>(m), static_cast<const float*>(w), crow, col, nnzb, bn, bk,
                             static_cast<float*>(gx), static_cast<float*>(gm), static_cast<float*>(gw), ws);
  return backward_t<double>(static_cast<const double*>(gy), static_cast<const double*>(x), B, N, K,
                            static_cast<const double*>(m), static_cast<const double*>(w), crow, col, nnzb, bn, bk,
                            static_cast<double*>(gx), static_cast<double*>(gm), static_cast<double*>(gw), ws);
}

}  // namespace se_cpu

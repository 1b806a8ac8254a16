// Raw-pointer interface of the CPU kernels (no torch headers: ops.cpp does the tensor plumbing).
//
// Compact layouts (see sparse_engine/layout.py): a CSR pattern is a BSR pattern with 1x1 blocks.
// Activations go through "panels": a batch-contiguous copy of x, (nchunks, rows, BC) with BC a multiple
// of one 64-byte vector, so the inner loops of SpMM/SDDMM run over the batch with contiguous vector
// loads and no gathers. BC = 1 (batch 1) uses x itself and gathers along the row instead.
#pragma once

#include <cstdint>
#include <type_traits>

namespace se_cpu {

enum Dtype : int { kFloat32 = 0, kFloat64 = 1 };

// Y[c, o, :] = sum_j sum_q theta(j, o, q) * X[c, idx[j]*ib + q, :] over the blocks j of output block-row o.
// theta = m*w (w alone when m is null) at value index j: block (ob_dim x ib_dim) stored as (bn, bk),
// transposed (trans) for the dX pass, where the caller has already gathered the values in CSC order.
struct SpmmArgs {
  const void* m;         // values (nnzb, bn, bk) or nullptr
  const void* w;         // values (nnzb, bn, bk)
  const int32_t* ptr;    // (nout_blocks + 1) compressed pointers, already validated by the caller
  const int32_t* idx;    // (nnzb) input block index of each stored block (checked < nin_blocks)
  int64_t nin_blocks;    // bound of idx
  int64_t out_dim;       // element rows of Y per chunk
  int64_t in_dim;        // element rows of X per chunk
  int64_t bn, bk;        // block shape (1, 1 for CSR)
  bool trans;            // output index within a block is its column (dX pass)
  const void* X;         // panel (nchunks, in_dim, bc)
  void* Y;               // panel (nchunks, out_dim, bc)
  int64_t bc;            // panel width: 1 or a multiple of the vector width
  // CSR forward only: the same column indices as 16-bit entries (read instead of idx, which may then be
  // null); nullptr otherwise.
  const uint16_t* idx16 = nullptr;
};

// g[j, o, q] = sum_c sum_l DY[c, row(j)*bn + o, l] * X[c, col(j)*bk + q, l] for the stored blocks
// (padding of edge blocks gets 0), into g_w; the driver then applies g_m = g*w, g_w = g*m.
struct SddmmArgs {
  const void* m;         // values or nullptr
  const void* w;
  const int32_t* crow;   // (nbr + 1)
  const int32_t* col;    // (nnzb), checked < nbc
  int64_t nbc;
  int64_t n, k;          // matrix shape
  int64_t bn, bk;
  const void* DY;        // panel (nchunks, n, bc)
  const void* X;         // panel (nchunks, k, bc)
  int64_t bc, nchunks;
  void* g_m;             // (nnzb, bn, bk) or nullptr when m is null
  void* g_w;             // (nnzb, bn, bk)
};

// One instruction-set variant of the row kernels; each returns 0, or 1 on an out-of-range index.
struct KernelTable {
  const char* name;
  int (*spmm_rows)(Dtype, const SpmmArgs&, int64_t chunk, int64_t r0, int64_t r1);
  int (*sddmm_rows)(Dtype, const SddmmArgs&, int64_t chunk, int64_t r0, int64_t r1);
  // dX from the CSR side: panel[idx(j)*ib + q, :] += theta(j, o, q) * X[r*bn + o, :] (X = the dY panel).
  int (*scatter_rows)(Dtype, const SpmmArgs&, int64_t chunk, int64_t r0, int64_t r1, void* panel);
  // Panel transposes of one tile: x (B, K) columns k0..k1 -> chunk c's panel (rows past B zero), and
  // chunk c's panel rows n0..n1 -> y (B, N) (+ bias, nullable). `panel` is that chunk's panel.
  void (*pack_tile)(Dtype, const void* x, int64_t B, int64_t K, int64_t BC, int64_t chunk, int64_t k0,
                    int64_t k1, void* panel);
  void (*unpack_tile)(Dtype, const void* panel, int64_t B, int64_t N, int64_t BC, const void* bias,
                      int64_t chunk, int64_t n0, int64_t n1, void* y);
};

const KernelTable& table_base();
const KernelTable& table_avx2();
const KernelTable& table_avx512();

// The variant in use: the best one this CPU supports unless set_isa() chose another.
const KernelTable& active_table();
// "avx512" | "avx2" | "base" | "auto"; returns false when the CPU cannot run it.
bool set_isa(const char* name);
const char* isa_name();

// Vector width in elements of one 64-byte vector; panel widths are multiples of it.
inline int64_t vector_width(Dtype dt) { return dt == kFloat32 ? 16 : 8; }
// Panel width for a batch of B rows whose randomly accessed panel has `rows` rows (K, both directions):
// 1 for B == 1, else 1, 2 or 4 vectors, fewer when one chunk's panel would exceed the panel budget.
int64_t panel_width(Dtype dt, int64_t B, int64_t rows);
// Override the panel budget (bytes; 0 = automatic: one core's L2 within 256-512 KiB); returns the budget
// now in force.
int64_t set_panel_budget(int64_t bytes);

// Drivers (OpenMP over rows / row blocks). Return 0 or an error code:
//   1 = a col index is out of range.
// Forward: y (B, N) = x (B, K) theta^T + bias. Values (nnzb, bn, bk) in CSR order. The column indices
// are col (int32), or col16 (16-bit unsigned; CSR only, K <= 65536) with col null.
int compact_linear_forward(Dtype dt, const void* x, int64_t B, int64_t N, int64_t K, const void* m,
                           const void* w, const void* bias, const int32_t* crow, const int32_t* col,
                           const uint16_t* col16, int64_t bn, int64_t bk, void* y, void* workspace);
// Bytes of workspace the forward needs (panels), 64-byte aligned by the caller.
int64_t forward_workspace_bytes(Dtype dt, int64_t B, int64_t N, int64_t K, int64_t nnzb, int64_t bn,
                                int64_t bk);
// Backward: g_x (B, K) (may be null: skipped), g_m (nullable), g_w: values layout. Needs only the CSR
// side of the index: dX is computed by scatter from the rows (see compact_linear.cpp).
int compact_linear_backward(Dtype dt, const void* grad_y, const void* x, int64_t B, int64_t N, int64_t K,
                            const void* m, const void* w, const int32_t* crow, const int32_t* col, int64_t nnzb,
                            int64_t bn, int64_t bk, void* g_x, void* g_m, void* g_w, void* workspace);
// with_dx = false: no room for the dX scatter panels (the backward is then called with g_x null).
int64_t backward_workspace_bytes(Dtype dt, int64_t B, int64_t N, int64_t K, int64_t nnzb, int64_t bn,
                                 int64_t bk, bool with_dx = true);

// Elementwise ops (any contiguous tensor of n elements; mask is bool bytes or null).
void reparam_forward(Dtype dt, int64_t n, const void* m, const void* w, const uint8_t* mask, void* theta);
void reparam_backward(Dtype dt, int64_t n, const void* grad, const void* m, const void* w,
                      const uint8_t* mask, void* g_m, void* g_w);
void signin_reset(Dtype dt, int64_t n, const void* m, const void* w, const uint8_t* mask, double beta,
                  void* m_out, void* w_out);

// Whether x (n elements) has no NaN / ±inf where mask is set (null mask: everywhere).
bool all_finite(Dtype dt, int64_t n, const void* x, const uint8_t* mask);

struct StepConfig {
  int kind;  // 0 = sgd, 1 = adamw
  int64_t step;
  double momentum, dampening;
  bool nesterov;
  double beta1, beta2, eps, weight_decay, alpha;
  bool maximize;
};
// lr is given in the parameter dtype (a pointer to one element), as the reference casts it.
void fused_step(Dtype dt, int64_t n, void* param, const void* grad, void* buf1, void* buf2,
                const uint8_t* mask, const void* lr, const StepConfig& cfg);

}  // namespace se_cpu

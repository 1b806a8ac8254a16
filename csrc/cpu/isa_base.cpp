// Row kernels for any CPU (the compiler's baseline ISA; SSE2 on x86-64).
#include "kernels.h"

#define SE_NATIVE_BYTES 16  // one SSE2 register
#include "compact_impl.h"

namespace se_cpu {
const KernelTable& table_base() {
  static const KernelTable t{"base", &spmm_rows, &sddmm_rows, &scatter_rows, &pack_tile, &unpack_tile};
  return t;
}
}  // namespace se_cpu

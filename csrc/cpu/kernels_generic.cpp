// The CPU kernels compiled for baseline x86-64 (SSE2), and the choice of table at run time.
#include "cpu/kernels.h"

#include "cpu/adam_kernels.h"
#include "cpu/norm_kernels.h"

namespace megalite::cpu {

const KernelTable& generic_kernels() {
  static const KernelTable table{"generic", adam_fp32, adam_master, layer_norm_forward, layer_norm_backward,
                                 rms_norm_forward, rms_norm_backward};
  return table;
}

const KernelTable& best_kernels() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) return avx2_kernels();
#endif
  return generic_kernels();
}

}  // namespace megalite::cpu

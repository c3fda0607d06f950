// The CPU kernels compiled for baseline x86-64 (SSE2), and the choice of table at run time.
#include "cpu/kernels.h"

#include "cpu/kernel_table.h"

namespace megalite::cpu {

const KernelTable& generic_kernels() {
  static const KernelTable table = kernel_table<PortableRounding>("generic");
  return table;
}

// __builtin_cpu_supports reports a feature only where the OS also saves its registers (libgcc and
// compiler-rt check XCR0 for the AVX and AVX-512 state), so a table chosen here cannot fault.
bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const KernelTable& best_kernels() {
  static const KernelTable& best =
      cpu_has_avx512() ? avx512_kernels() : cpu_has_avx2() ? avx2_kernels() : generic_kernels();
  return best;
}

}  // namespace megalite::cpu

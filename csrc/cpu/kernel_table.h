// One ISA's KernelTable, from the kernels in adam_kernels.h and norm_kernels.h.  Each
// kernels_<isa>.cpp includes this below its target pragma, so the templates (internal linkage, like
// the kernels) are instantiated with that file's ISA; Rounding is how the file rounds fp32 to 16 bits.
#pragma once

#include "cpu/adam_kernels.h"
#include "cpu/norm_kernels.h"

namespace megalite::cpu {
namespace {

template <class Rounding>
KernelTable kernel_table(const char* isa) {
  return KernelTable{isa,
                     adam_fp32,
                     adam_master<Rounding>,
                     layer_norm_forward<Rounding>,
                     layer_norm_backward<Rounding>,
                     rms_norm_forward<Rounding>,
                     rms_norm_backward<Rounding>};
}

}  // namespace
}  // namespace megalite::cpu

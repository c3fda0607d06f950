// The storage dtypes the kernels take, named without torch headers (CPU and CUDA share this).
#pragma once

namespace megalite {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

}  // namespace megalite

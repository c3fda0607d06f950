// Error checks around the CUDA launchers, without torch headers: a failed runtime call or kernel
// launch throws LaunchError with one line naming the call or kernel and the shape, and
// csrc/cuda/bindings.cpp turns that into a torch error (RuntimeError in Python) -- so a launch that
// did not run never hands back uninitialized outputs.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "cuda/launch_plan.h"
#include "dtypes.h"

namespace megalite::cuda {

struct NormShape;

class LaunchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws LaunchError("megalite CUDA: <what> (<shape>): <CUDA's message>") unless status is cudaSuccess.
void check_cuda(cudaError_t status, const char* what, const std::string& shape);

// After a launch: the launch's own error (bad configuration, too much shared memory, no kernel image
// for this GPU), taken and cleared with cudaGetLastError.
inline void check_launch(const char* kernel, const std::string& shape) {
  check_cuda(cudaGetLastError(), kernel, shape);
}

// The current device's limits and SM count, each runtime call checked.
DeviceLimits current_device_limits();
int current_sm_count();

const char* dtype_name(DType dtype);
std::string describe(const NormShape& shape);

}  // namespace megalite::cuda

// The launchers' error checks and device queries (launch_checks.h).
#include "cuda/launch_checks.h"

#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace megalite::cuda {

void check_cuda(cudaError_t status, const char* what, const std::string& shape) {
  if (status == cudaSuccess) return;
  throw LaunchError(std::string("megalite CUDA: ") + what + " (" + shape + "): " + cudaGetErrorName(status) + ", " +
                    cudaGetErrorString(status));
}

namespace {

int device_attribute(cudaDeviceAttr attribute, const char* name) {
  int device = 0, value = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice", "current device");
  check_cuda(cudaDeviceGetAttribute(&value, attribute, device), "cudaDeviceGetAttribute", name);
  return value;
}

}  // namespace

DeviceLimits current_device_limits() {
  DeviceLimits limits;
  limits.shared_per_block = device_attribute(cudaDevAttrMaxSharedMemoryPerBlock, "MaxSharedMemoryPerBlock");
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, "MaxSharedMemoryPerBlockOptin");
  limits.shared_per_block_optin = optin > limits.shared_per_block ? optin : limits.shared_per_block;
  limits.max_grid_x = device_attribute(cudaDevAttrMaxGridDimX, "MaxGridDimX");
  limits.max_grid_y = device_attribute(cudaDevAttrMaxGridDimY, "MaxGridDimY");
  return limits;
}

int current_sm_count() {
  const int count = device_attribute(cudaDevAttrMultiProcessorCount, "MultiProcessorCount");
  return count > 0 ? count : 1;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::BFloat16: return "bfloat16";
    default: return "float16";
  }
}

std::string describe(const NormShape& shape) {
  return "rows " + std::to_string(shape.rows) + ", cols " + std::to_string(shape.cols) + ", x " +
         dtype_name(shape.x_dtype) + ", weight " + dtype_name(shape.weight_dtype);
}

}  // namespace megalite::cuda

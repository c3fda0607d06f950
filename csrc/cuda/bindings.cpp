// megalite._cuda: CUDA implementations of the operators that megalite._C defines
// (torch.ops.megalite.*, schemas in csrc/cpu/bindings.cpp).  The only CUDA translation unit that
// includes torch headers: it checks tensors, allocates outputs on the caching allocator, and calls
// the launchers in kernels.h on the current stream.  The operator implementations are named *_op,
// apart from the launchers of the same name.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/kernels.h"
#include "tensor_checks.h"

namespace megalite::cuda {
namespace {

using megalite::check_adam_scalars;
using megalite::check_on;
using megalite::dtype_of;
using megalite::gather_lists;
using megalite::TensorLists;
using megalite::typed;

// Runs a launcher; its LaunchError (a failed launch or runtime call, launch_checks.h) becomes a
// torch error, RuntimeError in Python, with the launcher's one-line message.
template <typename Fn>
void surfaced(const Fn& launcher) {
  try {
    launcher();
  } catch (const std::runtime_error& error) {
    TORCH_CHECK(false, error.what());
  }
}

void adam_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode) {
  check_adam_scalars(step, 1.0);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const TensorLists gathered = gather_lists(
      {{params, at::kFloat}, {grads, at::kFloat}, {exp_avgs, at::kFloat}, {exp_avg_sqs, at::kFloat}},
      {"params", "grads", "exp_avgs", "exp_avg_sqs"}, device);
  const auto& lists = gathered.pointers;
  const std::vector<int64_t>& numels = gathered.numels;
  const std::vector<float*> p = typed<float>(lists[0]), g = typed<float>(lists[1]), m = typed<float>(lists[2]),
                            v = typed<float>(lists[3]);
  surfaced([&] {
    adam_fp32(p.data(), const_cast<const float* const*>(g.data()), m.data(), v.data(), numels.data(),
              static_cast<int64_t>(p.size()), make_adam_hyper(step, lr, beta1, beta2, eps, weight_decay, adam_w_mode),
              c10::cuda::getCurrentCUDAStream());
  });
}

void adam_step_master_op(at::TensorList model_params, at::TensorList grads, at::TensorList master_params,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const at::Tensor& found_inf, int64_t step,
                      double lr, double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode,
                      double grad_scale, bool check_finite) {
  check_adam_scalars(step, grad_scale);
  if (model_params.empty()) return;
  const at::Device device = model_params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  check_on(found_inf, device, "found_inf");
  TORCH_CHECK(found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1,
              "found_inf must be a 1-element float32 tensor");
  const at::ScalarType model_type = model_params[0].scalar_type();
  const at::ScalarType grad_type = grads.empty() ? model_type : grads[0].scalar_type();
  TORCH_CHECK(model_type == at::kBFloat16 || model_type == at::kHalf, "model_params have dtype ", model_type,
              "; master-weight mode writes bfloat16 or float16 parameters");
  const TensorLists gathered = gather_lists({{model_params, model_type}, {grads, grad_type}, {master_params, at::kFloat},
                                             {exp_avgs, at::kFloat}, {exp_avg_sqs, at::kFloat}},
                                            {"model_params", "grads", "master_params", "exp_avgs", "exp_avg_sqs"}, device);
  const auto& lists = gathered.pointers;
  const std::vector<int64_t>& numels = gathered.numels;
  const std::vector<const void*> g(lists[1].begin(), lists[1].end());
  const std::vector<float*> master = typed<float>(lists[2]), m = typed<float>(lists[3]), v = typed<float>(lists[4]);
  surfaced([&] {
    adam_master(lists[0].data(), dtype_of(model_params[0], "model_params"), g.data(), dtype_of(grads[0], "grads"),
                master.data(), m.data(), v.data(), numels.data(), static_cast<int64_t>(master.size()),
                make_adam_hyper(step, lr, beta1, beta2, eps, weight_decay, adam_w_mode),
                static_cast<float>(1.0 / grad_scale), check_finite, found_inf.data_ptr<float>(),
                c10::cuda::getCurrentCUDAStream());
  });
}

NormShape norm_shape(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "x is on ", x.device(), "; megalite._cuda runs CUDA tensors");
  check_on(x, x.device(), "x");
  check_on(weight, x.device(), "weight");
  TORCH_CHECK(x.dim() == 2, "x must be [rows, h] (the Python front flattens leading dims), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight has shape ", weight.sizes(), ", x has ",
              x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, "weight has dtype ",
              weight.scalar_type(), "; use x's dtype (", x.scalar_type(), ") or float32");
  if (bias.has_value() && bias->defined()) {
    check_on(*bias, x.device(), "bias");
    TORCH_CHECK(bias->sizes() == weight.sizes() && bias->scalar_type() == weight.scalar_type(),
                "bias must match weight's shape and dtype");
  }
  return NormShape{x.size(0), x.size(1), dtype_of(x, "x"), dtype_of(weight, "weight")};
}

at::Tensor row_stats(const at::Tensor& x) { return at::empty({x.size(0)}, x.options().dtype(at::kFloat)); }

void check_backward_inputs(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& stats) {
  check_on(dy, x.device(), "dy");
  check_on(stats, x.device(), "row statistics");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "dy must match x's shape and dtype");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == x.size(0), "row statistics must be float32 [rows]");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_op(const at::Tensor& x, const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& bias, double eps) {
  const NormShape shape = norm_shape(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x), mean = row_stats(x), rstd = row_stats(x);
  const void* bias_ptr = bias.has_value() && bias->defined() ? bias->data_ptr() : nullptr;
  surfaced([&] {
    megalite::cuda::layer_norm_forward(shape, x.data_ptr(), weight.data_ptr(), bias_ptr, y.data_ptr(),
                                       mean.data_ptr<float>(), rstd.data_ptr<float>(), static_cast<float>(eps),
                                       c10::cuda::getCurrentCUDAStream());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_op(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight) {
  const NormShape shape = norm_shape(x, weight, c10::nullopt);
  check_backward_inputs(dy, x, mean);
  check_backward_inputs(dy, x, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x), dweight = at::empty_like(weight), dbias = at::empty_like(weight);
  at::Tensor workspace = at::empty({2 * norm_weight_grad_splits(shape) * shape.cols}, x.options().dtype(at::kFloat));
  surfaced([&] {
    megalite::cuda::layer_norm_backward(shape, dy.data_ptr(), x.data_ptr(), mean.data_ptr<float>(),
                                        rstd.data_ptr<float>(), weight.data_ptr(), dx.data_ptr(), dweight.data_ptr(),
                                        dbias.data_ptr(), workspace.data_ptr<float>(),
                                        c10::cuda::getCurrentCUDAStream());
  });
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const NormShape shape = norm_shape(x, weight, c10::nullopt);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x), rstd = row_stats(x);
  surfaced([&] {
    megalite::cuda::rms_norm_forward(shape, x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(),
                                     static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                                     const at::Tensor& weight) {
  const NormShape shape = norm_shape(x, weight, c10::nullopt);
  check_backward_inputs(dy, x, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x), dweight = at::empty_like(weight);
  at::Tensor workspace = at::empty({norm_weight_grad_splits(shape) * shape.cols}, x.options().dtype(at::kFloat));
  surfaced([&] {
    megalite::cuda::rms_norm_backward(shape, dy.data_ptr(), x.data_ptr(), rstd.data_ptr<float>(), weight.data_ptr(),
                                      dx.data_ptr(), dweight.data_ptr(), workspace.data_ptr<float>(),
                                      c10::cuda::getCurrentCUDAStream());
  });
  return {dx, dweight};
}

DType swiglu_dtype(const at::Tensor& h) {
  TORCH_CHECK(h.is_cuda(), "h is on ", h.device(), "; megalite._cuda runs CUDA tensors");
  TORCH_CHECK(h.is_contiguous(), "h must be contiguous (the fc1 output), got strides ", h.strides());
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) % 2 == 0, "h must end in an even dimension of (gate, up) pairs, got ",
              h.sizes());
  return dtype_of(h, "h");
}

at::Tensor swiglu_forward_op(const at::Tensor& h) {
  const DType dtype = swiglu_dtype(h);
  const c10::cuda::CUDAGuard guard(h.device());
  std::vector<int64_t> sizes = h.sizes().vec();
  sizes.back() /= 2;
  at::Tensor y = at::empty(sizes, h.options());
  surfaced([&] {
    megalite::cuda::swiglu_forward(y.numel(), dtype, h.data_ptr(), y.data_ptr(), c10::cuda::getCurrentCUDAStream());
  });
  return y;
}

at::Tensor swiglu_backward_op(const at::Tensor& dy, const at::Tensor& h) {
  const DType dtype = swiglu_dtype(h);
  check_on(dy, h.device(), "dy");
  TORCH_CHECK(dy.scalar_type() == h.scalar_type() && dy.is_contiguous() && 2 * dy.numel() == h.numel(),
              "dy must be contiguous, of h's dtype and half its elements; got ", dy.sizes(), " ", dy.scalar_type(),
              " for h ", h.sizes(), " ", h.scalar_type());
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor dh = at::empty_like(h);
  surfaced([&] {
    megalite::cuda::swiglu_backward(dy.numel(), dtype, dy.data_ptr(), h.data_ptr(), dh.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream());
  });
  return dh;
}

}  // namespace
}  // namespace megalite::cuda

TORCH_LIBRARY_IMPL(megalite, CUDA, m) {
  m.impl("adam_step", &megalite::cuda::adam_step_op);
  m.impl("adam_step_master", &megalite::cuda::adam_step_master_op);
  m.impl("layer_norm_forward", &megalite::cuda::layer_norm_forward_op);
  m.impl("layer_norm_backward", &megalite::cuda::layer_norm_backward_op);
  m.impl("rms_norm_forward", &megalite::cuda::rms_norm_forward_op);
  m.impl("rms_norm_backward", &megalite::cuda::rms_norm_backward_op);
  m.impl("swiglu_forward", &megalite::cuda::swiglu_forward_op);
  m.impl("swiglu_backward", &megalite::cuda::swiglu_backward_op);
}

namespace {
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cuda", "megalite CUDA kernels (torch.ops.megalite.* on CUDA)", -1,
                      nullptr, nullptr, nullptr, nullptr, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__cuda() { return PyModule_Create(&module); }

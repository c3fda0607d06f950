// megalite._C: registers the kernels as PyTorch operators (torch.ops.megalite.*) and implements
// them for CPU tensors.  The only CPU translation unit that includes torch headers: it checks the
// tensors, allocates outputs and hands raw pointers to the kernels (kernels.h), which compile
// without torch.  The CUDA extension (csrc/cuda/bindings.cpp) adds CUDA implementations of the
// same schemas, so the dispatcher picks the device.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/output_cache.h"
#include "tensor_checks.h"

namespace megalite::cpu {
namespace {

using megalite::check_adam_scalars;
using megalite::dtype_of;
using megalite::gather_lists;
using megalite::TensorLists;
using megalite::typed;

const KernelTable* active_table = nullptr;   // null: best_kernels(); set by _C.set_isa() (tests, benchmarks)

const KernelTable& kernels() { return active_table != nullptr ? *active_table : best_kernels(); }

// Outputs of at least this many bytes are written with streaming stores (cpu/streaming_stores.h):
// a norm's y or dx, or master-mode Adam's model params (all of a call's together).  Measured on the
// CI VM (32 MiB L3), LayerNorm forward followed by y.sum(), fp32: at 8 MiB the cached output is
// faster (its consumer reads it from the L3), from 16 MiB the streamed one (0.52 vs 0.72 ms at
// 8 MiB; 1.41 vs 1.53 ms at 16 MiB, 2.9 vs 3.8 ms at 32 MiB).  bf16/fp16 norms are bound by their
// conversions, not by memory: streaming costs them 2-3% at 16 MiB.  _C.set_stream_min_bytes()
// changes the threshold (tests force both paths with it).
int64_t stream_min_bytes = int64_t{16} << 20;

void check_cpu_contiguous(const at::Tensor& t, const std::string& name) {
  check_on(t, at::Device(at::kCPU), name);
}

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode) {
  check_adam_scalars(step, 1.0);
  if (params.empty()) return;
  const TensorLists lists = gather_lists(
      {{params, at::kFloat}, {grads, at::kFloat}, {exp_avgs, at::kFloat}, {exp_avg_sqs, at::kFloat}},
      {"params", "grads", "exp_avgs", "exp_avg_sqs"}, at::Device(at::kCPU));
  const AdamHyper hyper = make_adam_hyper(step, lr, beta1, beta2, eps, weight_decay, adam_w_mode);
  const std::vector<float*> p = typed<float>(lists.pointers[0]), m = typed<float>(lists.pointers[2]),
                            v = typed<float>(lists.pointers[3]);
  const std::vector<float*> g = typed<float>(lists.pointers[1]);
  kernels().adam(p.data(), const_cast<const float* const*>(g.data()), m.data(), v.data(), lists.numels.data(),
                 static_cast<int64_t>(p.size()), hyper, at::get_num_threads());
}

void adam_step_master(at::TensorList model_params, at::TensorList grads, at::TensorList master_params,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const at::Tensor& found_inf, int64_t step,
                      double lr, double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode,
                      double grad_scale, bool check_finite) {
  check_adam_scalars(step, grad_scale);
  check_cpu_contiguous(found_inf, "found_inf");
  TORCH_CHECK(found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1,
              "found_inf must be a 1-element float32 tensor");
  float* flag = found_inf.data_ptr<float>();
  if (*flag != 0.f || model_params.empty()) return;   // an earlier check already skipped this step
  const at::ScalarType model_type = model_params[0].scalar_type();
  const at::ScalarType grad_type = grads.empty() ? model_type : grads[0].scalar_type();
  TORCH_CHECK(model_type == at::kBFloat16 || model_type == at::kHalf, "model_params have dtype ", model_type,
              "; master-weight mode writes bfloat16 or float16 parameters");
  const TensorLists lists = gather_lists({{model_params, model_type}, {grads, grad_type}, {master_params, at::kFloat},
                                          {exp_avgs, at::kFloat}, {exp_avg_sqs, at::kFloat}},
                                         {"model_params", "grads", "master_params", "exp_avgs", "exp_avg_sqs"},
                                         at::Device(at::kCPU));
  const AdamHyper hyper = make_adam_hyper(step, lr, beta1, beta2, eps, weight_decay, adam_w_mode);
  const std::vector<float*> master = typed<float>(lists.pointers[2]), m = typed<float>(lists.pointers[3]),
                            v = typed<float>(lists.pointers[4]);
  const std::vector<const void*> g(lists.pointers[1].begin(), lists.pointers[1].end());
  int64_t model_bytes = 0;
  for (const at::Tensor& t : model_params) model_bytes += static_cast<int64_t>(t.nbytes());
  const bool nonfinite = kernels().adam_master(
      lists.pointers[0].data(), dtype_of(model_params[0], "model_params"), g.data(), dtype_of(grads[0], "grads"),
      master.data(), m.data(), v.data(), lists.numels.data(), static_cast<int64_t>(master.size()), hyper,
      static_cast<float>(1.0 / grad_scale), check_finite, model_bytes >= stream_min_bytes, at::get_num_threads());
  if (nonfinite) *flag = 1.f;
}

NormShape norm_shape(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(x.dim() == 2, "x must be [rows, h] (the Python front flattens leading dims), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight has shape ", weight.sizes(), ", x has ",
              x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, "weight has dtype ",
              weight.scalar_type(), "; use x's dtype (", x.scalar_type(), ") or float32");
  if (bias.has_value() && bias->defined()) {
    check_cpu_contiguous(*bias, "bias");
    TORCH_CHECK(bias->sizes() == weight.sizes() && bias->scalar_type() == weight.scalar_type(),
                "bias must match weight's shape and dtype");
  }
  return NormShape{x.size(0), x.size(1), dtype_of(x, "x"), dtype_of(weight, "weight"), at::get_num_threads(),
                   static_cast<int64_t>(x.nbytes()) >= stream_min_bytes};
}

at::Tensor row_stats(const at::Tensor& x) { return at::empty({x.size(0)}, x.options().dtype(at::kFloat)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& bias, double eps) {
  const NormShape shape = norm_shape(x, weight, bias);
  at::Tensor y = empty_output(x), mean = row_stats(x), rstd = row_stats(x);
  const void* bias_ptr = bias.has_value() && bias->defined() ? bias->data_ptr() : nullptr;
  kernels().layer_norm_forward(shape, x.data_ptr(), weight.data_ptr(), bias_ptr, y.data_ptr(), mean.data_ptr<float>(),
                               rstd.data_ptr<float>(), static_cast<float>(eps));
  return {y, mean, rstd};
}

void check_backward_inputs(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& stats) {
  check_cpu_contiguous(dy, "dy");
  check_cpu_contiguous(stats, "rstd");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "dy ", dy.sizes(), " ",
              dy.scalar_type(), " must match x ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == x.size(0), "row statistics must be float32 [rows]");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight) {
  const NormShape shape = norm_shape(x, weight, c10::nullopt);
  check_backward_inputs(dy, x, rstd);
  check_backward_inputs(dy, x, mean);
  at::Tensor dx = empty_output(x), dweight = at::empty_like(weight), dbias = at::empty_like(weight);
  at::Tensor workspace = at::empty({2 * shape.num_threads * shape.cols}, x.options().dtype(at::kFloat));
  kernels().layer_norm_backward(shape, dy.data_ptr(), x.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                weight.data_ptr(), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
                                workspace.data_ptr<float>());
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const NormShape shape = norm_shape(x, weight, c10::nullopt);
  at::Tensor y = empty_output(x), rstd = row_stats(x);
  kernels().rms_norm_forward(shape, x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(),
                             static_cast<float>(eps));
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                                     const at::Tensor& weight) {
  const NormShape shape = norm_shape(x, weight, c10::nullopt);
  check_backward_inputs(dy, x, rstd);
  at::Tensor dx = empty_output(x), dweight = at::empty_like(weight);
  at::Tensor workspace = at::empty({shape.num_threads * shape.cols}, x.options().dtype(at::kFloat));
  kernels().rms_norm_backward(shape, dy.data_ptr(), x.data_ptr(), rstd.data_ptr<float>(), weight.data_ptr(),
                              dx.data_ptr(), dweight.data_ptr(), workspace.data_ptr<float>());
  return {dx, dweight};
}

}  // namespace
}  // namespace megalite::cpu

TORCH_LIBRARY(megalite, m) {
  m.def("adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "int step, float lr, float beta1, float beta2, float eps, float weight_decay, bool adam_w_mode) -> ()");
  m.def("adam_step_master(Tensor(a!)[] model_params, Tensor[] grads, Tensor(b!)[] master_params, "
        "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!) found_inf, int step, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, bool adam_w_mode, float grad_scale, bool check_finite) -> ()");
  m.def("layer_norm_forward(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor weight) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor rstd, Tensor weight) -> (Tensor, Tensor)");
  // CUDA only (csrc/cuda/swiglu.cu): on a CPU, PyTorch's own vectorized silu and mul run (ops/swiglu.py).
  m.def("swiglu_forward(Tensor h) -> Tensor");
  m.def("swiglu_backward(Tensor dy, Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(megalite, CPU, m) {
  m.impl("adam_step", &megalite::cpu::adam_step);
  m.impl("adam_step_master", &megalite::cpu::adam_step_master);
  m.impl("layer_norm_forward", &megalite::cpu::layer_norm_forward);
  m.impl("layer_norm_backward", &megalite::cpu::layer_norm_backward);
  m.impl("rms_norm_forward", &megalite::cpu::rms_norm_forward);
  m.impl("rms_norm_backward", &megalite::cpu::rms_norm_backward);
}

// -- the Python module: importing it registers the operators above; isa()/set_isa() expose the
//    instruction-set choice so tests can run both kernel tables; output_cache_stats() and
//    set_output_cache_limit() the norm outputs' cache (cpu/output_cache.h); set_stream_min_bytes()
//    the size from which outputs are written with streaming stores.
namespace {

PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(megalite::cpu::kernels().isa); }

PyObject* set_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  using megalite::cpu::active_table;
  const std::string isa = name;
  if (isa == "auto") {
    active_table = nullptr;
  } else if (isa == "generic") {
    active_table = &megalite::cpu::generic_kernels();
  } else if (isa == "avx2" && megalite::cpu::cpu_has_avx2()) {
    active_table = &megalite::cpu::avx2_kernels();
  } else if (isa == "avx512" && megalite::cpu::cpu_has_avx512()) {
    active_table = &megalite::cpu::avx512_kernels();
  } else if (isa == "avx2" || isa == "avx512") {
    PyErr_Format(PyExc_ValueError, "isa %s: this CPU lacks %s; it runs 'generic'%s", name,
                 isa == "avx2" ? "AVX2 or FMA" : "one of AVX-512 F, BW, DQ, VL",
                 megalite::cpu::cpu_has_avx2() ? " and 'avx2'" : "");
    return nullptr;
  } else {
    PyErr_Format(PyExc_ValueError, "isa %s is not one of auto, generic, avx2, avx512", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// The cache reads MEGALITE_CPU_OUTPUT_CACHE_MB on first use and throws on a bad value: as a Python
// error here (a C++ exception must not cross the C API).
template <typename Fn>
PyObject* raising_runtime_error(const Fn& fn) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* output_cache_stats(PyObject*, PyObject*) {
  return raising_runtime_error([] {
    const megalite::cpu::OutputCacheStats s = megalite::cpu::output_cache_stats();
    return Py_BuildValue("{sLsLsLsLsL}", "cached_bytes", static_cast<long long>(s.cached_bytes), "cached_blocks",
                         static_cast<long long>(s.cached_blocks), "limit_bytes", static_cast<long long>(s.limit_bytes),
                         "hits", static_cast<long long>(s.hits), "misses", static_cast<long long>(s.misses));
  });
}

// A Python int that counts bytes: false (with a Python error set) unless it is one and >= 0.
bool byte_count(PyObject* arg, const char* what, long long& bytes) {
  bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return false;
  if (bytes < 0) {
    PyErr_Format(PyExc_ValueError, "%s must be >= 0 bytes, got %lld", what, bytes);
    return false;
  }
  return true;
}

PyObject* set_output_cache_limit(PyObject*, PyObject* arg) {
  long long bytes;
  if (!byte_count(arg, "output cache limit", bytes)) return nullptr;
  return raising_runtime_error([bytes] {
    megalite::cpu::set_output_cache_limit(static_cast<size_t>(bytes));
    Py_RETURN_NONE;
  });
}

PyObject* set_stream_min_bytes(PyObject*, PyObject* arg) {
  long long bytes;
  if (!byte_count(arg, "stream_min_bytes", bytes)) return nullptr;
  const long long previous = megalite::cpu::stream_min_bytes;
  megalite::cpu::stream_min_bytes = bytes;
  return PyLong_FromLongLong(previous);
}

PyMethodDef methods[] = {
    {"isa", isa, METH_NOARGS, "The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'generic'."},
    {"set_isa", set_isa, METH_O, "Use 'generic', 'avx2', 'avx512' (each only where the CPU has it) or 'auto' (the best it has) kernels."},
    {"output_cache_stats", output_cache_stats, METH_NOARGS,
     "The CPU norm outputs' cache: cached_bytes/cached_blocks (unused, kept), limit_bytes, hits, misses."},
    {"set_output_cache_limit", set_output_cache_limit, METH_O,
     "Keep at most this many bytes of unused norm-output blocks (0: none, and release the cached ones)."},
    {"set_stream_min_bytes", set_stream_min_bytes, METH_O,
     "Write outputs (norm y/dx, master-mode Adam's half params) of at least this many bytes with streaming "
     "stores; returns the previous value."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "megalite CPU kernels (torch.ops.megalite.*)", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }

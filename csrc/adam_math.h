// The Adam/AdamW update of one element, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
// It mirrors megalite/optim/adam.py's reference, which is written as torch.optim.AdamW computes it.
// On the CPU the operations are torch's, each rounded once, so the result agrees with torch to
// float32 round-off.  The CUDA build uses --use_fast_math (setup.py), which would make the division
// and the square root approximate; adam_update therefore spells them with the correctly rounded
// intrinsics __fdiv_rn and __fsqrt_rn, which fast math leaves alone.  Two effects of fast math remain
// on the GPU: multiply-adds may be fused (one rounding instead of two) and denormal values (an
// exp_avg_sq below 1.2e-38, a gradient below ~1e-19) are flushed to zero -- so the CUDA update
// agrees with torch to a few float32 ulps, not bit for bit.  No torch headers here.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MEGALITE_HOST_DEVICE __host__ __device__
#else
#define MEGALITE_HOST_DEVICE
#endif

namespace megalite {

// Step-dependent scalars, computed once per call on the host in double and rounded to float the way
// torch rounds Python scalars into an fp32 tensor op.
struct AdamHyper {
  float beta2;
  float one_minus_beta1;         // lerp weight of the first moment
  float one_minus_beta2;
  float eps;
  float l2_weight_decay;         // Adam:  g += wd * p        (0 in AdamW mode)
  float decay_factor;            // AdamW: p *= 1 - lr * wd   (1 in Adam mode)
  float step_size;               // lr / (1 - beta1^t)
  float bias_correction2_sqrt;   // sqrt(1 - beta2^t)
};

inline AdamHyper make_adam_hyper(long step, double lr, double beta1, double beta2, double eps, double weight_decay,
                                 bool adam_w_mode) {
  AdamHyper h;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.l2_weight_decay = adam_w_mode ? 0.f : static_cast<float>(weight_decay);
  h.decay_factor = adam_w_mode ? static_cast<float>(1.0 - lr * weight_decay) : 1.f;
  h.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  h.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  return h;
}

// p, m, v: the fp32 parameter (or master), first and second moment; g: the fp32 (unscaled) gradient.
// Branch-free (both decay forms by their neutral values) so that the loops around it vectorize.
MEGALITE_HOST_DEVICE inline void adam_update(float& p, float& m, float& v, float g, const AdamHyper& h) {
  g += h.l2_weight_decay * p;        // Adam: L2 penalty through the gradient (torch.optim.Adam)
  p *= h.decay_factor;               // AdamW: decoupled decay (Loshchilov & Hutter 2019, Alg. 2 line 12)
  // m <- lerp(m, g, 1 - beta1) in the form torch's lerp takes for weights below 0.5 (every beta1 > 0.5).
  m += h.one_minus_beta1 * (g - m);
  v = v * h.beta2 + h.one_minus_beta2 * g * g;
#if defined(__CUDA_ARCH__)
  const float denom = __fdiv_rn(__fsqrt_rn(v), h.bias_correction2_sqrt) + h.eps;
  p = p - h.step_size * __fdiv_rn(m, denom);
#else
  const float denom = sqrtf(v) / h.bias_correction2_sqrt + h.eps;
  p = p - h.step_size * (m / denom);
#endif
}

}  // namespace megalite

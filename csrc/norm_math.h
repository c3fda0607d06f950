// LayerNorm / RMSNorm per-element formulas shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
// Statistics are fp32 whatever the storage type.  No torch headers here.
//
// Forward, per row of length n (Ba et al. 2016; Zhang & Sennrich 2019):
//   LayerNorm: mean = sum(x)/n, var = sum((x - mean)^2)/n, rstd = 1/sqrt(var + eps),
//              xhat = (x - mean) * rstd,  y = xhat * w + b
//   RMSNorm:   rstd = 1/sqrt(sum(x^2)/n + eps),  xhat = x * rstd,  y = xhat * w
// Backward, with g = dy * w (the gradient reaching xhat):
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat))
//   dw = sum over rows of dy * xhat,  db = sum over rows of dy
#pragma once

#include "adam_math.h"   // MEGALITE_HOST_DEVICE

namespace megalite {

MEGALITE_HOST_DEVICE inline float layer_norm_dx(float g, float xhat, float mean_g, float mean_g_xhat, float rstd) {
  return rstd * (g - mean_g - xhat * mean_g_xhat);
}

MEGALITE_HOST_DEVICE inline float rms_norm_dx(float g, float xhat, float mean_g_xhat, float rstd) {
  return rstd * (g - xhat * mean_g_xhat);
}

// Running mean and sum of squared deviations (Welford 1962); two partial results of counts na, nb
// merge exactly as Chan et al. 1979 (Eq. 2.1b), which is how the CUDA kernels combine lanes and warps.
struct Welford {
  float mean = 0.f;
  float m2 = 0.f;     // sum of squared deviations from mean
  float count = 0.f;
};

MEGALITE_HOST_DEVICE inline void welford_add(Welford& w, float x) {
  w.count += 1.f;
  const float delta = x - w.mean;
  w.mean += delta / w.count;
  w.m2 += delta * (x - w.mean);
}

MEGALITE_HOST_DEVICE inline Welford welford_merge(const Welford& a, const Welford& b) {
  if (b.count == 0.f) return a;
  if (a.count == 0.f) return b;
  Welford out;
  out.count = a.count + b.count;
  const float delta = b.mean - a.mean;
  const float b_share = b.count / out.count;
  out.mean = a.mean + delta * b_share;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  return out;
}

}  // namespace megalite

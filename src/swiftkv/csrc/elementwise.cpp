// The prefill's elementwise work between products, fused into single passes (modeling/kernels.py).
//
// Why: eager PyTorch reads and writes a [T, intermediate] tensor once per op; for a 2048-token SmolLM2 prefill the
// MLP's SiLU, multiply and bf16 conversions were ~15% of the whole (docs/cpu.md). Here each element is read once,
// computed in float32 and written once, in the products' dtype.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "vec.h"

namespace swiftkv {

using Tensor = at::Tensor;

namespace {

inline vf silu_times(vf g, vf u) { return g / (1.f + expv(-g)) * u; }

// out [n] = silu(g) * u over lanes of T (float or bf16 bits), computed in float32.
template <class T>
void silu_mul_range(const T* g, const T* u, T* out, int64_t n) {
  auto load = [](const T* p) {
    if constexpr (std::is_same_v<T, float>) return loadv(p);
    else return load_bf16(p);
  };
  auto store = [](T* p, vf v) {
    if constexpr (std::is_same_v<T, float>) storev(p, v);
    else store_bf16(p, v);
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) store(out + i, silu_times(load(g + i), load(u + i)));
  if (i < n) {  // the tail through a padded vector: the same arithmetic as every other lane
    T gt[W] = {}, ut[W] = {}, ot[W];
    std::copy(g + i, g + n, gt);
    std::copy(u + i, u + n, ut);
    store(ot, silu_times(load(gt), load(ut)));
    std::copy(ot, ot + (n - i), out + i);
  }
}

}  // namespace

// silu(g) * u for g, u of one shape, both float32 or both bf16; the result in their dtype (bf16: rounded once).
Tensor silu_mul(const Tensor& g, const Tensor& u) {
  TORCH_CHECK(g.sizes() == u.sizes() && g.scalar_type() == u.scalar_type() &&
                  (g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16),
              "silu_mul: g and u of one shape, both float32 or both bfloat16");
  const Tensor gc = g.contiguous(), uc = u.contiguous();
  Tensor out = at::empty_like(gc);
  const int64_t n = gc.numel(), grain = 16 * 1024;
  at::parallel_for(0, (n + grain - 1) / grain, 1, [&](int64_t lo, int64_t hi) {
    const int64_t start = lo * grain, count = std::min(hi * grain, n) - start;
    if (gc.scalar_type() == at::kFloat) {
      silu_mul_range(gc.data_ptr<float>() + start, uc.data_ptr<float>() + start, out.data_ptr<float>() + start, count);
    } else {
      auto bits = [start](const Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()) + start; };
      silu_mul_range<uint16_t>(bits(gc), bits(uc), bits(out), count);
    }
  });
  return out;
}

}  // namespace swiftkv

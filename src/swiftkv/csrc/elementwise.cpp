// The prefill's elementwise work between products, fused into single passes (modeling/kernels.py), and the
// dequantization of int8 / int4 blocks before a prefill's product (weights.py).
//
// Why: eager PyTorch reads and writes a [T, intermediate] tensor once per op; for a 2048-token SmolLM2 prefill the
// MLP's SiLU, multiply and bf16 conversions were ~15% of the whole (docs/cpu.md). Here each element is read once,
// computed in float32 and written once, in the products' dtype.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
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

// One row of RoPE: out = x * cos + rotate_half(x) * sin over Dh = 2 * half lanes. Each product and the sum rounded
// on its own (no fused multiply-add), as PyTorch's separate ops round them: the families' apply_rotary_pos_emb bit for
// bit. rotate_half(x) = (-x2, x1), and (-a) * b + c == c - a * b exactly.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void rope_row(const float* x, const float* cos, const float* sin, float* out, int64_t half) {
  int64_t i = 0;
  for (; i + W <= half; i += W) {  // vectors by hand: GCC leaves the loop below scalar under this pragma
    const vf lo = loadv(x + i), hi = loadv(x + half + i);
    storev(out + i, lo * loadv(cos + i) - hi * loadv(sin + i));
    storev(out + half + i, hi * loadv(cos + half + i) + lo * loadv(sin + half + i));
  }
  for (; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}
#pragma GCC pop_options

}  // namespace

// RoPE of a prefill's queries or keys: x [B, heads, T, Dh] (any strides but a contiguous last dim, float32), cos and
// sin [B or 1, T, Dh] -> a new contiguous [B, heads, T, Dh], in one pass instead of eager PyTorch's six.
Tensor prefill_rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "prefill_rope: float32 x [B, heads, T, Dh] with a contiguous last dim of even size");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && (cos.size(0) == 1 || cos.size(0) == x.size(0)) &&
                  cos.size(1) == x.size(2) && cos.size(2) == x.size(3),
              "prefill_rope: float32 cos and sin [B or 1, T, Dh] matching x [B, heads, T, Dh]");
  const Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), Dh = x.size(3);
  Tensor out = at::empty({B, H, T, Dh}, x.options());
  const auto st = x.strides();
  const float *X = x.data_ptr<float>(), *C = c.data_ptr<float>(), *S = s.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, B * H * T, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / (H * T), h = i / T % H, t = i % T, trig = ((c.size(0) == 1 ? 0 : b) * T + t) * Dh;
      rope_row(X + b * st[0] + h * st[1] + t * st[2], C + trig, S + trig, O + i * Dh, Dh / 2);
    }
  });
  return out;
}

// Blocks as weights.py stores them, else an error naming `caller`.
void check_blocks(const Tensor& data, const Tensor& scales, const std::optional<Tensor>& mins, const char* caller) {
  const bool int4 = data.scalar_type() == at::kByte;
  TORCH_CHECK((data.scalar_type() == at::kChar || int4) && data.dim() == 2 && data.is_contiguous() &&
                  scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.size(0) == data.size(0) &&
                  scales.size(1) * QBLOCK == data.size(1) * (int4 ? 2 : 1) && mins.has_value() == int4 &&
                  (!int4 || (mins->sizes() == scales.sizes() && mins->scalar_type() == at::kHalf && mins->is_contiguous())),
              caller, ": int8 data [out, in] or uint8 [out, in / 2] (int4, with mins), float16 scales (and mins) [out, "
              "in / 32]");
}

// The float32 weight [out, in] that blocks of 32 inputs stand for (weights.py's formats): int8 data [out, in] (w = d q)
// or uint8 [out, in / 2] (int4, w = d q + m; `dequantize_block`), float16 scales d and, for int4, mins m [out, in / 32].
// One pass, each weight read once and written once (PyTorch's eager ops write and read a float32 copy more), bit for
// bit their float32 d * q (+ m).
Tensor dequantize_blocks(const Tensor& data, const Tensor& scales, const std::optional<Tensor>& mins) {
  check_blocks(data, scales, mins, "dequantize_blocks");
  const bool int4 = data.scalar_type() == at::kByte;
  const int64_t blocks = scales.numel();
  Tensor w = at::empty({scales.size(0), scales.size(1) * QBLOCK}, scales.options().dtype(at::kFloat));
  const at::Half *d = scales.data_ptr<at::Half>(), *m = int4 ? mins->data_ptr<at::Half>() : nullptr;
  const int8_t* q8 = int4 ? nullptr : data.data_ptr<int8_t>();
  const uint8_t* q4 = int4 ? data.data_ptr<uint8_t>() : nullptr;
  float* out = w.data_ptr<float>();
  at::parallel_for(0, blocks, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      dequantize_block(int4 ? nullptr : q8 + b * QBLOCK, int4 ? q4 + b * QBLOCK / 2 : nullptr, static_cast<float>(d[b]),
                       int4 ? static_cast<float>(m[b]) : 0.f, out + b * QBLOCK);
  });
  return w;
}

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

// Causal prefill attention in bf16 on AVX512-BF16: softmax(q k^T * scale) v for a whole prompt, flash-attention
// style (blocks of keys, an online softmax, the [T, T] scores never stored).
//
// Why: PyTorch's CPU flash attention runs float32 FMAs even on bf16 inputs without AMX, ~45 ms per layer of a
// 2048-token SmolLM2 prefill on two Zen 4 cores, a third of the whole prefill (docs/cpu.md). `vdpbf16ps` does twice
// the multiply-adds per instruction. The arithmetic is that of PyTorch's bf16 flash attention: q (times the scale),
// k, v and the softmax numerators rounded to bf16; scores, softmax sums and the output accumulated in float32.
//
// Shapes: q [B, H, Tq, Dh], k and v [B, Hkv, Tk, Dh] (any strides, float32; GQA: head h reads Hkv head h / (H/Hkv));
// query i sees keys 0 .. Tk - Tq + i (its own position in a cache that already holds Tk - Tq earlier tokens).
// Output [B, Tq, H, Dh], the layout transformers' attention functions return.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace swiftkv {

using Tensor = at::Tensor;

#if defined(__AVX512BF16__) && defined(__AVX512BW__)

namespace {

constexpr int64_t KB = 64;  // keys per block: 4 vectors of scores per query row
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline uint32_t bf16_bits(float f) {  // round to nearest even, as _mm512_cvtne2ps_pbh does (no NaNs here)
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return (u + 0x7fff + ((u >> 16) & 1)) >> 16;
}

inline uint32_t bf16_pair(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }

inline __m512 dp(__m512 acc, __m512i pairs, uint32_t pair) {  // acc[i] += pairs[2i] * pair[0] + pairs[2i+1] * pair[1]
  return _mm512_dpbf16_ps(acc, (__m512bh)pairs, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)));
}

// The operands in the layouts `vdpbf16ps` reads, as 32-bit pairs of bf16 along its reduction axis.
struct Packed {
  int64_t nb;                // key blocks
  std::vector<uint32_t> k;   // [B * Hkv, nb, Dh / 2, KB]: per block, per pair of dims, the KB keys
  std::vector<uint32_t> v;   // [B * Hkv, nb * KB / 2, Dh]: per pair of keys, every dim
  std::vector<uint32_t> q;   // [B * H, Tq, Dh / 2] (+ one tile of padding), times the scale
};

Packed pack(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int64_t pad_rows) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Hkv = k.size(1), Tk = k.size(2), Dh = q.size(3);
  const int64_t P = Dh / 2, nb = (Tk + KB - 1) / KB, Tp = nb * KB;
  Packed out{nb, std::vector<uint32_t>(B * Hkv * nb * P * KB), std::vector<uint32_t>(B * Hkv * Tp / 2 * Dh),
             std::vector<uint32_t>((B * H * Tq + pad_rows) * P)};
  const auto ks = k.strides(), vs = v.strides(), qs = q.strides();
  const float *K = k.data_ptr<float>(), *V = v.data_ptr<float>(), *Q = q.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const float* kh = K + bh / Hkv * ks[0] + bh % Hkv * ks[1];
      const float* vh = V + bh / Hkv * vs[0] + bh % Hkv * vs[1];
      uint32_t* kd = out.k.data() + bh * nb * P * KB;
      uint32_t* vd = out.v.data() + bh * Tp / 2 * Dh;
      for (int64_t t = 0; t < Tk; ++t)  // padding keys stay 0 (masked anyway)
        for (int64_t p = 0; p < P; ++p)
          kd[(t / KB * P + p) * KB + t % KB] = bf16_pair(kh[t * ks[2] + 2 * p * ks[3]], kh[t * ks[2] + (2 * p + 1) * ks[3]]);
      for (int64_t t = 0; t < Tk; ++t)  // padding keys' values stay 0: their weights are 0, and 0 * 0 is no NaN
        for (int64_t d = 0; d < Dh; ++d) {
          const uint32_t bits = bf16_bits(vh[t * vs[2] + d * vs[3]]);
          vd[t / 2 * Dh + d] |= t % 2 ? bits << 16 : bits;
        }
    }
  });
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const float* qh = Q + bh / H * qs[0] + bh % H * qs[1];
      for (int64_t t = 0; t < Tq; ++t)
        for (int64_t p = 0; p < P; ++p)
          out.q[(bh * Tq + t) * P + p] =
              bf16_pair(qh[t * qs[2] + 2 * p * qs[3]] * scale, qh[t * qs[2] + (2 * p + 1) * qs[3]] * scale);
    }
  });
  return out;
}

// R consecutive query rows of one head (`rows` <= R of them real) against every key they see. Row r sees keys
// 0 .. last_key + r. DV = Dh / 16 output vectors per row; R * 4 score and R * DV output accumulators in registers.
template <int DV, int R>
void attend_rows(const uint32_t* q, int64_t rows, const uint32_t* k, const uint32_t* v, int64_t last_key, float* out,
                 int64_t out_stride) {
  constexpr int Dh = 16 * DV, P = Dh / 2;
  alignas(64) float o[R][Dh] = {};      // output rows, scaled to the running maximum
  alignas(64) uint16_t weights[R][KB];  // this block's softmax numerators, bf16
  float top[R], total[R];
  std::fill(top, top + R, NEG_INF);
  std::fill(total, total + R, 0.f);
  const int64_t blocks = (last_key + rows - 1) / KB + 1;
  for (int64_t kb = 0; kb < blocks; ++kb) {
    __m512 s[R][4];  // scores [R, KB]
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
    const uint32_t* kblock = k + kb * P * KB;
    for (int p = 0; p < P; ++p) {
      __m512i keys[4];
      for (int c = 0; c < 4; ++c) keys[c] = _mm512_loadu_si512(kblock + p * KB + 16 * c);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) s[r][c] = dp(s[r][c], keys[c], q[r * P + p]);
    }
    const bool diagonal = (kb + 1) * KB - 1 > last_key;
    for (int r = 0; r < R; ++r) {
      if (diagonal) {  // keys after last_key + r get -inf, hence weight 0
        const __m512i visible = _mm512_set1_epi32(static_cast<int>(std::min<int64_t>(last_key + r - kb * KB, KB)));
        for (int c = 0; c < 4; ++c) {
          const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(16 * c), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
          s[r][c] = _mm512_mask_mov_ps(_mm512_set1_ps(NEG_INF), _mm512_cmple_epi32_mask(key, visible), s[r][c]);
        }
      }
      const float block_top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(s[r][0], s[r][1]), _mm512_max_ps(s[r][2], s[r][3])));
      const float new_top = std::max(top[r], block_top);
      const float rescale = std::exp(top[r] - new_top);  // 0 on the first block (top = -inf)
      top[r] = new_top;
      vf sum = {};
      for (int c = 0; c < 4; c += 2) {
        const vf e0 = expv(s[r][c] - new_top), e1 = expv(s[r][c + 1] - new_top);
        sum += e0 + e1;
        _mm512_storeu_si512(&weights[r][16 * c], (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
      total[r] = total[r] * rescale + hsum(sum);
      if (rescale != 1.f)
        for (int c = 0; c < DV; ++c) storev(&o[r][16 * c], loadv(&o[r][16 * c]) * rescale);
    }
    __m512 acc[R][DV];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_load_ps(&o[r][16 * c]);
    const uint32_t* vblock = v + kb * KB / 2 * Dh;
    for (int j = 0; j < KB / 2; ++j) {  // pairs of keys
      __m512i values[DV];
      for (int c = 0; c < DV; ++c) values[c] = _mm512_loadu_si512(vblock + j * Dh + 16 * c);
      for (int r = 0; r < R; ++r) {
        uint32_t pair;
        __builtin_memcpy(&pair, &weights[r][2 * j], 4);
        for (int c = 0; c < DV; ++c) acc[r][c] = dp(acc[r][c], values[c], pair);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DV; ++c) _mm512_store_ps(&o[r][16 * c], acc[r][c]);
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < DV; ++c) storev(out + r * out_stride + 16 * c, loadv(&o[r][16 * c]) * (1.f / total[r]));
}

template <int DV>
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  constexpr int R = DV <= 4 ? 6 : 3;  // 24 output accumulators
  constexpr int64_t Dh = 16 * DV, P = Dh / 2;
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Hkv = k.size(1), Tk = k.size(2);
  const Packed packed = pack(q, k, v, static_cast<float>(scale), R);
  Tensor out = at::empty({B, Tq, H, Dh}, q.options());
  float* o = out.data_ptr<float>();
  const int64_t tiles = (Tq + R - 1) / R;
  // Heads outermost: with B * H >= threads every thread gets a similar share of the causal triangle.
  at::parallel_for(0, B * H * tiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t bh = i / tiles, row = i % tiles * R, b = bh / H, h = bh % H, kvh = b * Hkv + h / (H / Hkv);
      attend_rows<DV, R>(packed.q.data() + (bh * Tq + row) * P, std::min<int64_t>(R, Tq - row),
                         packed.k.data() + kvh * packed.nb * P * KB, packed.v.data() + kvh * packed.nb * KB / 2 * Dh,
                         Tk - Tq + row, o + ((b * Tq + row) * H + h) * Dh, H * Dh);
    }
  });
  return out;
}

}  // namespace

bool has_bf16_attention() { return true; }

Tensor bf16_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0 && q.size(2) <= k.size(2),
              "bf16_attention: q [B, H, Tq, Dh], k and v [B, Hkv, Tk, Dh] with H a multiple of Hkv and Tq <= Tk");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "bf16_attention: float32 q, k, v");
  switch (q.size(3)) {
    case 64: return attention<4>(q, k, v, scale);
    case 128: return attention<8>(q, k, v, scale);
    default: TORCH_CHECK(false, "bf16_attention: head dim 64 or 128, not ", q.size(3));
  }
}

#else  // built without AVX512-BF16: Python keeps PyTorch's attention (has_bf16_attention() is false)

bool has_bf16_attention() { return false; }

Tensor bf16_attention(const Tensor&, const Tensor&, const Tensor&, double) {
  TORCH_CHECK(false, "bf16_attention: this build has no AVX512-BF16");
}

#endif

}  // namespace swiftkv

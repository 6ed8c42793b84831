// The decode step of a SwiftKV (or base) Llama-family model as one native call per token.
//
// Why: at batch 1 on a CPU, eager PyTorch spends ~7 ms per token issuing ~1,900 small ops (norms, RoPE, residuals)
// and its matrix-vector products stay below the memory bandwidth (docs/decode.md). Here every layer runs as plain
// loops over float32 buffers, ending with the LM head: the products read each weight row once for the whole batch
// (at::parallel_for over rows, torch's own OpenMP thread pool: the extension must be built with -fopenmp, see
// native.py), the products that share an input share one parallel region, everything else is fused. Same formulas
// and order as the stock layers; sums are reordered (and attention's exp is a vector polynomial, ~1 ulp), so results
// agree with the Python step to float32 rounding (tests/test_native.py).
//
// Weights come in four formats (swiftkv/modeling/weights.py): float32, bf16, and GGUF-style blocks of 32 inputs
// with a float16 scale (int8: w = d q; int4: w = d q + m). Products read them as they are stored. float32 and bf16
// weights multiply float32 activations; int8 and int4 blocks multiply the activations rounded to 8-bit blocks, in
// integers, as llama.cpp does (quantize_input): the one place the arithmetic of a quantized format differs.
//
// Shapes: B sequences, one new token each; D hidden, H query heads, Hkv key/value heads, Dh head dim, S = past + 1
// attended positions. Cache buffers are [B, Hkv, capacity, Dh]; this step writes position `past`.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <c10/util/Half.h>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <cmath>
#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <vector>

#include "vec.h"

namespace {

using namespace swiftkv;

using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

inline float dot(const float* a, const float* b, int64_t n) {
  vf s0 = {}, s1 = {}, s2 = {}, s3 = {};  // four independent FMA chains
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 += loadv(a + i) * loadv(b + i);
    s1 += loadv(a + i + W) * loadv(b + i + W);
    s2 += loadv(a + i + 2 * W) * loadv(b + i + 2 * W);
    s3 += loadv(a + i + 3 * W) * loadv(b + i + 3 * W);
  }
  for (; i + W <= n; i += W) s0 += loadv(a + i) * loadv(b + i);
  float r = hsum((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// x [n] = exp(x - shift) for a shift no smaller than any x (a softmax's maximum), returns the sum.
inline float exp_shifted(float* x, int64_t n, float shift) {
  vf total = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf e = exp_nonpositive(loadv(x + i) - shift);
    storev(x + i, e);
    total += e;
  }
  float sum = hsum(total);
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

// o [DH] = scale * sum_s p[s] v[s, :] with the accumulator in registers (head dims 64 and 128).
template <int DH>
inline void weighted_sum(const float* p, float scale, const float* v, int64_t S, float* o) {
  vf acc[DH / W] = {};
  for (int64_t s = 0; s < S; ++s)
    for (int j = 0; j < DH / W; ++j) acc[j] += p[s] * loadv(v + s * DH + W * j);
  for (int j = 0; j < DH / W; ++j) storev(o + W * j, acc[j] * scale);
}

// o [n] += p * v [n]
inline void axpy(float p, const float* v, float* o, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) storev(o + i, loadv(o + i) + p * loadv(v + i));
  for (; i < n; ++i) o[i] += p * v[i];
}

constexpr int64_t BLOCK = 32;  // inputs per scale of the int8 / int4 formats

// A weight [out, in] in one of the formats of weights.py, told apart by the data's dtype: float32, bfloat16, int8
// (blocks: int8 [out, in] + float16 scales [out, in / 32]) or uint8 (int4 blocks: [out, in / 2], per block byte j
// holds input j in its low nibble and input j + 16 in its high one, + float16 scales and minimums [out, in / 32]).
// The raw pointers are taken once: Tensor::data_ptr checks the dtype on every call, ~9% of a decode step when
// called per row.
struct Matrix {
  enum Kind { F32, BF16, Q8, Q4 } kind = F32;
  Tensor data, scales, mins;
  int64_t rows = 0, cols = 0;
  const void* values = nullptr;
  const at::Half *scale = nullptr, *min = nullptr;
  bool defined() const { return data.defined(); }
  bool blocks() const { return kind == Q8 || kind == Q4; }  // products take x rounded to 8-bit blocks (Q8Input)
  template <typename T>
  const T* row(int64_t o, int64_t bytes_per_row) const {
    return reinterpret_cast<const T*>(static_cast<const char*>(values) + o * bytes_per_row);
  }
};

Matrix make_matrix(Tensor data, OptTensor scales, OptTensor mins) {
  TORCH_CHECK(data.is_contiguous() && (!scales || scales->is_contiguous()) && (!mins || mins->is_contiguous()),
              "weights must be contiguous");
  Matrix m{Matrix::F32, data, scales.value_or(Tensor()), mins.value_or(Tensor()), data.size(0), data.size(1),
           data.data_ptr()};
  switch (data.scalar_type()) {
    case at::kFloat: break;
    case at::kBFloat16: m.kind = Matrix::BF16; break;
    case at::kChar: m.kind = Matrix::Q8; break;
    case at::kByte: m.kind = Matrix::Q4; break;
    default: TORCH_CHECK(false, "weights: float32, bf16, int8 or uint8 (int4 blocks), got ", data.scalar_type());
  }
  if (m.blocks()) {
    TORCH_CHECK(m.scales.defined() && m.scales.scalar_type() == at::kHalf, "quantized weights need float16 scales");
    TORCH_CHECK(m.kind == Matrix::Q8 || (m.mins.defined() && m.mins.scalar_type() == at::kHalf), "int4: float16 mins");
    m.cols = m.scales.size(1) * BLOCK;
    m.scale = m.scales.data_ptr<at::Half>();
    m.min = m.kind == Matrix::Q4 ? m.mins.data_ptr<at::Half>() : nullptr;
  }
  return m;
}

using MatrixArgs = std::tuple<Tensor, OptTensor, OptTensor>;  // (data, scales, mins) as Python passes them

Matrix make_matrix(const MatrixArgs& args) {
  return make_matrix(std::get<0>(args), std::get<1>(args), std::get<2>(args));
}

// A block's float16 scale as float: one F16C instruction where the build has it (c10's portable conversion is a
// dozen integer operations, paid twice per int4 block).
inline float half(const at::Half* p) {
#if defined(__F16C__)
  return _cvtsh_ss(p->x);
#else
  return static_cast<float>(*p);
#endif
}

inline float dot_bf16(const uint16_t* a, const float* b, int64_t n) {
  vf s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 += load_bf16(a + i) * loadv(b + i);
    s1 += load_bf16(a + i + W) * loadv(b + i + W);
  }
  for (; i + W <= n; i += W) s0 += load_bf16(a + i) * loadv(b + i);
  float r = hsum(s0 + s1);
  for (uint32_t bits; i < n; ++i) {
    bits = static_cast<uint32_t>(a[i]) << 16;
    float w;
    __builtin_memcpy(&w, &bits, sizeof(w));
    r += w * b[i];
  }
  return r;
}

// Integer block products. A quantized product first rounds its input x to 8-bit blocks, as llama.cpp does
// (quantize_input: x ~ dx * qx per 32 inputs, qx in [-127, 127]), then sums each block's qw . qx in int32 (exact)
// and scales it by dw * dx in float32. Per 32 weights that is one or two integer multiply-adds (VNNI's dpbusd,
// or AVX2's maddubs + madd) instead of a widening to float32 per 8 or 16 weights: decode streams every weight per
// token, and widening cost more than the memory did (docs/cpu.md, Decode). The u8 x s8 instructions take the
// weight as the unsigned operand: int4's nibbles are, int8's are made so with the sign moved onto x.

// x [rows, n] in 8-bit blocks: q int8 [rows, n], d [rows, n / 32] (x ~ d q), sum [rows, n / 32] (d sum(q): the
// rounded x's block sums, which int4's minimums multiply).
struct Q8Input {
  std::vector<int8_t> q;
  std::vector<float> d, sum;
};

// llama.cpp's quantize_row_q8_0 (d = max |x| / 127, q = round(x / d)), with d kept in float32. int4's minimum m
// multiplies the ROUNDED x's block sum, as llama.cpp's q8_1 does: then a product is exactly the dequantized weight
// times the rounded x, whose error sum_j w_j e_j is int8's. With x's exact sum the error is sum_j (w_j - m) e_j, and
// |w - m| runs up to twice |w|: measured, KL to float32 3x int8's over a decode, where Q4_1's weights were exact.
Q8Input quantize_input(const float* x, int64_t rows, int64_t n) {
  const int64_t blocks = rows * n / BLOCK;
  Q8Input in{std::vector<int8_t>(rows * n), std::vector<float>(blocks), std::vector<float>(blocks)};
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * BLOCK;
    float amax = 0.f;
    for (int j = 0; j < BLOCK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, inverse = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int j = 0; j < BLOCK; ++j) sum += in.q[b * BLOCK + j] = static_cast<int8_t>(std::nearbyint(xb[j] * inverse));
    in.d[b] = d;
    in.sum[b] = d * static_cast<float>(sum);
  }
  return in;
}

#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
// 16 int32 lanes, each the sum of 4 products u8 * s8 (maddubs' int16 pairs cannot saturate: here u <= 128 and
// |s| <= 127).
inline __m512i dot_u8s8(__m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
#endif
}

// [dw_b dx_b] in lanes 0-7, [dw_b+1 dx_b+1] in lanes 8-15: the scales of two blocks' int32 sums (dot_u8s8's lanes).
inline __m512 pair_scales(const at::Half* d, const float* xd) {
  int32_t two_halves;
  __builtin_memcpy(&two_halves, d, sizeof(two_halves));
  const __m128 w = _mm_cvtph_ps(_mm_cvtsi32_si128(two_halves));
  const __m128 x = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xd)));
  const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_mul_ps(w, x)));
}

// sum over blocks of dw_b dx_b (qw_b . qx_b), two blocks per step; pair_sum(b, pair) gives the int32 lanes of blocks
// b and b + 1 (pair = false: an odd count's last block alone, the upper half's loads masked to zero).
template <typename PairSum>
inline float sum_pairs(const at::Half* d, const float* xd, int64_t blocks, PairSum pair_sum) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2)
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair_sum(b, true)), pair_scales(d + b, xd + b), acc);
  if (b < blocks)
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair_sum(b, false)), _mm512_set1_ps(half(d + b) * xd[b]), acc);
  return _mm512_reduce_add_ps(acc);
}

inline float dot_q8(const int8_t* q, const at::Half* d, const int8_t* xq, const float* xd, int64_t blocks) {
  return sum_pairs(d, xd, blocks, [&](int64_t b, bool pair) {
    const __mmask64 keep = pair ? ~0ULL : 0xFFFFFFFFULL;
    const __m512i w = _mm512_maskz_loadu_epi8(keep, q + b * BLOCK), x = _mm512_maskz_loadu_epi8(keep, xq + b * BLOCK);
    const __m512i signed_x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return dot_u8s8(_mm512_abs_epi8(w), signed_x);
  });
}

// int4 blocks are 16 bytes (byte j: input j low, j + 16 high); two of them become four 128-bit lanes of nibbles,
// [low 0, high 0, low 1, high 1]: inputs 0-31 of each block in order, like the quantized x beside them.
inline float dot_q4(const uint8_t* q, const at::Half* d, const int8_t* xq, const float* xd, int64_t blocks) {
  const __m512i shifts = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0), low = _mm512_set1_epi8(15);
  return sum_pairs(d, xd, blocks, [&](int64_t b, bool pair) {
    const __m512i packed = _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(pair ? ~0U : 0xFFFFU, q + b * BLOCK / 2));
    const __m512i lanes = _mm512_shuffle_i64x2(packed, packed, _MM_SHUFFLE(1, 1, 0, 0));  // [0, 0, 1, 1]
    const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi64(lanes, shifts), low);
    return dot_u8s8(nibbles, _mm512_maskz_loadu_epi8(pair ? ~0ULL : 0xFFFFFFFFULL, xq + b * BLOCK));
  });
}
#elif defined(__AVX2__)
// 8 int32 lanes, each the sum of 4 products u8 * s8 (maddubs' int16 pairs cannot saturate: here u <= 128 and
// |s| <= 127).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// One block per step, two accumulators (each block's scaling is independent of the previous one's).
template <typename BlockSum>
inline float sum_blocks(const at::Half* d, const float* xd, int64_t blocks, BlockSum block_sum) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_sum(b)), _mm256_set1_ps(half(d + b) * xd[b]), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_sum(b + 1)), _mm256_set1_ps(half(d + b + 1) * xd[b + 1]), acc1);
  }
  if (b < blocks) acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_sum(b)), _mm256_set1_ps(half(d + b) * xd[b]), acc0);
  return hsum256(_mm256_add_ps(acc0, acc1));
}

inline float dot_q8(const int8_t* q, const at::Half* d, const int8_t* xq, const float* xd, int64_t blocks) {
  return sum_blocks(d, xd, blocks, [&](int64_t b) {
    const __m256i w = load256(q + b * BLOCK), x = load256(xq + b * BLOCK);
    return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  });
}

inline float dot_q4(const uint8_t* q, const at::Half* d, const int8_t* xq, const float* xd, int64_t blocks) {
  const __m128i low = _mm_set1_epi8(15);
  return sum_blocks(d, xd, blocks, [&](int64_t b) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * BLOCK / 2));
    const __m256i nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
    return dot_u8s8(nibbles, load256(xq + b * BLOCK));
  });
}
#else
// Portable: each block's sum in int32 (the compiler vectorizes the fixed-length loops).
inline float dot_q8(const int8_t* q, const at::Half* d, const int8_t* xq, const float* xd, int64_t blocks) {
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t sum = 0;
    for (int j = 0; j < BLOCK; ++j) sum += q[b * BLOCK + j] * xq[b * BLOCK + j];
    acc += static_cast<float>(sum) * (half(d + b) * xd[b]);
  }
  return acc;
}

inline float dot_q4(const uint8_t* q, const at::Half* d, const int8_t* xq, const float* xd, int64_t blocks) {
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* qb = q + b * BLOCK / 2;
    const int8_t* xb = xq + b * BLOCK;
    int32_t sum = 0;
    for (int j = 0; j < BLOCK / 2; ++j) sum += (qb[j] & 15) * xb[j] + (qb[j] >> 4) * xb[j + BLOCK / 2];
    acc += static_cast<float>(sum) * (half(d + b) * xd[b]);
  }
  return acc;
}
#endif

// int4's minimums: sum over blocks of m_b * xsum_b, the rounded x's block sums (8 blocks per step where F16C
// converts 8 halves at once).
inline float dot_mins(const at::Half* m, const float* xsum, int64_t blocks) {
  float offset = 0.f;
  int64_t b = 0;
#if defined(__F16C__) && defined(__AVX__)
  __m256 acc = _mm256_setzero_ps();
  for (; b + 8 <= blocks; b += 8) {
    const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b)));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(mins, _mm256_loadu_ps(xsum + b)));
  }
  offset = hsum256(acc);
#endif
  for (; b < blocks; ++b) offset += half(m + b) * xsum[b];
  return offset;
}

// x [rows, n] quantized for w's products (empty for float32 and bf16 weights, which multiply x itself).
Q8Input quantize_for(const Matrix& w, const float* x, int64_t rows) {
  if (!w.blocks()) return {};
  return quantize_input(x, rows, w.cols);
}

// Row o of w times row r of x [rows, in]; xq: x quantized for w (quantize_for).
inline float row_dot(const Matrix& w, int64_t o, const float* x, const Q8Input& xq, int64_t r) {
  const int64_t n = w.cols, blocks = n / BLOCK;
  switch (w.kind) {
    case Matrix::F32:
      return dot(w.row<float>(o, n * 4), x + r * n, n);
    case Matrix::BF16:
      return dot_bf16(w.row<uint16_t>(o, n * 2), x + r * n, n);
    case Matrix::Q8:
      return dot_q8(w.row<int8_t>(o, n), w.scale + o * blocks, xq.q.data() + r * n, xq.d.data() + r * blocks, blocks);
    case Matrix::Q4:
      return dot_q4(w.row<uint8_t>(o, n / 2), w.scale + o * blocks, xq.q.data() + r * n, xq.d.data() + r * blocks,
                    blocks) +
             dot_mins(w.min + o * blocks, xq.sum.data() + r * blocks, blocks);
  }
  return 0.f;
}

// One product y [B, out] = x [B, in] @ W^T (+ bias) of a batch that gemv_many runs together.
struct Product {
  const float* x;
  const Matrix* weight;
  const OptTensor* bias;
  float* y;
};

// Several products in ONE parallel region: the threads split the products' rows, concatenated, evenly (the K and V
// products alone are too small to keep two threads streaming at full bandwidth). Each row is read once for the batch.
void gemv_many(const std::vector<Product>& products, int64_t B) {
  std::vector<int64_t> starts{0};
  std::vector<Q8Input> inputs;
  for (const Product& p : products) {
    starts.push_back(starts.back() + p.weight->rows);
    inputs.push_back(quantize_for(*p.weight, p.x, B));
  }
  at::parallel_for(0, starts.back(), 16, [&](int64_t lo, int64_t hi) {
    for (size_t i = 0; i < products.size(); ++i) {
      const Product& p = products[i];
      const int64_t out = p.weight->rows;
      const float* b = *p.bias ? (*p.bias)->data_ptr<float>() : nullptr;
      for (int64_t o = std::max(lo, starts[i]) - starts[i]; o < std::min(hi, starts[i + 1]) - starts[i]; ++o)
        for (int64_t r = 0; r < B; ++r) p.y[r * out + o] = row_dot(*p.weight, o, p.x, inputs[i], r) + (b ? b[o] : 0.f);
    }
  });
}

void gemv(const float* x, int64_t B, const Matrix& weight, const OptTensor& bias, float* y) {
  gemv_many({{x, &weight, &bias, y}}, B);
}

// y [rows, n] = RMSNorm(x) * weight, computed like the families' RMSNorm (mean of squares, rsqrt, scale).
void rms_norm(const float* x, int64_t rows, int64_t n, const Tensor& weight, double eps, float* y) {
  const float* w = weight.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    const float scale = 1.f / std::sqrt(dot(xr, xr, n) / n + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) yr[i] = w[i] * (xr[i] * scale);
  }
}

// rms_norm over the last dim of x [..., n] for a prefill (rows in parallel), float32.
Tensor rms_norm_rows(const Tensor& x, const Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                  x.size(-1) == weight.size(0),
              "rms_norm: float32 x [..., n] and weight [n]");
  const Tensor xc = x.contiguous(), w = weight.contiguous();
  Tensor y = at::empty_like(xc);
  const int64_t n = w.size(0), rows = xc.numel() / n;
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    rms_norm(xc.data_ptr<float>() + lo * n, hi - lo, n, w, eps, y.data_ptr<float>() + lo * n);
  });
  return y;
}

// RoPE in place on [B, heads, Dh] with cos/sin [B, Dh]: x*cos + rotate_half(x)*sin.
void rope(float* x, int64_t B, int64_t heads, int64_t dh, const float* cos, const float* sin) {
  const int64_t half = dh / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (b * heads + h) * dh;
      const float* c = cos + b * dh;
      const float* s = sin + b * dh;
      for (int64_t i = 0; i < half; ++i) {
        const float lo = v[i], hi = v[i + half];
        v[i] = lo * c[i] - hi * s[i];
        v[i + half] = hi * c[i + half] + lo * s[i + half];
      }
    }
}

struct Layer {
  Tensor input_norm, post_norm;
  Matrix q, k, v, o, gate, up, down;  // k/v empty when the layer reads its leader's K/V
  OptTensor q_bias, k_bias, v_bias, o_bias, q_norm, k_norm;
  double eps, scaling;
  bool swiftkv;  // K/V (if computed here) come from norm_swiftkv(h_L) instead of this layer's input
};

class Runtime {
 public:
  Runtime(int64_t heads, int64_t kv_heads, int64_t head_dim, Tensor final_norm, double final_eps,
          const MatrixArgs& lm_head, OptTensor lm_head_bias)
      : heads_(heads),
        kv_heads_(kv_heads),
        head_dim_(head_dim),
        final_norm_(final_norm),
        final_eps_(final_eps),
        lm_head_(make_matrix(lm_head)),
        lm_head_bias_(lm_head_bias) {}

  void set_swiftkv_norm(Tensor weight, double eps) {
    swiftkv_norm_ = weight;
    swiftkv_eps_ = eps;
  }

  // products: [q, o, gate, up, down], each (data, scales, mins) as make_matrix takes them.
  void add_layer(Tensor input_norm, Tensor post_norm, std::vector<MatrixArgs> products, std::optional<MatrixArgs> k,
                 std::optional<MatrixArgs> v, OptTensor q_bias, OptTensor k_bias, OptTensor v_bias, OptTensor o_bias,
                 OptTensor q_norm, OptTensor k_norm, double eps, double scaling, bool swiftkv) {
    TORCH_CHECK(products.size() == 5, "add_layer: products = [q, o, gate, up, down]");
    std::vector<Matrix> m;
    for (const MatrixArgs& args : products) m.push_back(make_matrix(args));
    Layer l{input_norm, post_norm, m[0], k ? make_matrix(*k) : Matrix(), v ? make_matrix(*v) : Matrix(), m[1], m[2],
            m[3], m[4], q_bias, k_bias, v_bias, o_bias, q_norm, k_norm, eps, scaling, swiftkv};
    layers_.push_back(std::move(l));
  }

  // hidden [B, D] (the token embeddings); cos/sin [B, Dh]; mask [B, S] additive or None; keys/values: one
  // [B, Hkv, capacity, Dh] buffer per layer (a non-leader gets its leader's). Returns the logits [B, V].
  // first > 0 (a SwiftKV prefill's kept token): hidden is the input of layer `first`, a SwiftKV layer, and layers
  // first.. read the K/V the prefill already cached through position `past` (none are computed or written).
  Tensor step(Tensor hidden, Tensor cos, Tensor sin, OptTensor mask, std::vector<Tensor> keys,
              std::vector<Tensor> values, int64_t past, int64_t first) {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "one K/V buffer per layer");
    TORCH_CHECK(first == 0 || (first < static_cast<int64_t>(layers_.size()) && layers_[first].swiftkv),
                "step: `first` must be 0 or a SwiftKV layer");
    hidden = hidden.contiguous().clone();
    const int64_t B = hidden.size(0), D = hidden.size(1);
    const int64_t q_dim = heads_ * head_dim_, kv_dim = kv_heads_ * head_dim_;
    auto opts = hidden.options();
    Tensor x = at::empty({B, D}, opts), swift = at::empty({B, D}, opts), q = at::empty({B, q_dim}, opts);
    Tensor k = at::empty({B, kv_dim}, opts), v = at::empty({B, kv_dim}, opts), att = at::empty({B, q_dim}, opts);
    const int64_t inter = layers_.empty() ? 0 : layers_[0].gate.rows;
    Tensor act = at::empty({B, inter}, opts), tmp = at::empty({B, D}, opts);
    float* h = hidden.data_ptr<float>();
    bool have_swift = false;
    for (size_t i = first; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      float* xp = x.data_ptr<float>();
      rms_norm(h, B, D, l.input_norm, l.eps, xp);
      const bool own_kv = l.k.defined() && first == 0;
      if (own_kv && l.swiftkv && !have_swift) {  // norm_swiftkv(h_L): the K/V input of every later layer
        rms_norm(h, B, D, swiftkv_norm_, swiftkv_eps_, swift.data_ptr<float>());
        have_swift = true;
      }
      if (own_kv) {
        const float* src = l.swiftkv ? swift.data_ptr<float>() : xp;
        gemv_many({{xp, &l.q, &l.q_bias, q.data_ptr<float>()}, {src, &l.k, &l.k_bias, k.data_ptr<float>()},
                   {src, &l.v, &l.v_bias, v.data_ptr<float>()}}, B);
        store_kv(l, B, k.data_ptr<float>(), v.data_ptr<float>(), cos, sin, keys[i], values[i], past);
      } else {
        gemv(xp, B, l.q, l.q_bias, q.data_ptr<float>());
      }
      if (l.q_norm) rms_norm(q.data_ptr<float>(), B * heads_, head_dim_, *l.q_norm, l.eps, q.data_ptr<float>());
      rope(q.data_ptr<float>(), B, heads_, head_dim_, cos.data_ptr<float>(), sin.data_ptr<float>());
      attend(q.data_ptr<float>(), keys[i], values[i], mask, past + 1, l.scaling, B, att.data_ptr<float>());
      add_projection(att.data_ptr<float>(), B, l.o, l.o_bias, tmp.data_ptr<float>(), h);
      rms_norm(h, B, D, l.post_norm, l.eps, xp);
      mlp(l, xp, B, act.data_ptr<float>(), tmp.data_ptr<float>(), h);
    }
    rms_norm(h, B, D, final_norm_, final_eps_, x.data_ptr<float>());
    Tensor logits = at::empty({B, lm_head_.rows}, opts);  // our product streams the head ~15% faster than oneDNN
    gemv(x.data_ptr<float>(), B, lm_head_, lm_head_bias_, logits.data_ptr<float>());
    return logits;
  }

 private:
  // This token's projected K, V [B, Hkv * Dh]: per-head k_norm, RoPE on K, then written at `past` in the cache.
  void store_kv(const Layer& l, int64_t B, float* k, float* v, const Tensor& cos, const Tensor& sin,
                Tensor& key_cache, Tensor& value_cache, int64_t past) const {
    if (l.k_norm) rms_norm(k, B * kv_heads_, head_dim_, *l.k_norm, l.eps, k);
    rope(k, B, kv_heads_, head_dim_, cos.data_ptr<float>(), sin.data_ptr<float>());
    const int64_t capacity = key_cache.size(2);
    float* kc = key_cache.data_ptr<float>();
    float* vc = value_cache.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < kv_heads_; ++h) {
        const int64_t at = ((b * kv_heads_ + h) * capacity + past) * head_dim_;
        const int64_t from = (b * kv_heads_ + h) * head_dim_;
        std::copy(k + from, k + from + head_dim_, kc + at);
        std::copy(v + from, v + from + head_dim_, vc + at);
      }
  }

  // out [B, H*Dh] = softmax(q K^T * scaling + mask) V per query head over S cached positions (GQA: head h reads
  // key/value head h / (H / Hkv)).
  void attend(const float* q, const Tensor& key_cache, const Tensor& value_cache, const OptTensor& mask, int64_t S,
              double scaling, int64_t B, float* out) const {
    const int64_t capacity = key_cache.size(2), group = heads_ / kv_heads_, dh = head_dim_;
    const float* kc = key_cache.data_ptr<float>();
    const float* vc = value_cache.data_ptr<float>();
    const float* m = mask ? mask->data_ptr<float>() : nullptr;
    at::parallel_for(0, B * heads_, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scores(S);
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / heads_, kvh = (bh % heads_) / group;
        const float* qv = q + bh * dh;
        const float* keys = kc + (b * kv_heads_ + kvh) * capacity * dh;
        const float* vals = vc + (b * kv_heads_ + kvh) * capacity * dh;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < S; ++s) {
          scores[s] = dot(qv, keys + s * dh, dh) * static_cast<float>(scaling) + (m ? m[b * S + s] : 0.f);
          top = std::max(top, scores[s]);
        }
        const float total = exp_shifted(scores.data(), S, top);
        float* o = out + bh * dh;
        if (dh == 64) {
          weighted_sum<64>(scores.data(), 1.f / total, vals, S, o);
        } else if (dh == 128) {
          weighted_sum<128>(scores.data(), 1.f / total, vals, S, o);
        } else {
          std::fill(o, o + dh, 0.f);
          for (int64_t s = 0; s < S; ++s) axpy(scores[s] / total, vals + s * dh, o, dh);
        }
      }
    });
  }

  // h += x @ W^T (+ bias), through `tmp` [B, out].
  static void add_projection(const float* x, int64_t B, const Matrix& w, const OptTensor& bias, float* tmp,
                             float* h) {
    gemv(x, B, w, bias, tmp);
    const int64_t n = B * w.rows;
    for (int64_t i = 0; i < n; ++i) h[i] += tmp[i];
  }

  // h += down(silu(gate(x)) * up(x)); gate and up rows share one parallel region and the activation is applied
  // as each pair of rows is done (act [B, inter]).
  static void mlp(const Layer& l, const float* x, int64_t B, float* act, float* tmp, float* h) {
    const int64_t inter = l.gate.rows;
    const Q8Input xq = quantize_for(l.gate.blocks() ? l.gate : l.up, x, B);  // gate and up share x
    at::parallel_for(0, inter, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t o = lo; o < hi; ++o)
        for (int64_t r = 0; r < B; ++r) {
          const float g = row_dot(l.gate, o, x, xq, r), u = row_dot(l.up, o, x, xq, r);
          act[r * inter + o] = g / (1.f + std::exp(-g)) * u;
        }
    });
    add_projection(act, B, l.down, std::nullopt, tmp, h);
  }

  int64_t heads_, kv_heads_, head_dim_;
  Tensor final_norm_, swiftkv_norm_;
  double final_eps_, swiftkv_eps_ = 0.0;
  Matrix lm_head_;
  OptTensor lm_head_bias_;
  std::vector<Layer> layers_;
};

// How many threads at::parallel_for really runs here (1 when the extension was built without OpenMP: ATen's
// parallel_for is header code and silently turns serial).
int64_t parallel_threads() {
  std::atomic<int64_t> threads{0};
  at::parallel_for(0, 2 * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    int64_t seen = threads.load();
    while (seen < at::get_thread_num() + 1 && !threads.compare_exchange_weak(seen, at::get_thread_num() + 1)) {
    }
  });
  return threads.load();
}

// Multiply-adds per second this build's vectors reach on every thread at once, all operands in registers: the
// roofline the prefill's products and attention are held to (benchmarks/prefill_roofline.py). 12 independent
// accumulators per thread: enough to cover an FMA's latency on two pipes (4 cycles x 2 on Zen and Intel cores).
// Returns the floating-point operations done (2 per lane per multiply-add); the caller times the call.
double fma_peak(int64_t iterations) {
  constexpr int CHAINS = 12;
  std::atomic<int64_t> done{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      vf acc[CHAINS];
      for (int c = 0; c < CHAINS; ++c) acc[c] = vf{} + 1.f / (c + 2);
      const vf mul = vf{} + 0.999999f, add = vf{} + 1e-7f;
      for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; ++c) acc[c] = acc[c] * mul + add;
      volatile float sink = 0.f;  // a result stored, so that the loop cannot be optimized away
      for (int c = 0; c < CHAINS; ++c) sink = sink + hsum(acc[c]);
      done += iterations * CHAINS * W * 2;
    }
  });
  return static_cast<double>(done.load());
}

// y [rows, out] = x [rows, in] @ W^T (+ bias) for a weight in any format: the product of a quantized layer on a few
// rows (the LM head after prefill, the Python decode step), where dequantizing the whole weight would cost more.
Tensor linear(Tensor x, const MatrixArgs& weight, OptTensor bias) {
  const Matrix w = make_matrix(weight);
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(-1) == w.cols, "linear: float32 x [rows, ", w.cols, "]");
  const int64_t rows = x.numel() / w.cols;
  Tensor y = at::empty({rows, w.rows}, x.options());
  OptTensor b = bias ? OptTensor(bias->contiguous()) : std::nullopt;
  gemv(x.data_ptr<float>(), rows, w, b, y.data_ptr<float>());
  return y;
}

}  // namespace

namespace swiftkv {  // attention.cpp, elementwise.cpp, products.cpp
bool has_bf16_attention();
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool bf16);
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u);
at::Tensor prefill_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor dequantize_blocks(const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& mins);
at::Tensor prefill_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                          const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias);
}  // namespace swiftkv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Runtime>(m, "Runtime", pybind11::dynamic_attr())  // dynamic_attr: Python keeps `storage` on it
      .def(pybind11::init<int64_t, int64_t, int64_t, Tensor, double, const MatrixArgs&, OptTensor>())
      .def("set_swiftkv_norm", &Runtime::set_swiftkv_norm)
      .def("add_layer", &Runtime::add_layer)
      .def("step", &Runtime::step);
  m.def("parallel_threads", &parallel_threads);
  m.def("fma_peak", &fma_peak);
  m.def("linear", &linear);
  m.def("has_bf16_attention", &swiftkv::has_bf16_attention);
  m.def("prefill_attention", &swiftkv::prefill_attention);
  m.def("silu_mul", &swiftkv::silu_mul);
  m.def("prefill_rope", &swiftkv::prefill_rope);
  m.def("dequantize_blocks", &swiftkv::dequantize_blocks);
  m.def("prefill_linear", &swiftkv::prefill_linear);
  m.def("rms_norm", &rms_norm_rows);
}

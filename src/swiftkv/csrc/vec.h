// Float32 vectors sized to the target's registers (and their bf16 conversions), shared by every source in csrc/.

#pragma once

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <type_traits>

namespace swiftkv {

// One machine vector of float32 lanes: GCC vector types sized to the target's registers. A type wider than the
// registers (64 bytes under AVX2) is lowered through the stack: the AVX2 build of this file ran 2.2x slower.
#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;  // SSE, NEON
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

inline vf loadv(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

inline void storev(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }

#if defined(__AVX__)
inline float hsum256(__m256 v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
#endif

// Sum of the W lanes as a tree of halves (log2(W) adds instead of W - 1 dependent scalar adds), in registers where
// the build has the shuffles (through memory it cost ~2x the 4 FMAs of a 64-wide attention score).
inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#elif defined(__AVX__)
  return hsum256(v);
#else
  float lanes[W];
  __builtin_memcpy(lanes, &v, sizeof(v));
  for (int width = W / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
#endif
}

// Largest of the W lanes.
inline float hmax(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(v);
#elif defined(__AVX__)
  const __m128 four = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_max_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_max_ss(two, _mm_movehdup_ps(two)));
#else
  float lanes[W];
  __builtin_memcpy(lanes, &v, sizeof(v));
  float top = lanes[0];
  for (int i = 1; i < W; ++i) top = lanes[i] > top ? lanes[i] : top;
  return top;
#endif
}

// Lane-wise maximum, a where a > b (b where a is NaN): one vmaxps where GCC lowers the ternary to a compare and a
// blend.
inline vf maxv(vf a, vf b) {
#if defined(__AVX512F__)
  return _mm512_max_ps(a, b);  // MAXPS: first > second ? first : second
#elif defined(__AVX__)
  return _mm256_max_ps(a, b);
#else
  return a > b ? a : b;
#endif
}

// Whether any lane of a is greater than b's (one compare and a mask test; no horizontal maximum's chain).
inline bool any_greater(vf a, vf b) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0;
#elif defined(__AVX__)
  return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0;
#else
  const vi greater = a > b;
  int32_t lanes[W];
  __builtin_memcpy(lanes, &greater, sizeof(greater));
  for (int i = 0; i < W; ++i)
    if (lanes[i]) return true;
  return false;
#endif
}

// exp of W lanes (Cephes expf: 2^n * p(r), |r| <= ln2/2; ~1 ulp). Lanes below -87.3 (masked, -inf) give exactly 0.
inline vf expv(vf x) {
  const vf zero = {};
  const vf c = x < -87.3f ? zero : (x > 88.3f ? zero + 88.3f : x);  // in range for the exponent trick
  const vf n = (c * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const vf r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const vf e = p * scale;
  return x < -87.3f ? zero : e;
}

// 2^t for W lanes of a softmax's shifted scores: t <= 126 or -inf, exactly 0 below ~-127. A degree-5 polynomial
// on r = t - round(t) (|r| <= 1/2; minimax relative error with p(0) = 1 exactly, 2.2e-7 (2 ulp) evaluated in float32:
// one multiply-add fewer than Cephes' degree 6 at ~1 ulp, since the attention kernel's exps compete with its products
// for the multiply-add ports) times 2^round(t), whose exponent bits come straight from the rounding trick's
// sum (its low mantissa bits hold round(t)), without expv's clamps and blends, which such arguments never need.
inline vf exp2_shifted(vf t) {
  constexpr float ROUND = 12582912.f;  // 1.5 * 2^23: t + ROUND rounds t to an integer n, held in the low bits
  t = maxv(t, vf{} - 127.f);  // -inf included: 2^-127 below, which the exponent trick turns into 0
  const vf sum = t + ROUND;
  const vf r = t - (sum - ROUND);
  vf p = r * 1.3202982320129912e-3f + 9.674951930204716e-3f;
  p = p * r + 5.5510473825066804e-2f;
  p = p * r + 2.4022166008351836e-1f;
  p = p * r + 6.93146595915244e-1f;
  p = p * r + 1.f;
  vu bits;  // unsigned: the shift overflows by design
  __builtin_memcpy(&bits, &sum, sizeof(bits));
  bits = (bits + 127) << 23;  // (n + 127) << 23 = 2^n: the sum's exponent bits shift out; all zero for n = -127
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr float LOG2E = 1.44269504088896341f;

// exp of W lanes that are <= 0 or -inf (a softmax's scores minus their maximum), exactly 0 below ~-88.
inline vf exp_nonpositive(vf x) { return exp2_shifted(x * LOG2E); }

// W bytes widened to int32 lanes, sign-extended (int8 blocks) or not (int4 blocks' nibble pairs): one
// vpmovsxbd / vpmovzxbd where the build has them (GCC's __builtin_convertvector of a byte vector stays scalar, which
// made a native dequantization slower than PyTorch's two passes).
template <class Byte>
inline vi widen(const Byte* p) {
  static_assert(sizeof(Byte) == 1, "bytes");
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vi)(std::is_signed_v<Byte> ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vi)(std::is_signed_v<Byte> ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
#else
  vi v;
  for (int i = 0; i < W; ++i) v[i] = p[i];
  return v;
#endif
}

constexpr int QBLOCK = 32;  // weights per scale in the int8 / int4 formats (weights.BLOCK)

// One block of QBLOCK weights as float32, exactly: int8 q8 -> d q, or int4 q4 (byte j holds input j in its low nibble
// and j + 16 in its high one) -> d q + m. The product d q is exact (an 11-bit d times a q of at most 8 bits) and the
// sum rounds once, so every pass gives PyTorch's float32 d * q (+ m) bit for bit.
inline void dequantize_block(const int8_t* q8, const uint8_t* q4, float d, float m, float* out) {
  if (q8) {
    for (int j = 0; j < QBLOCK; j += W) storev(out + j, __builtin_convertvector(widen(q8 + j), vf) * d);
    return;
  }
  for (int j = 0; j < QBLOCK / 2; j += W) {
    const vi bytes = widen(q4 + j);
    storev(out + j, __builtin_convertvector(bytes & 15, vf) * d + m);
    storev(out + QBLOCK / 2 + j, __builtin_convertvector(bytes >> 4, vf) * d + m);
  }
}

typedef uint16_t vh __attribute__((vector_size(2 * W)));

inline vf load_bf16(const uint16_t* p) {  // bf16 is float32's upper half: widen and shift, exact
  vh h;
  __builtin_memcpy(&h, p, sizeof(h));
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

// float -> bf16 bits, rounded to nearest even (as PyTorch's and oneDNN's conversions do; no NaNs expected).
inline uint32_t bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return (u + 0x7fff + ((u >> 16) & 1)) >> 16;
}

// Rounds W lanes to bf16 as bf16_bits does, into p.
inline void store_bf16(uint16_t* p, vf v) {
  vu bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  const vh h = __builtin_convertvector((bits + 0x7fff + ((bits >> 16) & 1)) >> 16, vh);
  __builtin_memcpy(p, &h, sizeof(h));
}

}  // namespace swiftkv

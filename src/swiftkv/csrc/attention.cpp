// Causal prefill attention: softmax(q k^T * scale) v for a whole prompt, flash-attention style (blocks of keys, an
// online softmax, the [T, T] scores never stored), in float32 (FMA, any build) or bf16 (AVX512-BF16 builds).
//
// Why: PyTorch's CPU flash attention was a third of a 2048-token SmolLM2 prefill on two Zen 4 cores (~45 ms per
// layer in float32 and, without AMX, in bf16 too; docs/cpu.md). Here each query row tile keeps its scores and output
// in registers and the packed keys/values of its head stay in L2. bf16: `vdpbf16ps` does twice the multiply-adds per
// instruction, with the arithmetic of PyTorch's bf16 flash attention: q (times the scale and log2 e), k, v and the
// softmax numerators rounded to bf16; scores, softmax sums and the output accumulated in float32. float32: the same
// formula as SDPA, sums in another order.
//
// Shapes: q [B, H, Tq, Dh], k and v [B, Hkv, Tk, Dh] (any strides, float32; GQA: head h reads Hkv head h / (H/Hkv));
// query i sees keys 0 .. Tk - Tq + i (its own position in a cache that already holds Tk - Tq earlier tokens).
// Output [B, Tq, H, Dh], the layout transformers' attention functions return.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "vec.h"

namespace swiftkv {

using Tensor = at::Tensor;

namespace {

// Register blocking: R rows x NV vectors of scores (and R x CH output vectors) in flight, plus the NV (CH) vectors
// loaded and one broadcast: 6 x 4 of AVX-512's 32 registers, 6 x 2 of AVX2's 16 (the classic 6x16 GEMM tile).
// A block of KB keys is scored NV vectors at a time and then takes one online-softmax update per row (a horizontal
// maximum and sum, a rescale of the row's output): 64 keys on every build, so narrower vectors do not pay that
// update more often per key.
constexpr int NV = W >= 16 ? 4 : 2;
constexpr int64_t KB = 64;  // keys per block
constexpr int KV = KB / W;  // vectors per block
static_assert(KV % NV == 0, "a block is scored NV vectors at a time");
constexpr int R = 6;  // query rows per tile
constexpr int G = 24;  // at most this many tiles per pass over a head's keys (a work item's rows: G * R)
constexpr int CH = NV;  // output vectors accumulated at once
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// Scores are kept in log2 units (q is packed times scale * log2 e), so a softmax numerator is one exp2 of the score
// minus the row's maximum. That maximum moves only when a block's scores exceed it by more than LAZY_TOP (weights
// stay below 2^8), so most blocks skip the rescale of the row's sum and output (FlashAttention-4's lazy rescaling);
// float32 sums and outputs lose nothing to weights up to 256, and bf16 numerators round relatively either way.
constexpr float LAZY_TOP = 8.f;

// An arithmetic: how values sit in the `Slot`s the inner loops read (STEP values per slot along the reduction axis)
// and the multiply-add of a vector of slots by one broadcast slot.
struct F32 {
  using Slot = float;
  using Vec = vf;
  static constexpr int STEP = 1;
  static Slot slot(const float* x, int64_t, float scale) { return x[0] * scale; }
  static Vec load(const Slot* p) { return loadv(p); }
  static vf mac(vf acc, Vec v, Slot s) { return acc + v * s; }
  static void put_value(Slot* v, int64_t t, int64_t d, int64_t dh, float x) { v[t * dh + d] = x; }
  static void store_weights(Slot* row, const vf* e) {  // KB weights
    for (int c = 0; c < KV; ++c) storev(row + W * c, e[c]);
  }
};

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
struct BF16 {  // a slot is a pair of bf16 (low half first), what `vdpbf16ps` multiplies pairwise and sums
  using Slot = uint32_t;
  using Vec = __m512i;
  static constexpr int STEP = 2;
  static Slot slot(const float* x, int64_t stride, float scale) {
    return bf16_bits(x[0] * scale) | (bf16_bits(x[stride] * scale) << 16);
  }
  static Vec load(const Slot* p) { return _mm512_loadu_si512(p); }
  static vf mac(vf acc, Vec v, Slot s) {
    return _mm512_dpbf16_ps(acc, (__m512bh)v, (__m512bh)_mm512_set1_epi32(static_cast<int>(s)));
  }
  static void put_value(Slot* v, int64_t t, int64_t d, int64_t dh, float x) {  // keys t, t + 1 share a slot
    v[t / 2 * dh + d] |= bf16_bits(x) << (16 * (t % 2));
  }
  static void store_weights(Slot* row, const vf* e) {
    for (int c = 0; c < KV; c += 2) _mm512_storeu_si512(row + W * c / 2, (__m512i)_mm512_cvtne2ps_pbh(e[c + 1], e[c]));
  }
};
#endif

// The operands in the layouts the inner loops read, in slots of A: allocated uninitialised (zeroing the whole of
// them was ~1% of the kernel's time), `pack` writes every slot the kernel reads, padding as zeros.
template <class A>
struct Packed {
  using Slots = std::unique_ptr<typename A::Slot[]>;
  int64_t nb;  // key blocks
  Slots k;     // [B * Hkv, nb, Dh / STEP, KB]: per block and slot of dims, the KB keys
  Slots v;     // [B * Hkv, nb, KB / STEP, Dh]: per slot of keys, every dim
};

// K and V, a task per head's block of keys: even shares for the threads (by heads, two threads split 3 K/V heads
// 2 : 1).
template <class A>
Packed<A> pack(const Tensor& k, const Tensor& v) {
  using Slot = typename A::Slot;
  const int64_t B = k.size(0), Hkv = k.size(1), Tk = k.size(2), Dh = k.size(3);
  const int64_t P = Dh / A::STEP, KS = KB / A::STEP, nb = (Tk + KB - 1) / KB;
  Packed<A> out{nb, std::unique_ptr<Slot[]>(new Slot[B * Hkv * nb * P * KB]),
                std::unique_ptr<Slot[]>(new Slot[B * Hkv * nb * KS * Dh])};
  const auto ks = k.strides(), vs = v.strides();
  const float *K = k.data_ptr<float>(), *V = v.data_ptr<float>();
  at::parallel_for(0, B * Hkv * nb, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t bh = item / nb, first = item % nb * KB, keys = std::min(KB, Tk - first);
      const float* kh = K + bh / Hkv * ks[0] + bh % Hkv * ks[1] + first * ks[2];
      const float* vh = V + bh / Hkv * vs[0] + bh % Hkv * vs[1] + first * vs[2];
      Slot *kd = out.k.get() + item * P * KB, *vd = out.v.get() + item * KS * Dh;
      if (keys < KB) std::fill(kd, kd + P * KB, Slot{});  // padding keys
      if (keys < KB || A::STEP > 1) std::fill(vd, vd + KS * Dh, Slot{});  // padding values; bf16 ORs keys into slots
      for (int64_t t = 0; t < keys; ++t) {
        for (int64_t p = 0; p < P; ++p) kd[p * KB + t] = A::slot(kh + t * ks[2] + A::STEP * p * ks[3], ks[3], 1.f);
        for (int64_t d = 0; d < Dh; ++d) A::put_value(vd, t, d, Dh, vh[t * vs[2] + d * vs[3]]);
      }
    }
  });
  return out;
}

// `rows` query rows [rows, Dh] (strides `qs`) times the scale, as slots [rows rounded up to R, Dh / STEP], padding
// rows zero.
template <class A>
void pack_rows(const float* q, int64_t rows, int64_t dh, at::IntArrayRef qs, float scale, typename A::Slot* out) {
  const int64_t P = dh / A::STEP;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t p = 0; p < P; ++p) out[t * P + p] = A::slot(q + t * qs[2] + A::STEP * p * qs[3], qs[3], scale);
  std::fill(out + rows * P, out + (rows + R - 1) / R * R * P, typename A::Slot{});
}

// Scores s of keys c * W .. c * W + W - 1 of a block, with those after `visible` set to -inf (a row's causal limit).
// By value: an array of scores whose address escapes is kept in memory, every multiply-add then stores it.
inline vf mask_after(vf s, int c, int64_t visible) {  // c < KV
  vi key;
  for (int i = 0; i < W; ++i) key[i] = W * c + i;
  return key <= static_cast<int32_t>(std::min<int64_t>(visible, KB)) ? s : vf{} + NEG_INF;
}

// The online softmax's state for R query rows: running maximum `top`, sum `total` (W lanes, added up once at the
// end: a horizontal sum per row and block was a dependent chain of ~4% of the kernel's time) and output `o` per row.
template <int DH>
struct Rows {
  alignas(64) float o[R][DH] = {};
  float top[R];
  vf total[R] = {};
  Rows() { std::fill(top, top + R, NEG_INF); }
};

// Scores of R consecutive query rows against one block of KB keys, then their softmax numerators `weights` [R, KS]
// (the online softmax's state updated): row r sees the block's keys 0 .. visible + r (all of them unless the block
// is on the diagonal), none of them past `seen` (<= KB), whose scores are not computed. Scores in registers.
template <class A, int DH>
void score_block(const typename A::Slot* q, const typename A::Slot* kblock, int64_t visible, int64_t seen,
                 Rows<DH>& st, typename A::Slot* weights) {
  constexpr int P = DH / A::STEP, KS = KB / A::STEP, DV = DH / W;
  const bool diagonal = visible < KB - 1;  // the first row does not see the whole block
  alignas(64) float scores[R][KB];
  for (int c0 = 0; c0 < KV; c0 += NV) {
    if (c0 * W >= seen) {  // keys no row sees (a diagonal block): weight 0, as their mask would give
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; ++c) storev(&scores[r][W * (c0 + c)], vf{} + NEG_INF);
      continue;
    }
    vf s[R][NV] = {};  // in registers: only ever indexed by unrolled constants
    for (int p = 0; p < P; ++p) {
      typename A::Vec keys[NV];
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) keys[c] = A::load(kblock + p * KB + W * (c0 + c));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) s[r][c] = A::mac(s[r][c], keys[c], q[r * P + p]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) storev(&scores[r][W * (c0 + c)], s[r][c]);
  }
  for (int r = 0; r < R; ++r) {
    vf row[KV];
    for (int c = 0; c < KV; ++c) {
      row[c] = loadv(&scores[r][W * c]);
      if (diagonal) row[c] = mask_after(row[c], c, visible + r);
    }
    vf block_top = row[0];
    for (int c = 1; c < KV; ++c) block_top = maxv(block_top, row[c]);
    if (any_greater(block_top, vf{} + (st.top[r] + LAZY_TOP))) {  // always on the row's first block (top = -inf)
      const float top = hmax(block_top);
      const float rescale = std::exp2(st.top[r] - top);  // 0 on the first block
      st.top[r] = top;
      st.total[r] *= rescale;
      for (int c = 0; c < DV; ++c) storev(&st.o[r][W * c], loadv(&st.o[r][W * c]) * rescale);
    }
    vf e[KV], sum = {};  // the difference first: exactly 2^0 = 1 at the maximum, a lone key's weight exact
    for (int c = 0; c < KV; ++c) sum += (e[c] = exp2_shifted(row[c] - st.top[r]));
    A::store_weights(weights + r * KS, e);
    st.total[r] += sum;
  }
}

// The R rows' outputs += weights [R, KS] times one block's values, of its first `seen` keys (the others weigh 0).
template <class A, int DH>
void accumulate_block(const typename A::Slot* weights, const typename A::Slot* vblock, int64_t seen, Rows<DH>& st) {
  constexpr int KS = KB / A::STEP, DV = DH / W;
  const int64_t slots = (seen + A::STEP - 1) / A::STEP;
  for (int c0 = 0; c0 < DV; c0 += CH) {
    vf acc[R][CH];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CH; ++c) acc[r][c] = loadv(&st.o[r][W * (c0 + c)]);
    for (int64_t j = 0; j < slots; ++j) {
      typename A::Vec values[CH];
#pragma GCC unroll 8
      for (int c = 0; c < CH; ++c) values[c] = A::load(vblock + j * DH + W * (c0 + c));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < CH; ++c) acc[r][c] = A::mac(acc[r][c], values[c], weights[r * KS + j]);
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CH; ++c) storev(&st.o[r][W * (c0 + c)], acc[r][c]);
  }
}

// One thread's buffers for its work items: the item's query rows as packed by `pack_rows` [G * R, Dh / STEP], and
// per tile the online softmax's state and one block's numerators [R, KS].
template <class A, int DH>
struct Workspace {
  std::vector<typename A::Slot> q = std::vector<typename A::Slot>(G * R * (DH / A::STEP));
  std::unique_ptr<Rows<DH>[]> tiles{new Rows<DH>[G]};
  std::vector<typename A::Slot> weights = std::vector<typename A::Slot>(G * R * (KB / A::STEP));
};

// `rows` <= G * R consecutive query rows of one head (packed in `ws.q`), as tiles of R, against every key they see:
// row i sees keys 0 .. last_key + i. Blocks outermost, so a block of keys and values, once fetched, serves all the
// tiles from L1/L2: a head's packed K and V (1 MiB at 2048 tokens in float32) outgrow a Zen 3 core's 512 KiB L2, and
// a tile per pass over them left the FMAs waiting on L3 (G tiles per pass: docs/cpu.md has the measurements). Every
// tile is scored against the block's keys before any takes its values, so each half of a block (16 KiB in float32,
// Dh 64) is read while it is in L1.
template <class A, int DH>
void attend_rows(Workspace<A, DH>& ws, int64_t rows, const typename A::Slot* k, const typename A::Slot* v,
                 int64_t last_key, float* out, int64_t out_stride) {
  constexpr int P = DH / A::STEP, KS = KB / A::STEP, DV = DH / W;
  const int64_t n = (rows + R - 1) / R, blocks = (last_key + rows - 1) / KB + 1;
  Rows<DH>* tiles = ws.tiles.get();
  std::fill(tiles, tiles + n, Rows<DH>{});
  const typename A::Slot* q = ws.q.data();
  typename A::Slot* weights = ws.weights.data();
  const auto first_row = [&](int64_t t) { return last_key + t * R; };  // the last key tile t's first row sees
  const auto last_row = [&](int64_t t) { return first_row(t) + std::min<int64_t>(R, rows - t * R) - 1; };
  const auto seen = [&](int64_t t, int64_t kb) { return std::min(KB, last_row(t) - kb * KB + 1); };  // <= 0: none
  for (int64_t kb = 0; kb < blocks; ++kb) {
    for (int64_t t = 0; t < n; ++t)
      if (seen(t, kb) > 0)
        score_block<A, DH>(q + t * R * P, k + kb * P * KB, first_row(t) - kb * KB, seen(t, kb), tiles[t],
                           weights + t * R * KS);
    for (int64_t t = 0; t < n; ++t)
      if (seen(t, kb) > 0) accumulate_block<A, DH>(weights + t * R * KS, v + kb * KS * DH, seen(t, kb), tiles[t]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const Rows<DH>& st = tiles[i / R];
    const float inverse = 1.f / hsum(st.total[i % R]);
    for (int c = 0; c < DV; ++c) storev(out + i * out_stride + W * c, loadv(&st.o[i % R][W * c]) * inverse);
  }
}

template <class A, int DH>
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  constexpr int64_t P = DH / A::STEP;
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Hkv = k.size(1), Tk = k.size(2);
  const Packed<A> packed = pack<A>(k, v);
  const int64_t kv_size = packed.nb * P * KB;  // slots per key/value head, both packings
  Tensor out = at::empty({B, Tq, H, DH}, q.options());
  float* o = out.data_ptr<float>();
  const float* Q = q.data_ptr<float>();
  const auto qs = q.strides();
  // Work items (a head's group of rows) dealt round-robin, not in contiguous runs: a head's groups cost more the
  // later their rows (causal), and contiguous runs could give one thread the dearer half of a head. An item takes
  // G tiles of rows, fewer where that would leave a thread fewer than ITEMS_PER_THREAD items (short prompts, many
  // threads). Each item packs its own query rows (times scale * log2 e), which then stay in L1.
  constexpr int64_t ITEMS_PER_THREAD = 8;
  const int64_t pool = at::get_num_threads(), wanted = ITEMS_PER_THREAD * pool;
  const int64_t span = R * std::clamp<int64_t>((B * H * Tq + R * wanted - 1) / (R * wanted), 1, G);  // rows per item
  const int64_t groups = (Tq + span - 1) / span;
  const int64_t items = B * H * groups, threads = std::min(pool, items);
  const float q_scale = static_cast<float>(scale) * LOG2E;
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    Workspace<A, DH> ws;
    for (int64_t t = first; t < last; ++t)
      for (int64_t i = t; i < items; i += threads) {
        const int64_t bh = i / groups, row = i % groups * span, b = bh / H, h = bh % H, kvh = b * Hkv + h / (H / Hkv);
        const int64_t rows = std::min<int64_t>(span, Tq - row);
        pack_rows<A>(Q + b * qs[0] + h * qs[1] + row * qs[2], rows, DH, qs, q_scale, ws.q.data());
        attend_rows<A, DH>(ws, rows, packed.k.get() + kvh * kv_size, packed.v.get() + kvh * kv_size, Tk - Tq + row,
                           o + ((b * Tq + row) * H + h) * DH, H * DH);
      }
  });
  return out;
}

template <class A>
Tensor dispatch(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  switch (q.size(3)) {
    case 64: return attention<A, 64>(q, k, v, scale);
    case 128: return attention<A, 128>(q, k, v, scale);
    default: TORCH_CHECK(false, "prefill_attention: head dim 64 or 128, not ", q.size(3));
  }
}

}  // namespace

bool has_bf16_attention() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

Tensor prefill_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, bool bf16) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0 && q.size(2) <= k.size(2),
              "prefill_attention: q [B, H, Tq, Dh], k and v [B, Hkv, Tk, Dh] with H a multiple of Hkv and Tq <= Tk");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "prefill_attention: float32 q, k, v");
  if (!bf16) return dispatch<F32>(q, k, v, scale);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return dispatch<BF16>(q, k, v, scale);
#else
  TORCH_CHECK(false, "prefill_attention: bf16 needs a build with AVX512-BF16 (has_bf16_attention() is false)");
#endif
}

}  // namespace swiftkv

// Prefill products with float32 activations of float32 weights or int8 / int4 blocks (weights.py's formats):
// y [M, N] = x [M, K] @ W^T (+ bias), W [N, K] float32 or the blocks' exact float32 values, taken into cache a panel
// of output columns at a time, where a prefill used to hand MKL the float32 weight (for blocks, first written whole
// to memory by dequantizing them).
//
// Why (docs/cpu.md, "Panel products"): dequantizing whole weights cost a fixed ~400 MB of writes per prefill of the
// default model, which made a short int8 prompt slower than a float32 one, and MKL's products run far below the
// FMA peak at a few dozen rows (its 2-thread products slower than its 1-thread ones below ~32 rows).
//
// Each thread takes an even share of the weight's panels of P output columns (P = NV vectors) and takes up to
// PANEL_FLOATS of them at a time in float32 (blocks dequantized), transposed: [K][P], so that one k's P weights are
// NV vector loads. Every 6 rows of x then run against each panel in a 6 x P register tile (the rows dealt evenly to
// tiles of 4-6 where M is not a multiple of 6), x's values broadcast per k (the classic 6x16 GEMM tile of
// attention.cpp), and the tile is stored as whole vectors of y's rows. Sums run over k in order, one FMA per k: the
// float32 product of the (dequantized) weight up to summation order.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <optional>

#include "vec.h"

namespace swiftkv {

using Tensor = at::Tensor;

void check_blocks(const Tensor& data, const Tensor& scales, const std::optional<Tensor>& mins, const char* caller);

namespace {

constexpr int NV = W >= 16 ? 4 : 2;  // vectors per tile row: 6 x NV accumulators + NV loads fit the registers
constexpr int64_t P = NV * W;  // output columns per panel
constexpr int R = 6;  // rows of x per tile
constexpr int64_t PANEL_FLOATS = 48 * 1024;  // panels taken at once: 192 KB, hot in a 512 KB L2

struct Weight {  // one weight [N, K]: float32, or blocks
  const float* f32;  // float32 [N, K], or
  const int8_t* q8;  // int8 [N, K], or
  const uint8_t* q4;  // int4 [N, K / 2]
  const at::Half* d;  // [N, K / QBLOCK]
  const at::Half* m;  // [N, K / QBLOCK], int4 only
  int64_t K;
};

#if defined(__AVX__)
// o[j * P + i] = x[i * stride + j] for i, j < 8: eight rows of 8 floats transposed in registers.
inline void transpose8(const float* x, int64_t stride, float* o) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + i * stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // rows i, i + 1 interleaved: columns 0 1 | 4 5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // columns 2 3 | 6 7
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      r[i + 2 * h] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], 0x44);  // rows i..i+3 of column 2h | 2h + 4
      r[i + 2 * h + 1] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], 0xEE);  // of column 2h + 1 | 2h + 5
    }
  for (int j = 0; j < 4; ++j) {  // r[j], r[4 + j]: column j (low half) and j + 4 (high) of rows 0-3 and 4-7
    _mm256_storeu_ps(o + j * P, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
    _mm256_storeu_ps(o + (j + 4) * P, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
  }
}
#endif

// Output columns [n, n + P) of the weight as float32 [K][P] (columns past N zero).
void take_panel(const Weight& w, int64_t n, int64_t N, float* out) {
  const int64_t blocks = w.K / QBLOCK, cols = std::min(P, N - n);
  alignas(64) float rows[P][QBLOCK] = {};  // one block of each column, row-major
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = (n + c) * blocks + b;
      if (w.f32) {
        std::copy_n(w.f32 + i * QBLOCK, QBLOCK, rows[c]);
        continue;
      }
      dequantize_block(w.q8 ? w.q8 + i * QBLOCK : nullptr, w.q4 ? w.q4 + i * QBLOCK / 2 : nullptr,
                       static_cast<float>(w.d[i]), w.m ? static_cast<float>(w.m[i]) : 0.f, rows[c]);
    }
    float* o = out + b * QBLOCK * P;
#if defined(__AVX__)
    for (int64_t c = 0; c < P; c += 8)
      for (int64_t k = 0; k < QBLOCK; k += 8) transpose8(rows[c] + k, QBLOCK, o + k * P + c);
#else
    for (int64_t c = 0; c < P; ++c)
      for (int64_t k = 0; k < QBLOCK; ++k) o[k * P + c] = rows[c][k];
#endif
  }
}

// y [ROWS, cols] (row stride N) = x [ROWS, K] (row stride K) times a panel [K][P] (+ bias [cols]), cols <= P.
template <int ROWS>
void tile(const float* x, const float* panel, int64_t K, float* y, int64_t N, int64_t cols, const float* bias) {
  vf acc[ROWS][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    vf wv[NV];
    for (int v = 0; v < NV; ++v) {
      wv[v] = loadv(panel + k * P + v * W);
#if defined(__x86_64__)
      asm("" : "+v"(wv[v]));  // in a register: at ROWS <= 4 GCC would load it again for every row's FMA
#endif
    }
    for (int r = 0; r < ROWS; ++r) {
      const float xr = x[r * K + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += wv[v] * xr;
    }
  }
  alignas(64) float b[P] = {};
  if (bias) std::copy(bias, bias + cols, b);
  for (int r = 0; r < ROWS; ++r) {
    if (cols == P) {
      for (int v = 0; v < NV; ++v) storev(y + r * N + v * W, acc[r][v] + loadv(b + v * W));
      continue;
    }
    alignas(64) float lanes[P];  // the weight's last, partial panel
    for (int v = 0; v < NV; ++v) storev(lanes + v * W, acc[r][v] + loadv(b + v * W));
    std::copy(lanes, lanes + cols, y + r * N);
  }
}

using Tile = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t, const float*);
constexpr Tile TILES[R + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

}  // namespace

// y [M, N] = x [M, K] @ W^T (+ bias) for a float32 weight [N, K] (scales and mins None) or blocks as
// dequantize_blocks takes them (int8 data [N, K] or int4 [N, K / 2], float16 scales and int4's mins [N, K / 32]);
// x float32 [M, K] contiguous, K a multiple of 32, bias float32 [N] or None.
Tensor prefill_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& scales,
                      const std::optional<Tensor>& mins, const std::optional<Tensor>& bias) {
  const bool f32 = !scales.has_value();
  if (!f32) check_blocks(weight, *scales, mins, "prefill_linear");
  TORCH_CHECK(!f32 || (weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.is_contiguous() &&
                       weight.size(1) % QBLOCK == 0 && !mins),
              "prefill_linear: a float32 weight [out, in] contiguous, in a multiple of 32, without scales or mins");
  const bool int4 = weight.scalar_type() == at::kByte;
  const int64_t N = weight.size(0), K = f32 ? weight.size(1) : scales->size(1) * QBLOCK;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K && x.is_contiguous() &&
                  (!bias || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous())),
              "prefill_linear: float32 x [rows, ", K, "] contiguous and a float32 bias [", N, "] or None");
  const int64_t M = x.size(0);
  Tensor y = at::empty({M, N}, x.options());
  const Weight w{f32 ? weight.data_ptr<float>() : nullptr, f32 || int4 ? nullptr : weight.data_ptr<int8_t>(),
                 int4 ? weight.data_ptr<uint8_t>() : nullptr, f32 ? nullptr : scales->data_ptr<at::Half>(),
                 int4 ? mins->data_ptr<at::Half>() : nullptr, K};
  const int64_t panels = (N + P - 1) / P, fit = std::max<int64_t>(1, PANEL_FLOATS / K / P);
  // The rows in ceil(M / R) tiles of sizes that differ by at most one (M = 32: 6 6 5 5 5 5, not 6 6 6 6 6 2): a
  // tile of >= 4 rows (every M > 8) has the independent accumulators to keep both FMA ports busy, one of 2 has half.
  const int64_t tiles = (M + R - 1) / R;
  const float *xs = x.data_ptr<float>(), *b = bias ? bias->data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t lo, int64_t hi) {  // one even share of the panels per thread
    std::unique_ptr<float[]> wt(new float[std::min(fit, hi - lo) * K * P]);
    for (int64_t p0 = lo; p0 < hi; p0 += fit) {
      const int64_t count = std::min(fit, hi - p0);
      for (int64_t i = 0; i < count; ++i) take_panel(w, (p0 + i) * P, N, wt.get() + i * K * P);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r = t * M / tiles, rows = (t + 1) * M / tiles - r;
        for (int64_t i = 0; i < count; ++i) {
          const int64_t n = (p0 + i) * P;
          TILES[rows](xs + r * K, wt.get() + i * K * P, K, out + r * N + n, N, std::min(P, N - n),
                      b ? b + n : nullptr);
        }
      }
    }
  });
  return y;
}

}  // namespace swiftkv

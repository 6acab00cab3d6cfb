// Fused segmented template linear for CPU: rows are grouped in segments that share one task slot; for every
// (output tile, segment) work item the task's weight tile is composed from the n template tiles into a small
// per-thread buffer that stays in cache, then multiplied by the segment's rows with one BLAS sgemm call.
// Per-task weights are never written to main memory.
//
//   for every segment j (rows starts[j] .. starts[j+1]) and output tile [o0, o0 + tile):
//       Wt = sum_i coeffs[slots[j], i] * templates[i, o0:o0+tile, :]        // (tile, in), in cache
//       y[rows, o0:o0+tile] = x[rows] @ Wt^T (+ bias[o0:o0+tile])
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

void compose_tile(const float* templates, int64_t template_stride, const float* coeffs, int64_t n,
                  int64_t len, float* out) {
  const float c0 = coeffs[0];
  for (int64_t e = 0; e < len; ++e) out[e] = c0 * templates[e];
  for (int64_t i = 1; i < n; ++i) {
    const float ci = coeffs[i];
    const float* ti = templates + i * template_stride;
    for (int64_t e = 0; e < len; ++e) out[e] += ci * ti[e];
  }
}

}  // namespace

// x (T, in) rows sorted by slot; starts (G+1,) int64; slots (G,) int64; templates (n, out, in) with rows
// contiguous; coeffs (S, n) contiguous float32; bias (out,) or empty; tile: output rows per work item.
torch::Tensor segmented_linear(torch::Tensor x, torch::Tensor starts, torch::Tensor slots,
                               torch::Tensor templates, torch::Tensor coeffs, torch::Tensor bias,
                               int64_t tile) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && templates.scalar_type() == at::kFloat &&
                  coeffs.scalar_type() == at::kFloat, "segmented_linear: float32 tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "segmented_linear: x must be a contiguous (T, in) matrix");
  TORCH_CHECK(templates.dim() == 3 && templates.stride(2) == 1 && templates.stride(1) == templates.size(2),
              "segmented_linear: every template must be a row-major (out, in) matrix");
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.is_contiguous() && coeffs.size(1) == templates.size(0),
              "segmented_linear: coeffs must be a contiguous (S, n) matrix");
  TORCH_CHECK(starts.dim() == 1 && slots.dim() == 1 && starts.size(0) == slots.size(0) + 1,
              "segmented_linear: starts must have one more entry than slots");
  TORCH_CHECK(tile > 0, "segmented_linear: tile must be positive");
  const int64_t rows = x.size(0), in = x.size(1), n = templates.size(0), out = templates.size(1);
  TORCH_CHECK(templates.size(2) == in, "segmented_linear: x and templates disagree on in_features");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.dim() == 1 && bias.size(0) == out && bias.is_contiguous() &&
                            bias.scalar_type() == at::kFloat),
              "segmented_linear: bias must be a contiguous float32 (out,) vector");
  auto y = torch::empty({rows, out}, x.options());
  const int64_t num_segments = slots.size(0);
  const int64_t num_tiles = (out + tile - 1) / tile;
  if (rows == 0 || num_segments == 0) return y;

  const float* xp = x.data_ptr<float>();
  const float* tp = templates.data_ptr<float>();
  const float* cp = coeffs.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const int64_t* sp = starts.contiguous().data_ptr<int64_t>();
  const int64_t* slp = slots.contiguous().data_ptr<int64_t>();
  const int64_t num_slots = coeffs.size(0);
  for (int64_t j = 0; j < num_segments; ++j) {
    TORCH_CHECK(slp[j] >= 0 && slp[j] < num_slots, "segmented_linear: slot out of range");
    TORCH_CHECK(sp[j] <= sp[j + 1] && sp[j + 1] <= rows, "segmented_linear: bad segment bounds");
  }
  const int64_t template_stride = templates.stride(0);
  float* yp = y.data_ptr<float>();

  // Work items are (tile, segment) pairs in tile-major order: a thread's contiguous range keeps reusing the
  // same template tiles while it walks over segments.
  at::parallel_for(0, num_tiles * num_segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(tile * in));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / num_segments, j = item % num_segments;
      const int64_t o0 = t * tile;
      const int64_t width = std::min(tile, out - o0);
      const int64_t r0 = sp[j], r1 = sp[j + 1];
      if (r1 == r0) continue;
      compose_tile(tp + o0 * in, template_stride, cp + slp[j] * n, n, width * in, buffer.data());
      const int m = static_cast<int>(width), nn = static_cast<int>(r1 - r0), k = static_cast<int>(in);
      const int lda = k, ldb = k, ldc = static_cast<int>(out);
      const float alpha = 1.0f, beta = 0.0f;
      float* c = yp + r0 * out + o0;
      // column-major view: C^T (width x rows) = Wt (width x in) . X^T (in x rows)
      sgemm_("T", "N", &m, &nn, &k, &alpha, buffer.data(), &lda, xp + r0 * in, &ldb, &beta, c, &ldc);
      if (bp != nullptr) {
        for (int64_t r = 0; r < nn; ++r) {
          float* row = c + r * out;
          for (int64_t o = 0; o < width; ++o) row[o] += bp[o0 + o];
        }
      }
    }
  });
  return y;
}


// ---------------------------------------------------------------------------------------------------------
// Packed variant with its own AVX2/FMA micro-kernel. The templates are packed once (by the caller, cached)
// into 16-column panels: packed[i, p, k, c] = templates[i, 16 p + c, k] (zero past `out`). Composing a
// task's panel is then a contiguous multiply-add over the n template panels, straight into the layout the
// 6x16 micro-kernel reads, so there is no per-call packing or transposing and no BLAS call overhead:
//
//   for every (tile of nc output columns, segment j) and every k block of kc:
//       Bp = sum_i coeffs[slots[j], i] * packed[i, tile panels, kblock, :]        // in L2
//       for every 16-column panel, every 6 rows r of the segment:  y[r, panel] += x[r, kblock] @ Bp[panel]
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RECAST_HAS_MICROKERNEL 1

namespace {

constexpr int64_t MR = 6, NR = 16;

// c (6 x 16, leading dim ldc) = init (16 floats broadcast to every row; nullptr: c itself) + x rows . bp
inline void micro_6x16(int64_t kc, const float* const* xr, const float* bp, float* c, int64_t ldc,
                       const float* init) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (init != nullptr) {
    c00 = c10 = c20 = c30 = c40 = c50 = _mm256_loadu_ps(init);
    c01 = c11 = c21 = c31 = c41 = c51 = _mm256_loadu_ps(init + 8);
  } else {
    c00 = _mm256_loadu_ps(c + 0 * ldc); c01 = _mm256_loadu_ps(c + 0 * ldc + 8);
    c10 = _mm256_loadu_ps(c + 1 * ldc); c11 = _mm256_loadu_ps(c + 1 * ldc + 8);
    c20 = _mm256_loadu_ps(c + 2 * ldc); c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(c + 3 * ldc); c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(c + 4 * ldc); c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(c + 5 * ldc); c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
  }
  const float *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3], *x4 = xr[4], *x5 = xr[5];
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(bp + k * NR), b1 = _mm256_load_ps(bp + k * NR + 8);
    __m256 a = _mm256_broadcast_ss(x0 + k);
    c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(x1 + k);
    c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(x2 + k);
    c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(x3 + k);
    c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(x4 + k);
    c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(x5 + k);
    c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  _mm256_storeu_ps(c + 0 * ldc, c00); _mm256_storeu_ps(c + 0 * ldc + 8, c01);
  _mm256_storeu_ps(c + 1 * ldc, c10); _mm256_storeu_ps(c + 1 * ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20); _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30); _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40); _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50); _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}

// out[e] = sum_i coeffs[i] * src[i * template_stride + e] for e < len (len a multiple of 8, 32-byte aligned)
void compose_panel(const float* src, int64_t template_stride, const float* coeffs, int64_t n, int64_t len,
                   float* out) {
  const __m256 c0 = _mm256_set1_ps(coeffs[0]);
  if (n == 2) {
    const __m256 c1 = _mm256_set1_ps(coeffs[1]);
    const float* t1 = src + template_stride;
    for (int64_t e = 0; e < len; e += 8)
      _mm256_store_ps(out + e, _mm256_fmadd_ps(c1, _mm256_load_ps(t1 + e), _mm256_mul_ps(c0, _mm256_load_ps(src + e))));
    return;
  }
  for (int64_t e = 0; e < len; e += 8) _mm256_store_ps(out + e, _mm256_mul_ps(c0, _mm256_load_ps(src + e)));
  for (int64_t i = 1; i < n; ++i) {
    const __m256 ci = _mm256_set1_ps(coeffs[i]);
    const float* ti = src + i * template_stride;
    for (int64_t e = 0; e < len; e += 8)
      _mm256_store_ps(out + e, _mm256_fmadd_ps(ci, _mm256_load_ps(ti + e), _mm256_load_ps(out + e)));
  }
}

}  // namespace
#endif

bool has_microkernel() {
#ifdef RECAST_HAS_MICROKERNEL
  return true;
#else
  return false;
#endif
}

// x (T, in) rows sorted by slot; starts/slots as above; packed (n, P, in, 16) contiguous, P = ceil(out / 16);
// coeffs (S, n); bias (out,) or empty; nc: output columns per work item (multiple of 16); kc: k block.
torch::Tensor segmented_linear_packed(torch::Tensor x, torch::Tensor starts, torch::Tensor slots,
                                      torch::Tensor packed, torch::Tensor coeffs, torch::Tensor bias,
                                      int64_t out, int64_t nc, int64_t kc) {
#ifndef RECAST_HAS_MICROKERNEL
  TORCH_CHECK(false, "segmented_linear_packed: built without AVX2/FMA");
  return x;
#else
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat &&
                  coeffs.scalar_type() == at::kFloat, "segmented_linear_packed: float32 tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "segmented_linear_packed: x must be a contiguous (T, in) matrix");
  const int64_t rows = x.size(0), in = x.size(1);
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(2) == in && packed.size(3) == NR,
              "segmented_linear_packed: packed must be a contiguous (n, P, in, 16) tensor");
  const int64_t n = packed.size(0), num_panels = packed.size(1);
  TORCH_CHECK(out > 0 && num_panels == (out + NR - 1) / NR, "segmented_linear_packed: out disagrees with packed");
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.is_contiguous() && coeffs.size(1) == n,
              "segmented_linear_packed: coeffs must be a contiguous (S, n) matrix");
  TORCH_CHECK(starts.dim() == 1 && slots.dim() == 1 && starts.size(0) == slots.size(0) + 1,
              "segmented_linear_packed: starts must have one more entry than slots");
  TORCH_CHECK(nc > 0 && nc % NR == 0 && kc > 0, "segmented_linear_packed: nc must be a positive multiple of 16");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.dim() == 1 && bias.size(0) == out && bias.is_contiguous() &&
                            bias.scalar_type() == at::kFloat),
              "segmented_linear_packed: bias must be a contiguous float32 (out,) vector");
  auto y = torch::empty({rows, out}, x.options());
  const int64_t num_segments = slots.size(0);
  if (rows == 0 || num_segments == 0) return y;
  auto starts_c = starts.contiguous();
  auto slots_c = slots.contiguous();
  const int64_t* sp = starts_c.data_ptr<int64_t>();
  const int64_t* slp = slots_c.data_ptr<int64_t>();
  const int64_t num_slots = coeffs.size(0);
  for (int64_t j = 0; j < num_segments; ++j) {
    TORCH_CHECK(slp[j] >= 0 && slp[j] < num_slots, "segmented_linear_packed: slot out of range");
    TORCH_CHECK(sp[j] <= sp[j + 1] && sp[j + 1] <= rows, "segmented_linear_packed: bad segment bounds");
  }
  // bias padded to whole panels (zeros without a bias): the micro-kernel's initial value at k block 0
  std::vector<float> init(static_cast<size_t>(num_panels * NR), 0.0f);
  if (has_bias) std::copy(bias.data_ptr<float>(), bias.data_ptr<float>() + out, init.begin());
  const float* xp = x.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  const float* cp = coeffs.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t panels_per_tile = nc / NR;
  const int64_t num_tiles = (num_panels + panels_per_tile - 1) / panels_per_tile;
  const int64_t template_stride = packed.stride(0), panel_stride = packed.stride(1);
  const int64_t kblock = std::min(kc, in);

  at::parallel_for(0, num_tiles * num_segments, 1, [&](int64_t begin, int64_t end) {
    float* buffer = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(NR * kblock) * 4));
    alignas(64) float edge[MR * NR];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / num_segments, j = item % num_segments;
      const int64_t r0 = sp[j], r1 = sp[j + 1];
      if (r1 == r0) continue;
      const int64_t p0 = t * panels_per_tile;
      const int64_t panels = std::min(panels_per_tile, num_panels - p0);
      for (int64_t k0 = 0; k0 < in; k0 += kblock) {
        const int64_t kl = std::min(kblock, in - k0);
        for (int64_t p = 0; p < panels; ++p) {
          // the task's (kl x 16) panel, composed right before the row blocks read it (it stays in L1)
          compose_panel(pp + (p0 + p) * panel_stride + k0 * NR, template_stride, cp + slp[j] * n, n, kl * NR,
                        buffer);
          const int64_t col = (p0 + p) * NR;
          const int64_t cols = std::min(NR, out - col);
          const float* bp = buffer;
          const float* start = k0 == 0 ? init.data() + col : nullptr;
          for (int64_t rb = r0; rb < r1; rb += MR) {
            const int64_t valid = std::min(MR, r1 - rb);
            const float* xr[MR];
            for (int64_t r = 0; r < MR; ++r) xr[r] = xp + (rb + std::min(r, valid - 1)) * in + k0;
            float* c = yp + rb * out + col;
            if (valid == MR && cols == NR) {
              micro_6x16(kl, xr, bp, c, out, start);
              continue;
            }
            if (start == nullptr)
              for (int64_t r = 0; r < valid; ++r) std::copy(c + r * out, c + r * out + cols, edge + r * NR);
            micro_6x16(kl, xr, bp, edge, NR, start);
            for (int64_t r = 0; r < valid; ++r) std::copy(edge + r * NR, edge + r * NR + cols, c + r * out);
          }
        }
      }
    }
    std::free(buffer);
  });
  return y;
#endif
}

// brgemm_linear.cpp
torch::Tensor brgemm_segmented_linear(torch::Tensor x, torch::Tensor starts, torch::Tensor slots,
                                      torch::Tensor packed, torch::Tensor coeffs, torch::Tensor bias,
                                      torch::Tensor scale, torch::Tensor shift, int64_t out, int64_t nb,
                                      int64_t mb);
bool brgemm_supported(torch::ScalarType dtype);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segmented_linear", &segmented_linear, "fused segmented template linear (float32, CPU)");
  m.def("segmented_linear_packed", &segmented_linear_packed,
        "fused segmented template linear on packed templates with the AVX2 micro-kernel (float32, CPU)");
  m.def("has_microkernel", &has_microkernel, "whether the AVX2/FMA micro-kernel was compiled in");
  m.def("brgemm_segmented_linear", &brgemm_segmented_linear,
        "fused segmented template linear on oneDNN BRGEMM with an optional per-task output scale and "
        "shift (float32 or bfloat16, CPU)");
  m.def("brgemm_supported", &brgemm_supported, "whether BRGEMM runs natively for a dtype on this CPU");
}

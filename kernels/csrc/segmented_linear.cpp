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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segmented_linear", &segmented_linear, "fused segmented template linear (float32, CPU)");
}

// Fused segmented template linear on the library's micro-kernel: oneDNN BRGEMM through libtorch's
// at::native::cpublas::brgemm, which JITs AVX2, AVX-512 or AMX code for the CPU it runs on. For every
// (block of nb output columns, run of rows of one task) the task's weight block is composed from the n
// template blocks into a per-thread buffer that stays in L2, then multiplied by the run's rows:
//
//   for every column block b and segment j (rows starts[j] .. starts[j+1]):
//       Bw = sum_i coeffs[slots[j], i] * packed[i, b]                 // (K, nb) in B's layout, in cache
//       for every mb rows r of the segment:  y[r, b] = x[r] @ Bw (+ bias[b])     (fp32 accumulation)
//
// The templates are packed once by the caller (kernels/packed_templates.py) into the layout BRGEMM reads
// for B: row-major (K, nb) blocks for float32, VNNI pairs (K / 2, nb, 2) for bfloat16 and float16. The
// compose is elementwise and linear, so combining packed templates yields the packed task weight directly.
// The compose loops are compiled for AVX-512, AVX2 and baseline x86-64, chosen at load time (ifunc), so
// one build serves every x86 CPU at its own width.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RECAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RECAST_CLONES
#endif

// out[e] = sum_i c[i] * t[i * stride + e]  (float32)
RECAST_CLONES void compose_f32(const float* t, int64_t stride, const float* c, int64_t n, int64_t len,
                               float* out) {
  const float c0 = c[0];
  if (n == 2) {
    const float c1 = c[1];
    const float* t1 = t + stride;
    for (int64_t e = 0; e < len; ++e) out[e] = c0 * t[e] + c1 * t1[e];
    return;
  }
  for (int64_t e = 0; e < len; ++e) out[e] = c0 * t[e];
  for (int64_t i = 1; i < n; ++i) {
    const float ci = c[i];
    const float* ti = t + i * stride;
    for (int64_t e = 0; e < len; ++e) out[e] += ci * ti[e];
  }
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even (finite inputs: weights are checked finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// out[e] = bf16(sum_i c[i] * t[i * stride + e])  (bfloat16 storage, float32 arithmetic)
RECAST_CLONES void compose_bf16_portable(const uint16_t* t, int64_t stride, const float* c, int64_t n, int64_t len,
                                uint16_t* out) {
  const float c0 = c[0];
  if (n == 2) {
    const float c1 = c[1];
    const uint16_t* t1 = t + stride;
    for (int64_t e = 0; e < len; ++e) out[e] = f32_to_bf16(c0 * bf16_to_f32(t[e]) + c1 * bf16_to_f32(t1[e]));
    return;
  }
  for (int64_t e = 0; e < len; ++e) {
    float acc = c0 * bf16_to_f32(t[e]);
    for (int64_t i = 1; i < n; ++i) acc += c[i] * bf16_to_f32(t[i * stride + e]);
    out[e] = f32_to_bf16(acc);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RECAST_HAS_BF16_PATH 1
// 16 bf16 values widened to float32. A named function, not a lambda: GCC gives a lambda no target
// attribute of its enclosing function, so a build whose target lacks AVX-512 (-mavx2, or -march=native
// on an AVX2 CPU) would fail to inline these intrinsics.
__attribute__((target("avx512f"), always_inline)) inline __m512 widen_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// The same compose with AVX512-BF16's two-vector round-to-nearest-even conversion (VCVTNE2PS2BF16):
// 32 elements per step; the tail goes through the portable loop.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void compose_bf16_avx512(
    const uint16_t* t, int64_t stride, const float* c, int64_t n, int64_t len, uint16_t* out) {
  const int64_t body = len / 32 * 32;
  for (int64_t e = 0; e < body; e += 32) {
    const __m512 c0 = _mm512_set1_ps(c[0]);
    __m512 lo = _mm512_mul_ps(c0, widen_bf16(t + e)), hi = _mm512_mul_ps(c0, widen_bf16(t + e + 16));
    for (int64_t i = 1; i < n; ++i) {
      const __m512 ci = _mm512_set1_ps(c[i]);
      const uint16_t* ti = t + i * stride + e;
      lo = _mm512_fmadd_ps(ci, widen_bf16(ti), lo);
      hi = _mm512_fmadd_ps(ci, widen_bf16(ti + 16), hi);
    }
    _mm512_storeu_si512(reinterpret_cast<__m512i*>(out + e), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  if (body < len) compose_bf16_portable(t + body, stride, c, n, len - body, out + body);
}
#endif

using ComposeBf16 = void (*)(const uint16_t*, int64_t, const float*, int64_t, int64_t, uint16_t*);

// The bf16 compose for this CPU, chosen once: AVX512-BF16 when the CPU reports it, else the cloned loop.
ComposeBf16 pick_compose_bf16() {
#ifdef RECAST_HAS_BF16_PATH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && std::getenv("RECAST_NO_AVX512BF16") == nullptr)
    return compose_bf16_avx512;
#endif
  return compose_bf16_portable;
}

// The epilogue of one (rows, column block) tile: bias, then the task's per-channel scale and shift.
struct Epilogue {
  const float* bias;   // (w,) or null
  const float* scale;  // (w,) of the segment's task, or null
  const float* shift;  // (w,) of the segment's task, or null
};

// y[r, 0:w] = bf16(((acc[r, 0:w] + bias) * scale + shift)) for r < m (each part optional)
RECAST_CLONES void store_bf16(const float* acc, int64_t ld_acc, Epilogue e, int64_t m, int64_t w, uint16_t* y,
                              int64_t ld_y) {
  for (int64_t r = 0; r < m; ++r) {
    const float* a = acc + r * ld_acc;
    uint16_t* o = y + r * ld_y;
    if (e.scale == nullptr && e.shift == nullptr) {
      if (e.bias != nullptr)
        for (int64_t c = 0; c < w; ++c) o[c] = f32_to_bf16(a[c] + e.bias[c]);
      else
        for (int64_t c = 0; c < w; ++c) o[c] = f32_to_bf16(a[c]);
      continue;
    }
    for (int64_t c = 0; c < w; ++c) {
      float v = e.bias != nullptr ? a[c] + e.bias[c] : a[c];
      if (e.scale != nullptr) v *= e.scale[c];
      if (e.shift != nullptr) v += e.shift[c];
      o[c] = f32_to_bf16(v);
    }
  }
}

// y[r, 0:w] = (y[r, 0:w] + bias) * scale + shift in place (float32; each part optional)
RECAST_CLONES void finish_f32(Epilogue e, int64_t m, int64_t w, float* y, int64_t ld_y) {
  for (int64_t r = 0; r < m; ++r) {
    float* o = y + r * ld_y;
    if (e.bias != nullptr)
      for (int64_t c = 0; c < w; ++c) o[c] += e.bias[c];
    if (e.scale != nullptr)
      for (int64_t c = 0; c < w; ++c) o[c] *= e.scale[c];
    if (e.shift != nullptr)
      for (int64_t c = 0; c < w; ++c) o[c] += e.shift[c];
  }
}

struct Problem {
  int64_t rows, in, out, n, nb, mb, num_blocks, num_segments;
  const int64_t* starts;
  const int64_t* slots;
  const float* coeffs;
  const float* bias;
  const float* scale;  // (S, out) or null
  const float* shift;  // (S, out) or null

  // the epilogue of slot `slot`'s rows in the column block starting at `col`
  Epilogue at(int64_t slot, int64_t col) const {
    return Epilogue{bias == nullptr ? nullptr : bias + col,
                    scale == nullptr ? nullptr : scale + slot * out + col,
                    shift == nullptr ? nullptr : shift + slot * out + col};
  }
};

// An optional float32 (rows, cols) matrix: empty for none.
const float* optional_rows(const torch::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous() &&
                  t.scalar_type() == at::kFloat,
              "brgemm_segmented_linear: ", what, " must be a contiguous float32 (S, out) matrix or empty");
  return t.data_ptr<float>();
}

Problem check(const torch::Tensor& x, const torch::Tensor& starts, const torch::Tensor& slots,
              const torch::Tensor& packed, const torch::Tensor& coeffs, const torch::Tensor& bias,
              const torch::Tensor& scale, const torch::Tensor& shift, int64_t out, int64_t nb, int64_t mb) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "brgemm_segmented_linear: x must be a contiguous (T, in) matrix");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "brgemm_segmented_linear: x and packed dtypes differ");
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat && coeffs.dim() == 2 && coeffs.is_contiguous(),
              "brgemm_segmented_linear: coeffs must be a contiguous float32 (S, n) matrix");
  TORCH_CHECK(nb > 0 && mb > 0 && out > 0, "brgemm_segmented_linear: nb, mb and out must be positive");
  const int64_t in = x.size(1), n = coeffs.size(1), num_blocks = (out + nb - 1) / nb;
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(0) == n &&
                  packed.size(1) == num_blocks && packed.size(2) == in * nb,
              "brgemm_segmented_linear: packed must be a contiguous (n, ceil(out / nb), in * nb) tensor");
  TORCH_CHECK(starts.dim() == 1 && slots.dim() == 1 && starts.size(0) == slots.size(0) + 1 &&
                  starts.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  starts.is_contiguous() && slots.is_contiguous(),
              "brgemm_segmented_linear: starts (G + 1,) and slots (G,) must be contiguous int64 vectors");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.dim() == 1 && bias.size(0) == out && bias.is_contiguous() &&
                            bias.scalar_type() == at::kFloat),
              "brgemm_segmented_linear: bias must be a contiguous float32 (out,) vector");
  const int64_t rows = x.size(0), num_segments = slots.size(0), num_slots = coeffs.size(0);
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  for (int64_t j = 0; j < num_segments; ++j) {
    TORCH_CHECK(slp[j] >= 0 && slp[j] < num_slots, "brgemm_segmented_linear: slot out of range");
    TORCH_CHECK(sp[j] <= sp[j + 1] && sp[j + 1] <= rows, "brgemm_segmented_linear: bad segment bounds");
  }
  return Problem{rows, in, out, n, nb, mb, num_blocks, num_segments, sp, slp, coeffs.data_ptr<float>(),
                 has_bias ? bias.data_ptr<float>() : nullptr, optional_rows(scale, num_slots, out, "scale"),
                 optional_rows(shift, num_slots, out, "shift")};
}

template <typename T, typename Compose, typename Epilogue>
void run(const Problem& p, const T* xp, const T* pp, T* yp, bool vnni, Compose compose, Epilogue epilogue) {
  const int64_t block = p.in * p.nb;
  const int64_t template_stride = p.num_blocks * block;
  // work items in block-major order: a thread's contiguous range reuses the same template blocks (in L2)
  at::parallel_for(0, p.num_blocks * p.num_segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> weight(static_cast<size_t>(block));
    std::vector<float> acc(static_cast<size_t>(p.mb * p.nb));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.num_segments, j = item % p.num_segments;
      const int64_t r0 = p.starts[j], r1 = p.starts[j + 1];
      if (r1 == r0) continue;
      compose(pp + b * block, template_stride, p.coeffs + p.slots[j] * p.n, p.n, block, weight.data());
      const int64_t col = b * p.nb, width = std::min(p.nb, p.out - col);
      for (int64_t r = r0; r < r1; r += p.mb) {
        const int64_t m = std::min(p.mb, r1 - r);
        epilogue(m, width, xp + r * p.in, weight.data(), acc.data(), yp + r * p.out + col, p.at(p.slots[j], col));
      }
    }
    at::native::cpublas::brgemm_release(vnni);
  });
}

}  // namespace

// x (T, in) float32, bfloat16 or float16 rows sorted by slot; starts (G + 1,), slots (G,) int64; packed
// (n, ceil(out / nb), in * nb) in x's dtype (see kernels/packed_templates.py); coeffs (S, n) float32; bias
// (out,) float32 or empty; scale and shift (S, out) float32 or empty (each row's task's output scale and
// shift, applied after the bias); nb output columns per block; mb rows per BRGEMM call. Returns y (T, out),
// x's dtype.
torch::Tensor brgemm_segmented_linear(torch::Tensor x, torch::Tensor starts, torch::Tensor slots,
                                      torch::Tensor packed, torch::Tensor coeffs, torch::Tensor bias,
                                      torch::Tensor scale, torch::Tensor shift, int64_t out, int64_t nb,
                                      int64_t mb) {
  const Problem p = check(x, starts, slots, packed, coeffs, bias, scale, shift, out, nb, mb);
  auto y = torch::empty({p.rows, out}, x.options());
  if (p.rows == 0 || p.num_segments == 0) return y;
  const int64_t in = p.in, nbw = p.nb, ldy = out;
  const bool plain = p.bias == nullptr && p.scale == nullptr && p.shift == nullptr;
  if (x.scalar_type() == at::kFloat) {
    run<float>(p, x.data_ptr<float>(), packed.data_ptr<float>(), y.data_ptr<float>(), false, compose_f32,
               [&](int64_t m, int64_t w, const float* a, const float* w_block, float*, float* c, Epilogue e) {
                 at::native::cpublas::brgemm(m, w, in, in, nbw, ldy, false, a, w_block, c, false);
                 if (!plain) finish_f32(e, m, w, c, ldy);
               });
    return y;
  }
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "brgemm_segmented_linear: float32 or bfloat16 tensors only");
  TORCH_CHECK(in % 2 == 0, "brgemm_segmented_linear: bfloat16 needs an even in_features (VNNI pairs)");
  auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* pp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  static const ComposeBf16 compose_bf16 = pick_compose_bf16();
  run<uint16_t>(p, xp, pp, yp, true, compose_bf16,
                [&](int64_t m, int64_t w, const uint16_t* a, const uint16_t* w_block, float* acc, uint16_t* c,
                    Epilogue e) {
                  at::native::cpublas::brgemm(m, w, in, in, nbw, nbw, false,
                                              reinterpret_cast<const at::BFloat16*>(a),
                                              reinterpret_cast<const at::BFloat16*>(w_block), acc, true);
                  store_bf16(acc, nbw, e, m, w, c, ldy);
                });
  return y;
}

// Whether BRGEMM runs natively for `dtype` on this CPU (false: libtorch would fall back to a slow loop).
bool brgemm_supported(torch::ScalarType dtype) { return at::native::cpublas::could_pack(dtype); }

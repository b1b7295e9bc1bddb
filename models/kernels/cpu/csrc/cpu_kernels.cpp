// Fused fp32 CPU kernels: RMSNorm, SwiGLU and block-causal attention forward and backward, and the weight gradient
// of a linear layer.
//
// ATen runs RMSNorm as five separate passes over the activations (pow, mean, rsqrt, two multiplies) and SwiGLU as
// two (silu, multiply), each reading and writing whole tensors; here each is one pass per direction. Attention is
// the block-causal scheme of models/kernels/cpu/attention.py done in one call: queries in blocks of `block` rows, each
// multiplied only by the keys at or before its last row, with the rotary embedding and layout changes fused into one
// copy per operand, and each head a task of its own, so that its scores go from the product that makes them through
// the masked softmax into the next product while still in the core's cache. Its matmuls run in this file
// (`cache_matmul`): register tiles with no per-call set-up, faster at these small shapes than oneDNN (which the weight
// gradient uses) or ATen's BLAS (MKL, AVX2 code on AMD CPUs). Built on first use by models/kernels/cpu/native.py; the
// Python wrappers there and in models/kernels/cpu/linear.py own autograd. Every kernel is deterministic for a given thread
// count and reduces in a fixed order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace at::native {
// Exported by libtorch_cpu (aten/src/ATen/native/mkldnn/Matmul.cpp) but absent from the installed headers:
// result = alpha * mat1 @ mat2 + beta * result through oneDNN, for 2-D or 3-D operands that are contiguous or
// transposed in their last two dimensions (others it copies first); about 17 us of set-up per call. fp32 stays fp32
// unless the user asked oneDNN for reduced precision (torch.backends.mkldnn.matmul.fp32_precision). It refuses CPUs
// without AVX-512 (or AVX-NE-CONVERT).
void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace supertrain {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

void check_fp32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "supertrain_cpu: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// ---- matmul -------------------------------------------------------------------------------------------------

// Whether oneDNN's matmul runs on this CPU: tried once on a small product and checked against ATen's mm.
bool probe_onednn_matmul() {
  try {
    auto a = at::randn({24, 16});
    auto b = at::randn({16, 40});
    auto out = at::empty({24, 40});
    at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
    return at::allclose(out, at::mm(a, b), 1e-4, 1e-4);
  } catch (const std::exception&) {
    return false;
  }
}

bool onednn_matmul_available() {
  static const bool available = probe_onednn_matmul();
  return available;
}

// dst (cols, rows, row stride ld_dst) = src (rows, cols, row stride ld_src) transposed, on the calling thread, in
// tiles that stay in cache, each 16 x 16 piece transposed in registers.
constexpr int64_t kTransposeTile = 64;

void transpose_into(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; r += kTransposeTile) {
    for (int64_t c = 0; c < cols; c += kTransposeTile) {
      at::vec::transpose_mxn<float>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst,
                                    static_cast<int>(std::min(kTransposeTile, rows - r)),
                                    static_cast<int>(std::min(kTransposeTile, cols - c)));
    }
  }
}

// (rows, cols) -> contiguous (cols, rows), bands of rows in parallel.
at::Tensor transpose_copy(const at::Tensor& matrix) {
  const auto src = matrix.contiguous();
  const int64_t rows = src.size(0), cols = src.size(1);
  auto out = at::empty({cols, rows}, src.options());
  const float* ps = src.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  const int64_t bands = (rows + kTransposeTile - 1) / kTransposeTile;
  at::parallel_for(0, bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t band = begin; band < end; ++band) {
      const int64_t r = band * kTransposeTile;
      transpose_into(ps + r * cols, std::min(kTransposeTile, rows - r), cols, cols, po + r, rows);
    }
  });
  return out;
}

// ---- stores that bypass the caches ----------------------------------------------------------------------------

// What attention's forward keeps for backward (the probabilities and the packed q, k and v: ~43 MB a layer at
// 8 x 512 tokens and 4 heads of 128, more than this project's hosts' 32 MB L3) is read only in backward, long after.
// Written through the caches it evicted the operands of the ops that come next; written around them, with
// non-temporal stores, the benchmark's model step took ~1.5% less time at head width 128 (paired runs; no change
// measured at 64: docs/design_decisions.md).
enum class Store { cached, streaming };

template <Store How>
void store_vec(float* to, const Vec& value, int64_t count = kVec) {
  if constexpr (How == Store::streaming) {
    // Non-temporal stores take whole, aligned vectors; the rest (a row's unaligned start or partial end) is cached.
    if (count == kVec && reinterpret_cast<std::uintptr_t>(to) % sizeof(Vec) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_ps(to, value);
      return;
#elif defined(CPU_CAPABILITY_AVX2)
      _mm256_stream_ps(to, value);
      return;
#endif
    }
  }
  value.store(to, static_cast<int>(count));
}

// Orders a task's non-temporal stores before whatever later reads them (the end of the parallel region).
void finish_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// ---- matmuls on data in cache -----------------------------------------------------------------------------------

// Attention multiplies blocks of at most a few hundred rows and columns, a few dozen microseconds each, whose
// operands are in the core's cache. oneDNN sets up every call (~10 us; on one core at 128 x 128 x 128 it ran at ~145
// GFLOP/s where this kernel runs at ~240, and at 128 x 512 x 128 ~205 against ~245); this one has none: a register
// tile of kTileRows rows x two vectors of columns, accumulated over the whole inner dimension by broadcasting one
// element of `a` per row against one row of `b`. Sums run in order of k, so results do not depend on the thread
// count.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileRows = 12;  // 24 accumulators of the 32 vector registers
#else
constexpr int kTileRows = 6;  // 12 accumulators of the 16
#endif
constexpr int kTileVecs = 2;
constexpr int64_t kPanel = kTileVecs * kVec;  // columns of a tile

// A matrix read in place: element (i, k) at data[i * row_stride + k * col_stride], so a transposed view is free.
struct Operand {
  const float* data;
  int64_t row_stride;
  int64_t col_stride;
};

// The right operand: column j of row k at data[(j / kPanel) * panel_stride + k * row_stride + j % kPanel]. A
// row-major matrix is the case panel_stride = kPanel; `pack_rows` and `pack_columns` lay one out as contiguous
// panels of kPanel columns (panel_stride = rows * kPanel), which a tile then reads front to back (with heads of 64
// the attention backward took ~8% less time than reading rows 256 bytes apart; with heads of 128 the same).
struct Panels {
  const float* data;
  int64_t row_stride;
  int64_t panel_stride;
  const float* column(int64_t j) const { return data + j / kPanel * panel_stride + j % kPanel; }
  Panels from_row(int64_t k) const { return {data + k * row_stride, row_stride, panel_stride}; }
};

// Floats that pack_rows or pack_columns writes for a (rows, cols) matrix.
int64_t packed_size(int64_t rows, int64_t cols) { return (cols + kPanel - 1) / kPanel * kPanel * rows; }

// A (rows, cols) matrix that pack_rows or pack_columns wrote at `data`, read again.
Panels packed_at(const float* data, int64_t rows) { return {data, kPanel, rows * kPanel}; }

// src (rows, cols; row stride ld) as panels of kPanel columns: dst[(j / kPanel) * rows * kPanel + r * kPanel + j %
// kPanel]; a last, narrower panel is padded with zeros.
template <Store How = Store::cached>
Panels pack_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t j = 0; j < cols; j += kPanel) {
    float* panel = dst + j * rows;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < kPanel; c += kVec) {
        const int64_t count = std::clamp<int64_t>(cols - j - c, 0, kVec);
        const float* from = src + r * ld + j + c;
        store_vec<How>(panel + r * kPanel + c, count == kVec ? Vec::loadu(from) : Vec::loadu(from, count));
      }
    }
  }
  return {dst, kPanel, rows * kPanel};
}

// The transpose of src (cols, rows; row stride ld), that is a (rows, cols) matrix, as panels (see pack_rows) that lie
// `panel_stride` floats apart: rows * kPanel when they hold this matrix alone, more when it is a band of rows of a
// taller one's panels.
Panels pack_columns(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst, int64_t panel_stride) {
  for (int64_t j = 0; j < cols; j += kPanel) {
    const int64_t width = std::min(kPanel, cols - j);
    float* panel = dst + j / kPanel * panel_stride;
    if (width < kPanel) {
      std::fill(panel, panel + rows * kPanel, 0.0f);
    }
    transpose_into(src + j * ld, width, rows, ld, panel, kPanel);
  }
  return {dst, kPanel, panel_stride};
}

Panels pack_columns(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  return pack_columns(src, rows, cols, ld, dst, rows * kPanel);
}

// The transpose of a (rows, cols) matrix that pack_rows laid out at `panels`, as pack_columns lays it out: the same
// result as pack_columns on the matrix's rows, but read from its panels, each a contiguous (rows, kPanel) band that
// gives kPanel rows of every output panel. Attention's v rows lie a whole token's q, k and v apart (6 KB at 4 heads
// of 128), and transposing them from there took the forward ~6% longer (paired runs).
void pack_columns_from_panels(const float* panels, int64_t rows, int64_t cols, float* dst) {
  for (int64_t p = 0; p < cols; p += kPanel) {
    pack_columns(panels + p * rows, std::min(kPanel, cols - p), rows, kPanel, dst + p * kPanel, cols * kPanel);
  }
}

// c[0:Rows, 0:Vecs vectors] (+)= a[0:Rows, 0:depth] @ b[0:depth, same columns]; with Partial, the single vector of
// columns holds only `count` of them.
template <int Rows, int Vecs, bool Partial>
void matmul_tile(Operand a, const float* b, int64_t b_row_stride, float* c, int64_t c_row_stride, int64_t depth,
                 bool accumulate, int64_t count) {
  static_assert(!Partial || Vecs == 1, "only a single vector of columns can be partial");
  const auto load = [count](const float* from) { return Partial ? Vec::loadu(from, count) : Vec::loadu(from); };
  Vec sums[Rows][Vecs];
  for (int i = 0; i < Rows; ++i) {
    for (int v = 0; v < Vecs; ++v) {
      sums[i][v] = accumulate ? load(c + i * c_row_stride + v * kVec) : Vec(0.0f);
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec row[Vecs];
    for (int v = 0; v < Vecs; ++v) {
      row[v] = load(b + k * b_row_stride + v * kVec);
    }
    const float* column = a.data + k * a.col_stride;
    for (int i = 0; i < Rows; ++i) {
      const Vec element(column[i * a.row_stride]);
      for (int v = 0; v < Vecs; ++v) {
        sums[i][v] = at::vec::fmadd(element, row[v], sums[i][v]);
      }
    }
  }
  for (int i = 0; i < Rows; ++i) {
    for (int v = 0; v < Vecs; ++v) {
      if (Partial) {
        sums[i][v].store(c + i * c_row_stride + v * kVec, static_cast<int>(count));
      } else {
        sums[i][v].store(c + i * c_row_stride + v * kVec);
      }
    }
  }
}

template <int Vecs, bool Partial>
void matmul_tile_rows(int rows, Operand a, const float* b, int64_t b_row_stride, float* c, int64_t c_row_stride,
                      int64_t depth, bool accumulate, int64_t count) {
  switch (rows) {
#define SUPERTRAIN_TILE(n)                                                                            \
  case n:                                                                                             \
    return matmul_tile<n, Vecs, Partial>(a, b, b_row_stride, c, c_row_stride, depth, accumulate, count);
    SUPERTRAIN_TILE(1) SUPERTRAIN_TILE(2) SUPERTRAIN_TILE(3) SUPERTRAIN_TILE(4) SUPERTRAIN_TILE(5) SUPERTRAIN_TILE(6)
#if defined(CPU_CAPABILITY_AVX512)
    SUPERTRAIN_TILE(7) SUPERTRAIN_TILE(8) SUPERTRAIN_TILE(9) SUPERTRAIN_TILE(10) SUPERTRAIN_TILE(11)
    SUPERTRAIN_TILE(12)
#endif
#undef SUPERTRAIN_TILE
    default:
      TORCH_CHECK(false, "supertrain_cpu: a matmul tile of ", rows, " rows");
  }
}

// c (m, n; row stride c_row_stride) = a (m, depth) @ b (depth, n), or c += that with `accumulate`, on the calling
// thread.
void cache_matmul(int64_t m, int64_t n, int64_t depth, Operand a, Panels b, float* c, int64_t c_row_stride,
                  bool accumulate) {
  for (int64_t j = 0; j < n; j += kPanel) {
    const float* bj = b.column(j);
    for (int64_t i = 0; i < m; i += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - i));
      const Operand ai{a.data + i * a.row_stride, a.row_stride, a.col_stride};
      float* cij = c + i * c_row_stride + j;
      if (j + kPanel <= n) {
        matmul_tile_rows<kTileVecs, false>(rows, ai, bj, b.row_stride, cij, c_row_stride, depth, accumulate, kVec);
        continue;
      }
      int64_t column = j;  // a last, narrower panel: whole vectors, then the rest
      for (; column + kVec <= n; column += kVec) {
        matmul_tile_rows<1, false>(rows, ai, bj + (column - j), b.row_stride, cij + (column - j), c_row_stride,
                                   depth, accumulate, kVec);
      }
      if (column < n) {
        matmul_tile_rows<1, true>(rows, ai, bj + (column - j), b.row_stride, cij + (column - j), c_row_stride,
                                  depth, accumulate, n - column);
      }
    }
  }
}

// The weight gradient of y = x w^T: g^T x for g (tokens, out) and x (tokens, in), inner dimension = tokens. oneDNN
// takes both operands as transposed views without copies, and runs the product fastest with the shorter of the two
// feature dimensions as rows (measured: about 400 GFLOP/s against 330 for the other orientation at 512 x 1536); for a
// widening layer that is x^T g, whose small result is transposed back.
at::Tensor linear_weight_grad(const at::Tensor& grad_out, const at::Tensor& input, bool onednn) {
  check_fp32_cpu(grad_out, "grad_out");
  check_fp32_cpu(input, "input");
  const auto g = grad_out.reshape({-1, grad_out.size(-1)}).contiguous();
  const auto x = input.reshape({-1, input.size(-1)}).contiguous();
  TORCH_CHECK(g.size(0) == x.size(0), "supertrain_cpu::linear_weight_grad: ", g.size(0), " gradient rows for ",
              x.size(0), " input rows");
  const bool widening = g.size(1) > x.size(1);
  const auto& rows = widening ? x : g;
  const auto& cols = widening ? g : x;
  auto product = at::empty({rows.size(1), cols.size(1)}, x.options());
  if (onednn) {
    at::native::mkldnn_matmul(rows.t(), cols, product, 0.0f, 1.0f);
  } else {
    at::mm_out(product, rows.t(), cols);
  }
  return widening ? transpose_copy(product) : product;
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------

// Rows of the weight gradient's partial sums: a fixed number, so the reduction order never depends on the threads.
constexpr int64_t kNormChunks = 64;

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_fp32_cpu(input, "input");
  check_fp32_cpu(weight, "weight");
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  const int64_t d = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == d, "supertrain_cpu::rms_norm: weight of shape ", w.sizes(),
              " does not match the last dimension ", d);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  auto y = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options());
  const float* px = x.const_data_ptr<float>();
  const float* pw = w.const_data_ptr<float>();
  float* py = y.mutable_data_ptr<float>();
  float* pr = rstd.mutable_data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = px + r * d;
      const float squares = at::vec::map_reduce_all<float>(
          [](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; }, xr, d);
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(d) + epsilon);
      pr[r] = scale;
      at::vec::map2<float>([scale](Vec v, Vec g) { return v * Vec(scale) * g; }, py + r * d, xr, pw, d);
    }
  });
  return {y, rstd};
}

// y = x * s * w with s = 1/rms(x): dx = s * (dy * w) - x * s^3 * mean(dy * w * x), dw = sum over rows of dy * x * s.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& input,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  const auto g = grad.contiguous();
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  const auto s = rstd.contiguous();
  const int64_t d = x.size(-1);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  auto grad_input = at::empty_like(x);
  auto partial = at::zeros({kNormChunks, d}, x.options());
  const float* pg = g.const_data_ptr<float>();
  const float* px = x.const_data_ptr<float>();
  const float* pw = w.const_data_ptr<float>();
  const float* ps = s.const_data_ptr<float>();
  float* pgx = grad_input.mutable_data_ptr<float>();
  float* pp = partial.mutable_data_ptr<float>();
  const int64_t rows_per_chunk = (rows + kNormChunks - 1) / kNormChunks;
  at::parallel_for(0, kNormChunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* acc = pp + chunk * d;
      const int64_t last = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t r = chunk * rows_per_chunk; r < last; ++r) {
        const float* gr = pg + r * d;
        const float* xr = px + r * d;
        const float scale = ps[r];
        const float dot = at::vec::map3_reduce_all<float>(
            [](Vec a, Vec b, Vec c) { return a * b * c; }, [](Vec a, Vec b) { return a + b; }, gr, pw, xr, d);
        const float correction = scale * scale * scale * dot / static_cast<float>(d);
        at::vec::map3<float>(
            [scale, correction](Vec a, Vec b, Vec c) { return a * b * Vec(scale) - c * Vec(correction); },
            pgx + r * d, gr, pw, xr, d);
        at::vec::map3<float>([scale](Vec total, Vec a, Vec c) { return total + a * c * Vec(scale); }, acc, acc, gr, xr,
                             d);
      }
    }
  });
  return {grad_input, partial.sum(0)};
}

// ---- SwiGLU ----------------------------------------------------------------------------------------------------

// The gate and up projections arrive paired, as one product against the stored (hidden, 2, d) weight gives them:
// each hidden unit's gate value, then its up value ([a0 b0 a1 b1 ...] along the last dimension). The pairs are
// independent of the rows they sit in, so the work splits over pairs; the input's gradient is written paired too,
// so the projection's backward takes it as one tensor.
namespace {

int64_t pair_count(const at::Tensor& gate_up, const char* op) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "supertrain_cpu::", op,
              ": the last dimension holds (gate, up) pairs and must be even, got ", gate_up.sizes());
  return gate_up.numel() / 2;
}

}  // namespace

// silu(a) * b for each pair (a, b). silu(a) = a / (1 + exp(-a)), as ATen computes it.
at::Tensor swiglu(const at::Tensor& gate_up) {
  check_fp32_cpu(gate_up, "gate_up");
  const int64_t pairs = pair_count(gate_up, "swiglu");
  const auto x = gate_up.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() /= 2;
  auto out = at::empty(sizes, x.options());
  const float* px = x.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, pairs, 8192, [&](int64_t begin, int64_t end) {
    const Vec one(1.0f);
    int64_t i = begin;
    for (; i + kVec <= end; i += kVec) {
      const auto [a, b] = at::vec::deinterleave2(Vec::loadu(px + 2 * i), Vec::loadu(px + 2 * i + kVec));
      ((a / (one + a.neg().exp())) * b).store(po + i);
    }
    for (; i < end; ++i) {
      const float a = px[2 * i];
      po[i] = a / (1.0f + std::exp(-a)) * px[2 * i + 1];
    }
  });
  return out;
}

// d/da = g * b * sig(a) * (1 + a * (1 - sig(a))), d/db = g * silu(a); returned paired as the input.
at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& gate_up) {
  const int64_t pairs = pair_count(gate_up, "swiglu_backward");
  const auto g = grad.contiguous();
  const auto x = gate_up.contiguous();
  TORCH_CHECK(g.numel() == pairs, "supertrain_cpu::swiglu_backward: gradient ", g.sizes(), " does not match gate_up ",
              x.sizes());
  auto grad_gate_up = at::empty_like(x);
  const float* pg = g.const_data_ptr<float>();
  const float* px = x.const_data_ptr<float>();
  float* pout = grad_gate_up.mutable_data_ptr<float>();
  at::parallel_for(0, pairs, 8192, [&](int64_t begin, int64_t end) {
    const Vec one(1.0f);
    int64_t i = begin;
    for (; i + kVec <= end; i += kVec) {
      const auto [a, b] = at::vec::deinterleave2(Vec::loadu(px + 2 * i), Vec::loadu(px + 2 * i + kVec));
      const Vec gi = Vec::loadu(pg + i);
      const Vec sig = one / (one + a.neg().exp());
      const auto [first, second] = at::vec::interleave2(gi * b * sig * (one + a * (one - sig)), gi * (a * sig));
      first.store(pout + 2 * i);
      second.store(pout + 2 * i + kVec);
    }
    for (; i < end; ++i) {
      const float a = px[2 * i];
      const float b = px[2 * i + 1];
      const float sig = 1.0f / (1.0f + std::exp(-a));
      pout[2 * i] = pg[i] * b * sig * (1.0f + a * (1.0f - sig));
      pout[2 * i + 1] = pg[i] * (a * sig);
    }
  });
  return grad_gate_up;
}

// ---- block-causal attention -----------------------------------------------------------------------------------

// Query rows in blocks of `block`: block i holds rows [start(i), end(i)) and sees keys [0, end(i)).
struct Blocks {
  int64_t seq;
  int64_t block;
  int64_t count() const { return (seq + block - 1) / block; }
  int64_t start(int64_t i) const { return i * block; }
  int64_t end(int64_t i) const { return std::min(seq, (i + 1) * block); }
  // One head keeps every block's (rows, keys it sees) probabilities, one block after the other: where block i's
  // begin, and (for i = count()) how many there are.
  int64_t probabilities_before(int64_t i) const {
    int64_t total = 0;
    for (int64_t j = 0; j < i; ++j) {
      total += (end(j) - start(j)) * end(j);
    }
    return total;
  }
  int64_t probabilities() const { return probabilities_before(count()); }
};

// Rotary embedding of consecutive pairs at each position: y = x * c + swap_pairs(x) * s, with per pair c = (cos, cos)
// and s = (-sin, sin); the inverse rotation (its backward) is x = y * c - swap_pairs(y) * s. Undefined tables: none.
struct Rotation {
  at::Tensor c, s;  // (seq, dim)
  bool active() const { return c.defined(); }
};

Rotation make_rotation(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, int64_t seq,
                       int64_t dim) {
  if (!cos.has_value() && !sin.has_value()) {
    return {};
  }
  TORCH_CHECK(cos.has_value() && sin.has_value() && cos->sizes() == sin->sizes() && cos->dim() == 2 &&
                  cos->size(0) >= seq && 2 * cos->size(1) == dim,
              "supertrain_cpu::causal_attention: cos and sin must both be (>= ", seq, ", ", dim / 2, ")");
  const auto c = cos->narrow(0, 0, seq).to(at::kFloat);
  const auto s = sin->narrow(0, 0, seq).to(at::kFloat);
  return {at::stack({c, c}, -1).reshape({seq, dim}).contiguous(),
          at::stack({-s, s}, -1).reshape({seq, dim}).contiguous()};
}

Vec swap_pairs(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_permute_ps(v, 0xB1));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_permute_ps(v, 0xB1));
#else
  float lanes[kVec];
  v.store(lanes);
  for (int64_t j = 0; j < kVec; j += 2) {
    std::swap(lanes[j], lanes[j + 1]);
  }
  return Vec::loadu(lanes);
#endif
}

// to[0:dim] = (from * c + direction * swap_pairs(from) * s) * scale. dim is even, so a vector never splits a pair.
void rotate_row(float* to, const float* from, const float* c, const float* s, int64_t dim, float direction,
                float scale) {
  const Vec signed_scale(direction * scale), plain_scale(scale);
  for (int64_t j = 0; j < dim; j += kVec) {
    const int64_t count = std::min(kVec, dim - j);
    const Vec x = Vec::loadu(from + j, count);
    const Vec rotated =
        x * Vec::loadu(c + j, count) * plain_scale + swap_pairs(x) * Vec::loadu(s + j, count) * signed_scale;
    rotated.store(to + j, count);
  }
}

// Where head `head` (of batch * heads) of x (batch, seq, heads, dim) starts: its rows lie x.stride(1) apart.
int64_t head_offset(const at::Tensor& x, int64_t head) {
  return head / x.size(2) * x.stride(0) + head % x.size(2) * x.stride(2);
}

// One head's `seq` rows of `dim` floats from `from` (rows from_stride apart) to `to` (rows to_stride apart), on the
// calling thread: rotated (if `rotation` is active; direction -1 rotates back) and times `scale`. Forward copies a
// head out of a (batch, seq, heads, dim) tensor, backward copies its gradients back into one.
void copy_head_rows(float* to, int64_t to_stride, const float* from, int64_t from_stride, int64_t seq, int64_t dim,
                    float scale, const Rotation& rotation, float direction) {
  const float* pc = rotation.active() ? rotation.c.const_data_ptr<float>() : nullptr;
  const float* ps = rotation.active() ? rotation.s.const_data_ptr<float>() : nullptr;
  for (int64_t s = 0; s < seq; ++s) {
    if (pc != nullptr) {
      rotate_row(to + s * to_stride, from + s * from_stride, pc + s * dim, ps + s * dim, dim, direction, scale);
    } else {
      at::vec::map<float>([scale](Vec v) { return v * Vec(scale); }, to + s * to_stride, from + s * from_stride, dim);
    }
  }
}

// (batch * heads_in, seq, dim) -> `out` (batch, seq, heads_out, dim, unit stride in dim), times `scale`, summing the
// `heads_in / heads_out` consecutive heads that share an output head, then rotated back (if `rotation` is active).
void from_heads_into(const at::Tensor& out, const at::Tensor& heads, float scale, const Rotation& rotation = {}) {
  const int64_t batch = out.size(0), seq = out.size(1), heads_out = out.size(2), dim = out.size(3);
  const int64_t heads_in = heads.size(0) / batch, group = heads_in / heads_out;
  const float* src = heads.const_data_ptr<float>();
  const float* pc = rotation.active() ? rotation.c.const_data_ptr<float>() : nullptr;
  const float* ps = rotation.active() ? rotation.s.const_data_ptr<float>() : nullptr;
  float* dst = out.mutable_data_ptr<float>();
  const int64_t ob = out.stride(0), os = out.stride(1), oh = out.stride(2);
  at::parallel_for(0, batch * seq, 8, [&](int64_t begin, int64_t end) {
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / seq, s = bs % seq;
      for (int64_t h = 0; h < heads_out; ++h) {
        float* to = dst + b * ob + s * os + h * oh;
        const float* first = src + ((b * heads_in + h * group) * seq + s) * dim;
        at::vec::map<float>([scale](Vec v) { return v * Vec(scale); }, to, first, dim);
        for (int64_t k = 1; k < group; ++k) {
          at::vec::map2<float>([scale](Vec total, Vec v) { return total + v * Vec(scale); }, to, to,
                               first + k * seq * dim, dim);
        }
        if (pc != nullptr) {
          rotate_row(to, to, pc + s * dim, ps + s * dim, dim, -1.0f, 1.0f);
        }
      }
    }
  });
}

// In place, scores -> probabilities for rows [start, start + rows) of one head, also written to `kept` (around the
// caches: see Store): row r sees keys 0..start + r, the later ones get probability 0. `scores` and `kept` are
// (rows, keys) contiguous.
void causal_softmax_rows(float* scores, float* kept, int64_t rows, int64_t keys, int64_t start) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * keys;
    float* kept_row = kept + r * keys;
    const int64_t valid = start + r + 1;
    const float top =
        at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, row, valid);
    // exp_u20 (within 20 ulp), as ATen's own CPU flash-attention kernel takes for its softmax: the attention call
    // took 4% less time than with the 1-ulp exp.
    at::vec::map<float>([top](Vec v) { return (v - Vec(top)).exp_u20(); }, row, row, valid);
    const Vec inverse(1.0f / at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, row, valid));
    std::fill(row + valid, row + keys, 0.0f);
    for (int64_t j = 0; j < keys; j += kVec) {
      const int count = static_cast<int>(std::min(kVec, keys - j));
      const Vec probability = Vec::loadu(row + j, count) * inverse;
      probability.store(row + j, count);
      store_vec<Store::streaming>(kept_row + j, probability, count);
    }
  }
}

// Head index of the kv head that query head `head` (of batch * heads) reads.
int64_t kv_head_of(int64_t head, int64_t heads, int64_t kv_heads) {
  return head / heads * kv_heads + head % heads / (heads / kv_heads);
}

// One call per layer: each head is one task (a thread takes whole heads), so that a head's q, k, v, scores and
// probabilities stay in the core's cache from the product that makes them to the one that reads them; the batched
// form (all heads per product, one product per block pair) ran its matmuls at ~60% of the rate they reach on data
// in cache. With cos and sin (seq, dim / 2), q and k are first rotated (rotary embedding of consecutive pairs),
// inside the copies the kernel makes anyway. Returned for backward, in this order, each packed once here in the
// panels backward's products read (see Panels), from rows still in cache: q (rotated, scaled) per head, k (rotated)
// and v^T per kv head (kv heads are not expanded: a query head reads its kv head in place), and the probabilities
// of each head (see Blocks::probabilities); all but v^T are written around the caches (see Store). Backward also
// takes the output, which the caller keeps (the next projection keeps it anyway).
std::tuple<at::Tensor, std::vector<at::Tensor>> causal_attention(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const std::optional<at::Tensor>& cos,
                                                                 const std::optional<at::Tensor>& sin,
                                                                 int64_t block) {
  for (const auto& [t, name] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}}) {
    check_fp32_cpu(t, name);
    TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "supertrain_cpu::causal_attention: ", name,
                " must be (batch, seq, heads, dim) with unit stride in dim");
  }
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), kv_heads = k.size(2);
  TORCH_CHECK(v.size(2) == kv_heads && heads % kv_heads == 0, "supertrain_cpu::causal_attention: ", heads,
              " query heads cannot share ", kv_heads, " key/value heads");
  TORCH_CHECK(block > 0 && k.size(1) == seq && v.size(1) == seq && k.size(3) == q.size(3),
              "supertrain_cpu::causal_attention: mismatched q, k, v shapes");
  const Blocks blocks{seq, block};
  const int64_t qk_dim = q.size(3), v_dim = v.size(3);
  const float scale = 1.0f / std::sqrt(static_cast<float>(qk_dim));
  const Rotation rotation = make_rotation(cos, sin, seq, qk_dim);
  const int64_t q_size = packed_size(seq, qk_dim), k_size = q_size, v_size = packed_size(v_dim, seq);
  auto q_packed = at::empty({batch * heads, q_size}, q.options());
  auto k_packed = at::empty({batch * kv_heads, k_size}, q.options());
  auto v_packed = at::empty({batch * kv_heads, v_size}, q.options());
  const int64_t group = heads / kv_heads;
  // Each task writes its head's output rows straight into `out`, heads * v_dim apart: 2-4% less time than a
  // per-head layout and a final pass (docs/design_decisions.md).
  auto out = at::empty({batch, seq, heads, v_dim}, q.options());
  const int64_t out_row_stride = heads * v_dim;
  auto probabilities = at::empty({batch * heads, blocks.probabilities()}, q.options());
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    // Per task, in cache: the kv head as the right operands of q k^T (k transposed) and P v, in panels (see
    // Panels); a block's scores, kept here from q k^T through the softmax into P v, the probabilities for backward
    // written once in the softmax's last pass (q k^T writing them in place, in scattered tiles to memory not in
    // cache, ran at ~130 GFLOP/s a core against ~180); and one head's rows, contiguous (k's while they are packed,
    // then q's, the left operand of q k^T).
    auto scratch =
        at::empty({packed_size(qk_dim, seq) + packed_size(seq, v_dim) + block * seq + seq * qk_dim}, q.options());
    float* keys_buffer = scratch.mutable_data_ptr<float>();
    float* values_buffer = keys_buffer + packed_size(qk_dim, seq);
    float* scores = values_buffer + packed_size(seq, v_dim);
    float* head_rows = scores + block * seq;
    Panels keys{}, values{};
    int64_t packed_kv = -1;
    for (int64_t head = begin; head < end; ++head) {
      const int64_t kv = kv_head_of(head, heads, kv_heads);
      if (kv != packed_kv) {  // query heads that share a kv head are consecutive
        copy_head_rows(head_rows, qk_dim, k.const_data_ptr<float>() + head_offset(k, kv), k.stride(1), seq, qk_dim,
                       1.0f, rotation, 1.0f);
        keys = pack_columns(head_rows, qk_dim, seq, qk_dim, keys_buffer);
        const float* v_rows = v.const_data_ptr<float>() + head_offset(v, kv);
        values = pack_rows(v_rows, seq, v_dim, v.stride(1), values_buffer);
        if (head % heads % group == 0) {  // one task, the group's first query head's, keeps the kv head
          float* kept_k = k_packed.mutable_data_ptr<float>() + kv * k_size;
          pack_rows<Store::streaming>(head_rows, seq, qk_dim, qk_dim, kept_k);
          pack_columns_from_panels(values_buffer, seq, v_dim, v_packed.mutable_data_ptr<float>() + kv * v_size);
        }
        packed_kv = kv;
      }
      copy_head_rows(head_rows, qk_dim, q.const_data_ptr<float>() + head_offset(q, head), q.stride(1), seq, qk_dim,
                     scale, rotation, 1.0f);
      float* kept_q = q_packed.mutable_data_ptr<float>() + head * q_size;
      pack_rows<Store::streaming>(head_rows, seq, qk_dim, qk_dim, kept_q);
      float* om = out.mutable_data_ptr<float>() + head_offset(out, head);
      float* head_p = probabilities.mutable_data_ptr<float>() + head * blocks.probabilities();
      for (int64_t i = 0; i < blocks.count(); ++i) {
        const int64_t start = blocks.start(i), stop = blocks.end(i), rows = stop - start;
        float* p = head_p + blocks.probabilities_before(i);
        cache_matmul(rows, stop, qk_dim, {head_rows + start * qk_dim, qk_dim, 1}, keys, scores, stop, false);
        causal_softmax_rows(scores, p, rows, stop, start);
        cache_matmul(rows, v_dim, stop, {scores, stop, 1}, values, om + start * out_row_stride, out_row_stride,
                     false);
      }
    }
    finish_streaming_stores();
  });
  return {out, {q_packed, k_packed, v_packed, probabilities}};
}

// Gradients for q, k, v in their shapes (k and v summed back over the query heads that shared them), as views of one
// (batch, seq, q width + k width + v width) tensor that holds them side by side: the gradient a q, k, v projection
// made as one product (models/kernels/cpu/linear.py) takes whole, without concatenating three pieces. One head per task, as
// forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(const at::Tensor& grad_out,
                                                                          at::TensorList saved,
                                                                          const std::optional<at::Tensor>& cos,
                                                                          const std::optional<at::Tensor>& sin,
                                                                          int64_t kv_heads, int64_t qk_dim,
                                                                          int64_t block) {
  TORCH_CHECK(saved.size() == 5,
              "supertrain_cpu::causal_attention_backward: expected q, k, v, the output and the probabilities, got ",
              saved.size(), " tensors");
  const at::Tensor &qh = saved[0], &kh = saved[1], &vh = saved[2], &out = saved[3], &probabilities = saved[4];
  const int64_t batch = grad_out.size(0), seq = grad_out.size(1), heads = grad_out.size(2), v_dim = grad_out.size(3);
  const Blocks blocks{seq, block};
  const int64_t q_size = packed_size(seq, qk_dim), k_size = q_size, v_size = packed_size(v_dim, seq);
  TORCH_CHECK(probabilities.sizes() == at::IntArrayRef({batch * heads, blocks.probabilities()}) &&
                  qh.sizes() == at::IntArrayRef({batch * heads, q_size}) &&
                  kh.sizes() == at::IntArrayRef({batch * kv_heads, k_size}) &&
                  vh.sizes() == at::IntArrayRef({batch * kv_heads, v_size}),
              "supertrain_cpu::causal_attention_backward: saved tensors do not match this gradient");
  for (const auto& t : saved) {  // heads are found by offset
    TORCH_CHECK(t.is_contiguous(), "supertrain_cpu::causal_attention_backward: saved tensors must be contiguous");
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(qk_dim));
  const Rotation rotation = make_rotation(cos, sin, seq, qk_dim);
  const auto g_in = grad_out.stride(3) == 1 ? grad_out : grad_out.contiguous();
  const int64_t g_stride = g_in.stride(1);
  const int64_t q_width = heads * qk_dim, k_width = kv_heads * qk_dim, v_width = kv_heads * v_dim;
  const int64_t width = q_width + k_width + v_width;
  auto grad_qkv = at::empty({batch, seq, width}, grad_out.options());
  // A head writes its q gradient, and (without shared kv heads) its k and v gradients, into grad_qkv from its own
  // task while they are in cache. Query heads that share a kv head keep theirs apart, summed in a final pass, so
  // that no two tasks write the same memory.
  const bool shared_kv = heads != kv_heads;
  at::Tensor grad_kh, grad_vh;
  if (shared_kv) {
    grad_kh = at::empty({batch * heads, seq, qk_dim}, qh.options());
    grad_vh = at::empty({batch * heads, seq, v_dim}, qh.options());
  }
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    auto scratch =
        at::empty({blocks.block * seq + seq * qk_dim + (shared_kv ? 0 : seq * (qk_dim + v_dim))}, qh.options());
    // The right operands are in panels (see Panels): forward packed the kv head (v transposed for dO v^T, k for
    // dS k) and the head's q (for dS^T q); dO (for P^T dO) is packed here.
    auto packed = at::empty({packed_size(seq, v_dim)}, qh.options());
    float* grads_buffer = packed.mutable_data_ptr<float>();
    float* ds = scratch.mutable_data_ptr<float>();
    float* dq = ds + blocks.block * seq;
    float* own_dk = dq + seq * qk_dim;
    float* own_dv = own_dk + seq * qk_dim;
    std::vector<float> row_terms(seq);
    for (int64_t head = begin; head < end; ++head) {
      const int64_t kv = kv_head_of(head, heads, kv_heads);
      const Panels values = packed_at(vh.const_data_ptr<float>() + kv * v_size, v_dim);
      const Panels keys = packed_at(kh.const_data_ptr<float>() + kv * k_size, seq);
      const Panels queries = packed_at(qh.const_data_ptr<float>() + head * q_size, seq);
      // This head's rows of dO, read in place (the softmax term's pass brings them into cache).
      const float* pg = g_in.const_data_ptr<float>() + head_offset(g_in, head);
      float* dk = shared_kv ? grad_kh.mutable_data_ptr<float>() + head * seq * qk_dim : own_dk;
      float* dv = shared_kv ? grad_vh.mutable_data_ptr<float>() + head * seq * v_dim : own_dv;
      // softmax backward: dS = P * (dP - sum(dO * O)) per row.
      const float* po = out.const_data_ptr<float>() + head_offset(out, head);
      for (int64_t s = 0; s < seq; ++s) {
        row_terms[s] = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                                       [](Vec a, Vec b) { return a + b; }, pg + s * g_stride,
                                                       po + s * heads * v_dim, v_dim);
      }
      const Panels grads = pack_rows(pg, seq, v_dim, g_stride, grads_buffer);
      // Last block first: it sees every key, so its products initialise the whole k and v gradients.
      const float* head_p = probabilities.const_data_ptr<float>() + head * blocks.probabilities();
      for (int64_t i = blocks.count() - 1; i >= 0; --i) {
        const int64_t start = blocks.start(i), stop = blocks.end(i), rows = stop - start;
        const float* pp = head_p + blocks.probabilities_before(i);
        const bool later = i + 1 < blocks.count();
        cache_matmul(rows, stop, v_dim, {pg + start * g_stride, g_stride, 1}, values, ds, stop, false);
        for (int64_t r = 0; r < rows; ++r) {
          const float term = row_terms[start + r];
          at::vec::map2<float>([term](Vec d, Vec prob) { return prob * (d - Vec(term)); }, ds + r * stop,
                               ds + r * stop, pp + r * stop, stop);
        }
        cache_matmul(rows, qk_dim, stop, {ds, stop, 1}, keys, dq + start * qk_dim, qk_dim, false);
        // dS^T q and P^T dO: the transposed left operands are read in place.
        cache_matmul(stop, qk_dim, rows, {ds, 1, stop}, queries.from_row(start), dk, qk_dim, later);
        cache_matmul(stop, v_dim, rows, {pp, 1, stop}, grads.from_row(start), dv, v_dim, later);
      }
      float* rows_out = grad_qkv.mutable_data_ptr<float>() + head / heads * seq * width;
      copy_head_rows(rows_out + head % heads * qk_dim, width, dq, qk_dim, seq, qk_dim, scale, rotation, -1.0f);
      if (!shared_kv) {
        copy_head_rows(rows_out + q_width + head % heads * qk_dim, width, dk, qk_dim, seq, qk_dim, 1.0f, rotation,
                       -1.0f);
        copy_head_rows(rows_out + q_width + k_width + head % heads * v_dim, width, dv, v_dim, seq, v_dim, 1.0f, {},
                       -1.0f);
      }
    }
  });
  auto grad_q = grad_qkv.narrow(2, 0, q_width).view({batch, seq, heads, qk_dim});
  auto grad_k = grad_qkv.narrow(2, q_width, k_width).view({batch, seq, kv_heads, qk_dim});
  auto grad_v = grad_qkv.narrow(2, q_width + k_width, v_width).view({batch, seq, kv_heads, v_dim});
  if (shared_kv) {
    from_heads_into(grad_k, grad_kh, 1.0f, rotation);
    from_heads_into(grad_v, grad_vh, 1.0f);
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace supertrain

TORCH_LIBRARY(supertrain_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate_up) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, int block) -> "
        "(Tensor, Tensor[])");
  m.def("causal_attention_backward(Tensor grad_out, Tensor[] saved, Tensor? cos, Tensor? sin, int kv_heads, "
        "int qk_dim, int block) -> (Tensor, Tensor, Tensor)");
  // `onednn`: multiply through oneDNN (where onednn_matmul_available says it runs) or else ATen's mm.
  m.def("linear_weight_grad(Tensor grad_out, Tensor x, bool onednn) -> Tensor");
  m.def("onednn_matmul_available() -> bool", &supertrain::onednn_matmul_available);
}

TORCH_LIBRARY_IMPL(supertrain_cpu, CPU, m) {
  m.impl("linear_weight_grad", &supertrain::linear_weight_grad);
  m.impl("rms_norm", &supertrain::rms_norm);
  m.impl("rms_norm_backward", &supertrain::rms_norm_backward);
  m.impl("swiglu", &supertrain::swiglu);
  m.impl("swiglu_backward", &supertrain::swiglu_backward);
  m.impl("causal_attention", &supertrain::causal_attention);
  m.impl("causal_attention_backward", &supertrain::causal_attention_backward);
}

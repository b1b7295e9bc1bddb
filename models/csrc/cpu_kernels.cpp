// Fused fp32 CPU kernels: RMSNorm, SwiGLU and block-causal attention forward and backward, and the weight gradient
// of a linear layer.
//
// ATen runs RMSNorm as five separate passes over the activations (pow, mean, rsqrt, two multiplies) and SwiGLU as
// two (silu, multiply), each reading and writing whole tensors; here each is one pass per direction. Attention is
// the block-causal scheme of models/cpu_attention.py done in one call: queries in blocks of `block` rows, each
// multiplied only by the key blocks at or before it, with the rotary embedding, masking, softmax and layout changes
// fused into single passes and the batched matmuls on oneDNN, which runs 2-2.5x faster than torch.bmm where
// PyTorch sends bmm to MKL (AVX2 code on AMD CPUs). Built on first use by models/cpu_native.py; the Python
// wrappers there and in models/cpu_linear.py own autograd. Every kernel is deterministic for a given thread count
// and reduces in a fixed order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace at::native {
// Exported by libtorch_cpu (aten/src/ATen/native/mkldnn/Matmul.cpp) but absent from the installed headers:
// result = alpha * mat1 @ mat2 + beta * result through oneDNN, for 3-D operands that are contiguous or transposed in
// their last two dimensions. fp32 stays fp32 unless the user asked oneDNN for reduced precision
// (torch.backends.mkldnn.matmul.fp32_precision). It refuses CPUs without AVX-512 (or AVX-NE-CONVERT).
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

// Whether oneDNN's batched matmul runs on this CPU: tried once on a small product and checked against torch.bmm.
bool probe_onednn_matmul() {
  try {
    auto a = at::randn({2, 24, 16});
    auto b = at::randn({2, 16, 40});
    auto out = at::empty({2, 24, 40});
    at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
    return at::allclose(out, at::bmm(a, b), 1e-4, 1e-4);
  } catch (const std::exception&) {
    return false;
  }
}

bool onednn_matmul_available() {
  static const bool available = probe_onednn_matmul();
  return available;
}

// out = a @ b, or out += a @ b: (n, m, k) x (n, k, p) -> (n, m, p), through oneDNN (`onednn`, where
// onednn_matmul_available) or ATen's bmm. Operands are contiguous or transposed views of contiguous tensors (the
// layouts oneDNN takes without a copy); out is contiguous.
void matmul_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate, bool onednn) {
  if (onednn) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    out.baddbmm_(a, b);
  } else {
    at::bmm_out(out, a, b);
  }
}

// (rows, cols) -> contiguous (cols, rows), in tiles that stay in cache, each 16 x 16 piece transposed in registers.
at::Tensor transpose_copy(const at::Tensor& matrix) {
  const auto src = matrix.contiguous();
  const int64_t rows = src.size(0), cols = src.size(1);
  auto out = at::empty({cols, rows}, src.options());
  const float* ps = src.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  constexpr int64_t kTile = 64;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  at::parallel_for(0, row_tiles * col_tiles, 4, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r = tile / col_tiles * kTile, c = tile % col_tiles * kTile;
      at::vec::transpose_mxn<float>(ps + r * cols + c, cols, po + c * rows + r, rows,
                                    static_cast<int>(std::min(kTile, rows - r)),
                                    static_cast<int>(std::min(kTile, cols - c)));
    }
  });
  return out;
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

// silu(a) * b, elementwise. silu(a) = a / (1 + exp(-a)), as ATen computes it.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_fp32_cpu(gate, "gate");
  check_fp32_cpu(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "supertrain_cpu::swiglu: shapes differ, ", gate.sizes(), " and ", up.sizes());
  const auto a = gate.contiguous();
  const auto b = up.contiguous();
  auto out = at::empty_like(a);
  const float* pa = a.const_data_ptr<float>();
  const float* pb = b.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, a.numel(), 8192, [&](int64_t begin, int64_t end) {
    const Vec one(1.0f);
    int64_t i = begin;
    for (; i + kVec <= end; i += kVec) {
      const Vec x = Vec::loadu(pa + i);
      ((x / (one + x.neg().exp())) * Vec::loadu(pb + i)).store(po + i);
    }
    for (; i < end; ++i) {
      po[i] = pa[i] / (1.0f + std::exp(-pa[i])) * pb[i];
    }
  });
  return out;
}

// d/da = g * b * sig(a) * (1 + a * (1 - sig(a))), d/db = g * silu(a).
std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  const auto g = grad.contiguous();
  const auto a = gate.contiguous();
  const auto b = up.contiguous();
  auto grad_gate = at::empty_like(a);
  auto grad_up = at::empty_like(b);
  const float* pg = g.const_data_ptr<float>();
  const float* pa = a.const_data_ptr<float>();
  const float* pb = b.const_data_ptr<float>();
  float* pga = grad_gate.mutable_data_ptr<float>();
  float* pgb = grad_up.mutable_data_ptr<float>();
  at::parallel_for(0, a.numel(), 8192, [&](int64_t begin, int64_t end) {
    const Vec one(1.0f);
    int64_t i = begin;
    for (; i + kVec <= end; i += kVec) {
      const Vec x = Vec::loadu(pa + i);
      const Vec gi = Vec::loadu(pg + i);
      const Vec sig = one / (one + x.neg().exp());
      (gi * (x * sig)).store(pgb + i);
      (gi * Vec::loadu(pb + i) * sig * (one + x * (one - sig))).store(pga + i);
    }
    for (; i < end; ++i) {
      const float sig = 1.0f / (1.0f + std::exp(-pa[i]));
      pgb[i] = pg[i] * (pa[i] * sig);
      pga[i] = pg[i] * pb[i] * sig * (1.0f + pa[i] * (1.0f - sig));
    }
  });
  return {grad_gate, grad_up};
}

// ---- block-causal attention -----------------------------------------------------------------------------------

struct Blocks {
  int64_t seq;
  int64_t block;
  int64_t count() const { return (seq + block - 1) / block; }
  int64_t length(int64_t i) const { return std::min(block, seq - i * block); }
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

// (batch, seq, heads, dim) with unit stride in dim -> one contiguous (batch * out_heads, block length, dim) tensor per
// query block, rotated (if `rotation` is active) and times `scale`. With fewer source heads than out_heads
// (grouped-query attention), out head h reads source head h / (out_heads / heads): the expansion happens in this
// copy instead of a separate one.
std::vector<at::Tensor> to_head_blocks(const at::Tensor& x, int64_t out_heads, const Blocks& blocks, float scale,
                                       const Rotation& rotation = {}) {
  const int64_t batch = x.size(0), heads = x.size(2), dim = x.size(3);
  const int64_t group = out_heads / heads;
  std::vector<at::Tensor> out;
  std::vector<float*> targets;
  for (int64_t i = 0; i < blocks.count(); ++i) {
    out.push_back(at::empty({batch * out_heads, blocks.length(i), dim}, x.options()));
    targets.push_back(out.back().mutable_data_ptr<float>());
  }
  const float* src = x.const_data_ptr<float>();
  const float* pc = rotation.active() ? rotation.c.const_data_ptr<float>() : nullptr;
  const float* ps = rotation.active() ? rotation.s.const_data_ptr<float>() : nullptr;
  const int64_t sb = x.stride(0), ss = x.stride(1), sh = x.stride(2);
  at::parallel_for(0, batch * blocks.seq, 8, [&](int64_t begin, int64_t end) {
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / blocks.seq, s = bs % blocks.seq;
      const int64_t i = s / blocks.block, row = s % blocks.block, length = blocks.length(i);
      for (int64_t h = 0; h < out_heads; ++h) {
        const float* from = src + b * sb + s * ss + (h / group) * sh;
        float* to = targets[i] + ((b * out_heads + h) * length + row) * dim;
        if (pc != nullptr) {
          rotate_row(to, from, pc + s * dim, ps + s * dim, dim, 1.0f, scale);
        } else {
          at::vec::map<float>([scale](Vec v) { return v * Vec(scale); }, to, from, dim);
        }
      }
    }
  });
  return out;
}

// The inverse of to_head_blocks: (batch * heads_in, length, dim) blocks -> `out` (batch, seq, heads_out, dim, unit
// stride in dim), times `scale`, summing the `heads_in / heads_out` heads that share an output head, then rotated
// back (if `rotation` is active).
void from_head_blocks_into(const at::Tensor& out, const std::vector<at::Tensor>& parts, const Blocks& blocks,
                           float scale, const Rotation& rotation = {}) {
  const int64_t batch = out.size(0), heads_out = out.size(2), dim = out.size(3);
  const int64_t heads_in = parts[0].size(0) / batch, group = heads_in / heads_out;
  std::vector<const float*> sources;
  for (const auto& part : parts) {
    sources.push_back(part.const_data_ptr<float>());
  }
  const float* pc = rotation.active() ? rotation.c.const_data_ptr<float>() : nullptr;
  const float* ps = rotation.active() ? rotation.s.const_data_ptr<float>() : nullptr;
  float* dst = out.mutable_data_ptr<float>();
  const int64_t ob = out.stride(0), os = out.stride(1), oh = out.stride(2);
  at::parallel_for(0, batch * blocks.seq, 8, [&](int64_t begin, int64_t end) {
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / blocks.seq, s = bs % blocks.seq;
      const int64_t i = s / blocks.block, row = s % blocks.block, length = blocks.length(i);
      for (int64_t h = 0; h < heads_out; ++h) {
        float* to = dst + b * ob + s * os + h * oh;
        const float* first = sources[i] + ((b * heads_in + h * group) * length + row) * dim;
        at::vec::map<float>([scale](Vec v) { return v * Vec(scale); }, to, first, dim);
        for (int64_t k = 1; k < group; ++k) {
          const float* next = sources[i] + ((b * heads_in + h * group + k) * length + row) * dim;
          at::vec::map2<float>([scale](Vec total, Vec v) { return total + v * Vec(scale); }, to, to, next, dim);
        }
        if (pc != nullptr) {
          rotate_row(to, to, pc + s * dim, ps + s * dim, dim, -1.0f, 1.0f);
        }
      }
    }
  });
}

at::Tensor from_head_blocks(const std::vector<at::Tensor>& parts, int64_t batch, int64_t heads_out,
                            const Blocks& blocks, float scale, const Rotation& rotation = {}) {
  auto out = at::empty({batch, blocks.seq, heads_out, parts[0].size(2)}, parts[0].options());
  from_head_blocks_into(out, parts, blocks, scale, rotation);
  return out;
}

// In place, scores -> probabilities for query block i, whose scores against key block j are pieces[j]
// (rows, block length i, block length j). Query row r of the block sees every key of the earlier blocks and keys
// 0..r of its own (the last piece); the masked keys get probability 0.
void causal_softmax_(const std::vector<at::Tensor>& pieces) {
  const int64_t n = static_cast<int64_t>(pieces.size());
  const int64_t rows = pieces[0].size(0), length = pieces[0].size(1);
  std::vector<float*> data;
  std::vector<int64_t> widths;
  for (const auto& piece : pieces) {
    data.push_back(piece.mutable_data_ptr<float>());
    widths.push_back(piece.size(2));
  }
  at::parallel_for(0, rows * length, 16, [&](int64_t begin, int64_t end) {
    std::vector<float*> row_ptr(n);
    std::vector<int64_t> valid(n);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t r = index % length;
      for (int64_t j = 0; j < n; ++j) {
        row_ptr[j] = data[j] + index * widths[j];
        valid[j] = j + 1 < n ? widths[j] : r + 1;
      }
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        top = std::max(top, at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); },
                                                     row_ptr[j], valid[j]));
      }
      float total = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        // exp_u20 (within 20 ulp), as ATen's own CPU flash-attention kernel takes for its softmax: the attention
        // call took 4% less time than with the 1-ulp exp.
        at::vec::map<float>([top](Vec v) { return (v - Vec(top)).exp_u20(); }, row_ptr[j], row_ptr[j], valid[j]);
        total += at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, row_ptr[j], valid[j]);
      }
      const float inverse = 1.0f / total;
      for (int64_t j = 0; j < n; ++j) {
        at::vec::map<float>([inverse](Vec v) { return v * Vec(inverse); }, row_ptr[j], row_ptr[j], valid[j]);
        std::fill(row_ptr[j] + valid[j], row_ptr[j] + widths[j], 0.0f);
      }
    }
  });
}

// In place, grad_probabilities -> grad_scores: dS = P * (dP - row_terms), row_terms[row] = sum(dO * O) of the row.
void softmax_backward_(const at::Tensor& grad, const at::Tensor& probabilities, const at::Tensor& row_terms) {
  const int64_t width = grad.size(2), rows = grad.size(0) * grad.size(1);
  float* pg = grad.mutable_data_ptr<float>();
  const float* pp = probabilities.const_data_ptr<float>();
  const float* pt = row_terms.const_data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float term = pt[row];
      at::vec::map2<float>([term](Vec g, Vec p) { return p * (g - Vec(term)); }, pg + row * width, pg + row * width,
                           pp + row * width, width);
    }
  });
}

// grad_out (batch, seq, heads, v_dim) -> per-block (batch * heads, length, v_dim) copies, and the softmax backward's
// row terms sum(grad_out * out) per (batch * heads, length) row, in one pass.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> grad_blocks_and_row_terms(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& outputs, const Blocks& blocks) {
  const int64_t batch = grad_out.size(0), heads = grad_out.size(2), dim = grad_out.size(3);
  std::vector<at::Tensor> grads = to_head_blocks(grad_out, heads, blocks, 1.0f);
  std::vector<at::Tensor> terms;
  for (int64_t i = 0; i < blocks.count(); ++i) {
    terms.push_back(at::empty({batch * heads, blocks.length(i)}, grad_out.options()));
  }
  for (int64_t i = 0; i < blocks.count(); ++i) {
    const float* pg = grads[i].const_data_ptr<float>();
    const float* po = outputs[i].const_data_ptr<float>();
    float* pt = terms[i].mutable_data_ptr<float>();
    at::parallel_for(0, terms[i].numel(), 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        pt[row] = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                                  [](Vec a, Vec b) { return a + b; }, pg + row * dim, po + row * dim,
                                                  dim);
      }
    });
  }
  return {grads, terms};
}

// With cos and sin (seq, dim / 2), q and k are first rotated (rotary embedding of consecutive pairs), inside the
// copies the kernel makes anyway. Saved for backward, in this order: per block q (rotated, scaled), k (rotated), v
// (all expanded to the query heads), the output, then the probabilities of query block i against key block j for
// i = 0.., j = 0..i.
std::tuple<at::Tensor, std::vector<at::Tensor>> causal_attention(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const std::optional<at::Tensor>& cos,
                                                                 const std::optional<at::Tensor>& sin,
                                                                 int64_t block, bool onednn) {
  for (const auto& [t, name] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}}) {
    check_fp32_cpu(t, name);
    TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "supertrain_cpu::causal_attention: ", name,
                " must be (batch, seq, heads, dim) with unit stride in dim");
  }
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2);
  TORCH_CHECK(k.size(2) == v.size(2) && heads % k.size(2) == 0, "supertrain_cpu::causal_attention: ", heads,
              " query heads cannot share ", k.size(2), " key/value heads");
  TORCH_CHECK(block > 0 && k.size(1) == seq && v.size(1) == seq && k.size(3) == q.size(3),
              "supertrain_cpu::causal_attention: mismatched q, k, v shapes");
  const Blocks blocks{seq, block};
  const int64_t n = blocks.count();
  const float scale = 1.0f / std::sqrt(static_cast<float>(q.size(3)));
  const Rotation rotation = make_rotation(cos, sin, seq, q.size(3));
  auto qs = to_head_blocks(q, heads, blocks, scale, rotation);
  auto ks = to_head_blocks(k, heads, blocks, 1.0f, rotation);
  auto vs = to_head_blocks(v, heads, blocks, 1.0f);
  std::vector<at::Tensor> outputs, probabilities;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> pieces;
    for (int64_t j = 0; j <= i; ++j) {
      pieces.push_back(at::empty({batch * heads, blocks.length(i), blocks.length(j)}, q.options()));
      matmul_into(qs[i], ks[j].transpose(1, 2), pieces.back(), false, onednn);
    }
    causal_softmax_(pieces);
    auto output = at::empty({batch * heads, blocks.length(i), v.size(3)}, q.options());
    for (int64_t j = 0; j <= i; ++j) {
      matmul_into(pieces[j], vs[j], output, j > 0, onednn);
    }
    outputs.push_back(output);
    probabilities.insert(probabilities.end(), pieces.begin(), pieces.end());
  }
  auto out = from_head_blocks(outputs, batch, heads, blocks, 1.0f);
  std::vector<at::Tensor> saved;
  for (const auto* group : {&qs, &ks, &vs, &outputs, &probabilities}) {
    saved.insert(saved.end(), group->begin(), group->end());
  }
  return {out, saved};
}

// Gradients for q, k, v in their shapes (k and v summed back over the query heads that shared them), as views of one
// (batch, seq, q width + k width + v width) tensor that holds them side by side: the gradient a q, k, v projection
// made as one product (models/cpu_linear.py) takes whole, without concatenating three pieces.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(const at::Tensor& grad_out,
                                                                          at::TensorList saved,
                                                                          const std::optional<at::Tensor>& cos,
                                                                          const std::optional<at::Tensor>& sin,
                                                                          int64_t kv_heads, int64_t block,
                                                                          bool onednn) {
  const int64_t batch = grad_out.size(0), seq = grad_out.size(1), heads = grad_out.size(2);
  const Blocks blocks{seq, block};
  const int64_t n = blocks.count();
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 4 * n + n * (n + 1) / 2,
              "supertrain_cpu::causal_attention_backward: saved tensors do not match a sequence of ", seq);
  const std::vector<at::Tensor> qs(saved.begin(), saved.begin() + n), ks(saved.begin() + n, saved.begin() + 2 * n),
      vs(saved.begin() + 2 * n, saved.begin() + 3 * n), outputs(saved.begin() + 3 * n, saved.begin() + 4 * n);
  const float scale = 1.0f / std::sqrt(static_cast<float>(qs[0].size(2)));
  const Rotation rotation = make_rotation(cos, sin, seq, qs[0].size(2));
  auto [grads, row_terms] = grad_blocks_and_row_terms(grad_out.contiguous(), outputs, blocks);
  std::vector<at::Tensor> grad_q(n), grad_k(n), grad_v(n);
  for (int64_t j = 0; j < n; ++j) {
    grad_q[j] = at::empty_like(qs[j]);
    grad_k[j] = at::empty_like(ks[j]);
    grad_v[j] = at::empty_like(vs[j]);
  }
  int64_t p = 4 * n;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j, ++p) {
      const at::Tensor& probabilities = saved[p];
      auto grad_scores = at::empty_like(probabilities);
      matmul_into(grads[i], vs[j].transpose(1, 2), grad_scores, false, onednn);
      softmax_backward_(grad_scores, probabilities, row_terms[i]);
      // Key block j first meets a query block at i == j: that product initialises its gradients.
      matmul_into(grad_scores, ks[j], grad_q[i], j > 0, onednn);
      matmul_into(grad_scores.transpose(1, 2), qs[i], grad_k[j], i > j, onednn);
      matmul_into(probabilities.transpose(1, 2), grads[i], grad_v[j], i > j, onednn);
    }
  }
  const int64_t qk_dim = qs[0].size(2), v_dim = vs[0].size(2);
  const int64_t q_width = heads * qk_dim, k_width = kv_heads * qk_dim, v_width = kv_heads * v_dim;
  auto grad_qkv = at::empty({batch, seq, q_width + k_width + v_width}, grad_out.options());
  auto grad_q_out = grad_qkv.narrow(2, 0, q_width).view({batch, seq, heads, qk_dim});
  auto grad_k_out = grad_qkv.narrow(2, q_width, k_width).view({batch, seq, kv_heads, qk_dim});
  auto grad_v_out = grad_qkv.narrow(2, q_width + k_width, v_width).view({batch, seq, kv_heads, v_dim});
  from_head_blocks_into(grad_q_out, grad_q, blocks, scale, rotation);
  from_head_blocks_into(grad_k_out, grad_k, blocks, 1.0f, rotation);
  from_head_blocks_into(grad_v_out, grad_v, blocks, 1.0f);
  return {grad_q_out, grad_k_out, grad_v_out};
}



}  // namespace
}  // namespace supertrain

TORCH_LIBRARY(supertrain_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // `onednn`: multiply through oneDNN (where onednn_matmul_available says it runs) or else ATen's bmm / mm.
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, int block, bool onednn) -> "
        "(Tensor, Tensor[])");
  m.def("causal_attention_backward(Tensor grad_out, Tensor[] saved, Tensor? cos, Tensor? sin, int kv_heads, "
        "int block, bool onednn) -> (Tensor, Tensor, Tensor)");
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

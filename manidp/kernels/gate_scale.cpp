// manidp::gate_scale_: a whole channel gate in one op, for the deployed dense-then-mask path.
//
// mask = select(min(act(L2(relu(L1(pool(source))))), clamp_max)); target *= mask (per instance, per
// channel, in place). pool is the global mean (of |source| when abs_pool); L1 / L2 are Linear layers
// given by their transposed weights ([in, out]) and optional biases (no second layer: L1 alone); act
// is a ReLU when relu_out; select keeps values > cut (ManiDP's threshold) and, when topk > 0, only the
// topk largest (FBS's winner-take-all; ties go to the lower channel).
//
// At batch 1 on small feature maps a gate written as ATen ops costs about ten dispatches of ~1 us
// each; here it is one. Arithmetic in fp32 (the pool accumulates in fp64), whatever the activations'
// dtype (fp32 or bf16), as the gates' contract requires. Built and loaded by manidp/kernels/__init__.py.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

template <typename T>
inline double value(T v, bool absolute) {
  const double d = static_cast<double>(static_cast<float>(v));
  return absolute && d < 0 ? -d : d;
}

template <typename T>
void pool(const T* x, bool absolute, int64_t C, int64_t H, int64_t W, int64_t sc, int64_t sh, int64_t sw, float* out) {
  std::vector<double> acc(C, 0.0);
  if (sc == 1) {  // channels_last: one contiguous C-vector per position
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const T* row = x + h * sh + w * sw;
        for (int64_t c = 0; c < C; ++c) acc[c] += value(row[c], absolute);
      }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) s += value(x[c * sc + h * sh + w * sw], absolute);
      acc[c] = s;
    }
  }
  const double n = static_cast<double>(H * W);
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<float>(acc[c] / n);
}

// y[j] = b[j] + sum_i x[i] * wt[i, j]  (wt: [in, out] row-major, so the inner loop is contiguous)
void linear(const float* x, const float* wt, const float* b, int64_t in, int64_t out, float* y) {
  if (b) std::copy(b, b + out, y); else std::fill(y, y + out, 0.0f);
  for (int64_t i = 0; i < in; ++i) {
    const float xi = x[i];
    const float* row = wt + i * out;
    for (int64_t j = 0; j < out; ++j) y[j] += xi * row[j];
  }
}

template <typename T>
void scale(T* y, int64_t C, int64_t H, int64_t W, int64_t sc, int64_t sh, int64_t sw, const float* m) {
  if (sc == 1) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        T* row = y + h * sh + w * sw;
        for (int64_t c = 0; c < C; ++c) row[c] = static_cast<T>(static_cast<float>(row[c]) * m[c]);
      }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const float mc = m[c];
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          T& v = y[c * sc + h * sh + w * sw];
          v = static_cast<T>(static_cast<float>(v) * mc);
        }
    }
  }
}

const float* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

void check_weight(const at::Tensor& wt, int64_t in, const char* name) {
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == at::kFloat && wt.is_contiguous() && wt.device().is_cpu(),
              "gate_scale_: ", name, " must be a contiguous fp32 CPU matrix [in, out]");
  TORCH_CHECK(wt.size(0) == in, "gate_scale_: ", name, " has ", wt.size(0), " input rows, expected ", in);
}

void check_bias(const c10::optional<at::Tensor>& b, int64_t out, const char* name) {
  if (!b.has_value() || !b->defined()) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == out && b->scalar_type() == at::kFloat && b->is_contiguous() &&
              b->device().is_cpu(), "gate_scale_: ", name, " must be a contiguous fp32 CPU vector of ", out);
}

template <typename T>
void run(const at::Tensor& source, at::Tensor& target, const at::Tensor& w1t, const float* b1,
         const at::Tensor* w2t, const float* b2, bool relu_out, bool abs_pool, double clamp_max, double cut, int64_t topk) {
  const int64_t B = source.size(0), Cin = source.size(1), Cout = target.size(1);
  const int64_t hidden = w1t.size(1);
  const T* x = source.data_ptr<T>();
  T* y = target.data_ptr<T>();
  const float* w1 = w1t.data_ptr<float>();
  const float* w2 = w2t ? w2t->data_ptr<float>() : nullptr;
  const float cmax = static_cast<float>(clamp_max), cutf = static_cast<float>(cut);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(Cin), h(hidden), z(Cout);
    std::vector<int64_t> order;
    for (int64_t b = begin; b < end; ++b) {
      pool(x + b * source.stride(0), abs_pool, Cin, source.size(2), source.size(3), source.stride(1), source.stride(2),
           source.stride(3), p.data());
      linear(p.data(), w1, b1, Cin, hidden, h.data());
      float* out = h.data();
      if (w2) {
        for (auto& v : h) v = v > 0.0f ? v : 0.0f;
        linear(h.data(), w2, b2, hidden, Cout, z.data());
        out = z.data();
      }
      for (int64_t c = 0; c < Cout; ++c) {
        float v = out[c];
        if (relu_out && v < 0.0f) v = 0.0f;
        if (v > cmax) v = cmax;
        out[c] = v > cutf ? v : 0.0f;
      }
      if (topk > 0 && topk < Cout) {  // keep the topk largest, ties by channel order
        order.resize(Cout);
        std::iota(order.begin(), order.end(), 0);
        std::nth_element(order.begin(), order.begin() + (topk - 1), order.end(),
                         [&](int64_t a, int64_t c) { return out[a] > out[c] || (out[a] == out[c] && a < c); });
        const float kth = out[order[topk - 1]];
        const int64_t kth_index = order[topk - 1];
        for (int64_t c = 0; c < Cout; ++c)
          if (out[c] < kth || (out[c] == kth && c > kth_index)) out[c] = 0.0f;
      }
      scale(y + b * target.stride(0), Cout, target.size(2), target.size(3), target.stride(1), target.stride(2),
            target.stride(3), out);
    }
  });
}

at::Tensor& gate_scale_(const at::Tensor& source, at::Tensor& target, const at::Tensor& w1t,
                        const c10::optional<at::Tensor>& b1, const c10::optional<at::Tensor>& w2t,
                        const c10::optional<at::Tensor>& b2, bool relu_out, bool abs_pool, double clamp_max, double cut,
                        int64_t topk) {
  TORCH_CHECK(source.dim() == 4 && target.dim() == 4, "gate_scale_: source and target must be 4-D [B, C, H, W]");
  TORCH_CHECK(source.device().is_cpu() && target.device().is_cpu(), "gate_scale_: CPU tensors only");
  TORCH_CHECK(source.scalar_type() == target.scalar_type() &&
              (source.scalar_type() == at::kFloat || source.scalar_type() == at::kBFloat16),
              "gate_scale_: source and target must both be fp32 or both bf16");
  TORCH_CHECK(source.size(0) == target.size(0), "gate_scale_: source and target batch sizes differ");
  const int64_t Cin = source.size(1), Cout = target.size(1);
  check_weight(w1t, Cin, "w1t");
  check_bias(b1, w1t.size(1), "b1");
  const bool two = w2t.has_value() && w2t->defined();
  if (two) {
    check_weight(*w2t, w1t.size(1), "w2t");
    TORCH_CHECK(w2t->size(1) == Cout, "gate_scale_: w2t has ", w2t->size(1), " outputs, target ", Cout, " channels");
    check_bias(b2, Cout, "b2");
  } else {
    TORCH_CHECK(w1t.size(1) == Cout, "gate_scale_: w1t has ", w1t.size(1), " outputs, target ", Cout, " channels");
  }
  TORCH_CHECK(topk >= 0, "gate_scale_: topk must be >= 0 (0: no top-k)");
  if (source.numel() == 0 || target.numel() == 0) return target;
  const at::Tensor* w2 = two ? &*w2t : nullptr;
  if (source.scalar_type() == at::kFloat)
    run<float>(source, target, w1t, data_or_null(b1), w2, data_or_null(b2), relu_out, abs_pool, clamp_max, cut, topk);
  else
    run<c10::BFloat16>(source, target, w1t, data_or_null(b1), w2, data_or_null(b2), relu_out, abs_pool, clamp_max, cut, topk);
  return target;
}

}  // namespace

TORCH_LIBRARY(manidp, m) {
  m.def("gate_scale_(Tensor source, Tensor(a!) target, Tensor w1t, Tensor? b1, Tensor? w2t, Tensor? b2, "
        "bool relu_out, bool abs_pool, float clamp_max, float cut, int topk) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(manidp, CPU, m) { m.impl("gate_scale_", &gate_scale_); }

// The deployed models' compiled CPU ops (torch.ops.manidp.*), built and loaded by manidp/kernels/__init__.py.
//
// gate_scale_ (dense-then-mask path): mask = select(min(act(L2(relu(L1(pool(source))))), clamp_max)), and
// target *= mask (per instance, per channel, in place). pool is the global mean (of |source| when
// abs_pool); L1 / L2 are Linear layers given by their transposed weights ([in, out]) and optional
// biases (no second layer: L1 alone); act is a ReLU when relu_out; select keeps values > cut (ManiDP's
// threshold) and, when topk > 0, only the topk largest (FBS's winner-take-all; ties go to the lower
// channel). gate_mask (gathered path): the same mask, returned. scale_pool_ and add_channels_: the
// gathered path's glue; gather_slice: the kept weights of a slice-cache miss (see below).
//
// At batch 1 on small feature maps a gate written as ATen ops costs about ten dispatches of ~1 us
// each; here it is one. Arithmetic in fp32 (pools accumulate in fp64), whatever the activations'
// dtype (fp32 or bf16), as the gates' contract requires; a bf16 target is scaled by the mask rounded to
// bf16, as the ATen form's mask.to(dtype) does.
//
// Threads: at::parallel_for is a serial loop unless this file is compiled with -fopenmp (ATen's inline
// OpenMP backend), so manidp/kernels builds it that way and links torch's own libgomp; every reduction
// is split into fixed chunks with one partial each (chunks_of), so the results are race-free and the
// same at any thread count, even where the build had to be serial.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace {

template <typename T>
inline double value(T v, bool absolute) {
  const double d = static_cast<double>(static_cast<float>(v));
  return absolute && d < 0 ? -d : d;
}

// Sums split into chunks: the chunk count depends only on the work (never on the thread count), each
// chunk owns its partial, and the partials are added in chunk order. The result is then the same at any
// number of threads, and no two threads ever write one partial, whichever OpenMP runtime (or none) runs
// the loop: indexing partials by at::get_thread_num() is only safe while the pragma and torch share one
// runtime, and a second runtime in the process (a system libgomp beside torch's) breaks that silently.
constexpr int64_t kMaxChunks = 64;

inline int64_t chunks_of(int64_t n, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (n + grain - 1) / std::max<int64_t>(grain, 1)));
}

// acc[c] += x[c] (|x[c]| when Abs) for one channels_last row of C values, in fp64: a loop the compiler
// vectorizes (the absolute flag a template argument, not a branch per element).
template <typename T, bool Abs>
inline void accumulate_row(const T* row, int64_t C, double* acc) {
  for (int64_t c = 0; c < C; ++c) {
    const double v = static_cast<double>(static_cast<float>(row[c]));
    acc[c] += Abs ? std::abs(v) : v;
  }
}

// Rows [first, end) of a channels_last map (row r at h = r / W, w = r % W) into acc, the position carried
// from row to row: a division per row would cost more than the row's sum on maps of few channels.
template <typename T, bool Abs>
void accumulate_rows(const T* x, int64_t C, int64_t W, int64_t sh, int64_t sw, int64_t first, int64_t end,
                     double* acc) {
  int64_t h = first / W, w = first % W;
  for (int64_t r = first; r < end; ++r) {
    accumulate_row<T, Abs>(x + h * sh + w * sw, C, acc);
    if (++w == W) w = 0, ++h;
  }
}

// out[c] = mean over (h, w) of x[c * sc + h * sh + w * sw] (of |x| when absolute), accumulated in fp64.
// Large maps split their rows (channels_last) or channels (otherwise) between torch's threads; called
// inside a parallel region (a batch split by instance) it runs inline.
template <typename T>
void pool(const T* x, bool absolute, int64_t C, int64_t H, int64_t W, int64_t sc, int64_t sh, int64_t sw, float* out) {
  const int64_t rows = H * W;
  const double n = static_cast<double>(rows);
  if (sc == 1) {  // channels_last: one contiguous C-vector per position
    const int64_t chunks = chunks_of(rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)));
    const int64_t per = (rows + chunks - 1) / chunks;
    std::vector<double> partial(chunks * C, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        double* acc = partial.data() + k * C;
        const int64_t begin = k * per, end = std::min(rows, begin + per);
        if (absolute) accumulate_rows<T, true>(x, C, W, sh, sw, begin, end, acc);
        else accumulate_rows<T, false>(x, C, W, sh, sw, begin, end, acc);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double total = 0.0;
      for (int64_t k = 0; k < chunks; ++k) total += partial[k * C + c];
      out[c] = static_cast<float>(total / n);
    }
  } else {  // one channel per task: each writes only its own out[c]
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(rows, 1));
    at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s = 0.0;
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) s += value(x[c * sc + h * sh + w * sw], absolute);
        out[c] = static_cast<float>(s / n);
      }
    });
  }
}

// y[j] = b[j] + sum_i x[i] * wt[i, j]  (wt: [in, out] row-major, so the inner loop is contiguous).
// A wide layer (a 512-channel gate's weights are a megabyte, read from cache at every call) splits its
// outputs between torch's threads; each y[j] sums in the same order at any thread count. Called inside a
// parallel region (a batch split by instance) it runs inline.
void linear(const float* x, const float* wt, const float* b, int64_t in, int64_t out, float* y) {
  const int64_t grain = std::max<int64_t>(16, (16384 / std::max<int64_t>(in, 1) + 15) / 16 * 16);
  at::parallel_for(0, out, grain, [&](int64_t first, int64_t last) {
    if (b) std::copy(b + first, b + last, y + first); else std::fill(y + first, y + last, 0.0f);
    for (int64_t i = 0; i < in; ++i) {
      const float xi = x[i];
      const float* row = wt + i * out;
      for (int64_t j = first; j < last; ++j) y[j] += xi * row[j];
    }
  });
}

// The mask value as the ATen form applies it: mask.to(y.dtype) before the multiply, so under bf16 the
// value is rounded to bf16 first and the outputs equal the ATen form's bit for bit (fp32: unchanged).
template <typename T>
inline float as_applied(float m) {
  return static_cast<float>(static_cast<T>(m));
}

template <typename T>
void scale(T* y, int64_t C, int64_t H, int64_t W, int64_t sc, int64_t sh, int64_t sw, const float* m) {
  if (sc == 1) {
    std::vector<float> mc(m, m + C);
    for (auto& v : mc) v = as_applied<T>(v);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        T* row = y + h * sh + w * sw;
        for (int64_t c = 0; c < C; ++c) row[c] = static_cast<T>(static_cast<float>(row[c]) * mc[c]);
      }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const float mc = as_applied<T>(m[c]);
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

// A gate's layers and selection, checked against the source's channels; cout = the mask's length.
struct Gate {
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  int64_t cin, hidden, cout;
  bool relu_out, abs_pool;
  float cmax, cut;
  int64_t topk, round_to;
};

Gate make_gate(int64_t cin, const at::Tensor& w1t, const c10::optional<at::Tensor>& b1,
               const c10::optional<at::Tensor>& w2t, const c10::optional<at::Tensor>& b2, bool relu_out,
               bool abs_pool, double clamp_max, double cut, int64_t topk, int64_t round_to) {
  check_weight(w1t, cin, "w1t");
  check_bias(b1, w1t.size(1), "b1");
  const bool two = w2t.has_value() && w2t->defined();
  if (two) {
    check_weight(*w2t, w1t.size(1), "w2t");
    check_bias(b2, w2t->size(1), "b2");
  }
  TORCH_CHECK(topk >= 0, "gate_scale_: topk must be >= 0 (0: no top-k)");
  TORCH_CHECK(round_to >= 0, "gate_scale_: round_to must be >= 0 (0 or 1: no rounding)");
  return Gate{w1t.data_ptr<float>(), data_or_null(b1), two ? w2t->data_ptr<float>() : nullptr,
              two ? data_or_null(b2) : nullptr, cin, w1t.size(1), two ? w2t->size(1) : w1t.size(1), relu_out,
              abs_pool, static_cast<float>(clamp_max), static_cast<float>(cut), topk, round_to};
}

// manidp.gating.round_kept for one instance: the kept count rounded to a multiple of g.round_to (halves
// up, at most cout, at least one multiple when anything is kept); kept channels rank first (by mask
// value), then the skipped ones by their pre-selection saliency sal, which becomes their scale.
void round_kept(const Gate& g, const float* sal, std::vector<int64_t>& order, std::vector<float>& score, float* out) {
  const int64_t C = g.cout, m = g.round_to;
  int64_t count = 0;
  float top = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    count += out[c] != 0.0f;
    top = std::max(top, std::abs(sal[c]));
  }
  if (count == 0) return;
  const int64_t target = std::max(std::min((count + m / 2) / m * m, C), m);
  if (target >= C) {
    for (int64_t c = 0; c < C; ++c) if (out[c] == 0.0f) out[c] = sal[c];
    return;
  }
  score.resize(C);
  for (int64_t c = 0; c < C; ++c) score[c] = out[c] != 0.0f ? sal[c] + (top + std::abs(out[c]) + 1.0f) : sal[c];
  order.resize(C);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  for (int64_t r = 0; r < C; ++r) {
    const int64_t c = order[r];
    out[c] = r < target ? (out[c] != 0.0f ? out[c] : sal[c]) : 0.0f;
  }
}

// The mask of one instance from its pooled input p (cin): written to out (cout); h, z, sal: scratch.
void mask_of(const Gate& g, const float* p, std::vector<float>& h, std::vector<float>& z,
             std::vector<int64_t>& order, std::vector<float>& sal, float* out) {
  h.resize(g.hidden);
  z.resize(g.cout);
  sal.resize(g.cout);
  linear(p, g.w1, g.b1, g.cin, g.hidden, h.data());
  const float* raw = h.data();
  if (g.w2) {
    for (auto& v : h) v = v > 0.0f ? v : 0.0f;
    linear(h.data(), g.w2, g.b2, g.hidden, g.cout, z.data());
    raw = z.data();
  }
  for (int64_t c = 0; c < g.cout; ++c) {
    float v = raw[c];
    if (g.relu_out && v < 0.0f) v = 0.0f;
    if (v > g.cmax) v = g.cmax;
    sal[c] = v;
    out[c] = v > g.cut ? v : 0.0f;
  }
  if (g.topk > 0 && g.topk < g.cout) {  // keep the topk largest, ties by channel order
    order.resize(g.cout);
    std::iota(order.begin(), order.end(), 0);
    std::nth_element(order.begin(), order.begin() + (g.topk - 1), order.end(),
                     [&](int64_t a, int64_t c) { return out[a] > out[c] || (out[a] == out[c] && a < c); });
    const float kth = out[order[g.topk - 1]];
    const int64_t kth_index = order[g.topk - 1];
    for (int64_t c = 0; c < g.cout; ++c)
      if (out[c] < kth || (out[c] == kth && c > kth_index)) out[c] = 0.0f;
  }
  if (g.round_to > 1) round_kept(g, sal.data(), order, z, out);
}

void check_source(const at::Tensor& source, const char* op) {
  TORCH_CHECK(source.dim() == 4, op, ": source must be 4-D [B, C, H, W]");
  TORCH_CHECK(source.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(source.scalar_type() == at::kFloat || source.scalar_type() == at::kBFloat16,
              op, ": source must be fp32 or bf16");
}

// masks [B, cout] (fp32) of a batch; when target is given, target (in place) times them.
template <typename T>
void run(const at::Tensor& source, const Gate& g, at::Tensor* target, float* masks) {
  const int64_t B = source.size(0);
  const T* x = source.data_ptr<T>();
  T* y = target ? target->data_ptr<T>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(g.cin), h, z, sal, own;
    std::vector<int64_t> order;
    for (int64_t b = begin; b < end; ++b) {
      pool(x + b * source.stride(0), g.abs_pool, g.cin, source.size(2), source.size(3), source.stride(1),
           source.stride(2), source.stride(3), p.data());
      float* out = masks ? masks + b * g.cout : (own.resize(g.cout), own.data());
      mask_of(g, p.data(), h, z, order, sal, out);
      if (y)
        scale(y + b * target->stride(0), g.cout, target->size(2), target->size(3), target->stride(1),
              target->stride(2), target->stride(3), out);
    }
  });
}

at::Tensor& gate_scale_(const at::Tensor& source, at::Tensor& target, const at::Tensor& w1t,
                        const c10::optional<at::Tensor>& b1, const c10::optional<at::Tensor>& w2t,
                        const c10::optional<at::Tensor>& b2, bool relu_out, bool abs_pool, double clamp_max, double cut,
                        int64_t topk, int64_t round_to) {
  check_source(source, "gate_scale_");
  TORCH_CHECK(target.dim() == 4 && target.device().is_cpu(), "gate_scale_: target must be a 4-D CPU tensor");
  TORCH_CHECK(source.scalar_type() == target.scalar_type(), "gate_scale_: source and target dtypes differ");
  TORCH_CHECK(source.size(0) == target.size(0), "gate_scale_: source and target batch sizes differ");
  const Gate g = make_gate(source.size(1), w1t, b1, w2t, b2, relu_out, abs_pool, clamp_max, cut, topk, round_to);
  TORCH_CHECK(g.cout == target.size(1), "gate_scale_: ", g.w2 ? "w2t" : "w1t", " has ", g.cout,
              " outputs, target ", target.size(1), " channels");
  if (source.numel() == 0 || target.numel() == 0) return target;
  if (source.scalar_type() == at::kFloat) run<float>(source, g, &target, nullptr);
  else run<c10::BFloat16>(source, g, &target, nullptr);
  return target;
}

// The gate's mask [B, cout] (fp32) of source: the gathered path's gate, pool included, in one call.
at::Tensor gate_mask(const at::Tensor& source, const at::Tensor& w1t, const c10::optional<at::Tensor>& b1,
                     const c10::optional<at::Tensor>& w2t, const c10::optional<at::Tensor>& b2, bool relu_out,
                     bool abs_pool, double clamp_max, double cut, int64_t topk, int64_t round_to) {
  check_source(source, "gate_mask");
  const Gate g = make_gate(source.size(1), w1t, b1, w2t, b2, relu_out, abs_pool, clamp_max, cut, topk, round_to);
  at::Tensor masks = at::zeros({source.size(0), g.cout}, w1t.options());
  if (source.numel() == 0) return masks;
  if (source.scalar_type() == at::kFloat) run<float>(source, g, nullptr, masks.data_ptr<float>());
  else run<c10::BFloat16>(source, g, nullptr, masks.data_ptr<float>());
  return masks;
}

// ---------------------------------------------------------------- gathered path (batch 1)
// The kept channels of a gathered block live in a tensor of K channels; index (int64, K) names them
// among the C of the full width. Both ops work on channels_last maps ([H*W rows, K or C contiguous])
// and split the rows between torch's threads.

void check_gathered(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == 1 && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
              t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "manidp gathered op: ", name, " must be a batch-1 fp32 channels_last CPU tensor");
}

void check_index(const at::Tensor& index, int64_t K, int64_t C) {
  TORCH_CHECK(index.dim() == 1 && index.size(0) == K && index.scalar_type() == at::kLong && index.is_contiguous() &&
              index.device().is_cpu(), "manidp gathered op: index must be a contiguous int64 CPU vector of ", K);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t j = 0; j < K; ++j)
    TORCH_CHECK(idx[j] >= 0 && idx[j] < C, "manidp gathered op: index ", idx[j], " out of range for ", C, " channels");
}

void check_mask(const at::Tensor& mask, int64_t C) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == 1 && mask.size(1) == C && mask.scalar_type() == at::kFloat &&
              mask.device().is_cpu(), "manidp gathered op: mask must be a [1, ", C, "] fp32 CPU tensor");
}

// The mask values of the kept channels (checked): s[j] = mask[0, index[j]].
std::vector<float> kept_scales(const at::Tensor& mask, const at::Tensor& index, int64_t K, int64_t C) {
  check_mask(mask, C);
  check_index(index, K, C);
  const at::Tensor m = mask.contiguous();
  const float* values = m.data_ptr<float>();
  const int64_t* idx = index.data_ptr<int64_t>();
  std::vector<float> s(K);
  for (int64_t j = 0; j < K; ++j) s[j] = values[idx[j]];
  return s;
}

// y (K kept channels) times mask[index], written to dst as its first keep channels (dst == y: in place; the
// channels from keep on must have mask 0, a padded kept set's padding); returns the fp32 global mean pool of
// the result scattered into C values (zeros at the skipped channels): the input of the block's next gate.
std::vector<float> scale_pool_into(at::Tensor& y, const at::Tensor& index, const at::Tensor& mask, int64_t keep,
                                   float* dst) {
  const int64_t K = y.size(1), C = mask.size(1), rows = y.size(2) * y.size(3);
  const std::vector<float> s = kept_scales(mask, index, K, C);
  for (int64_t j = keep; j < K; ++j)
    TORCH_CHECK(s[j] == 0.0f, "manidp scale_pool_gate: kept channel ", j, " beyond keep has a nonzero mask value");
  const int64_t* idx = index.data_ptr<int64_t>();
  const float* data = y.data_ptr<float>();
  const int64_t chunks = chunks_of(rows, 256), per = (rows + chunks - 1) / chunks;
  std::vector<double> partial(chunks * keep, 0.0);  // by chunk, never by thread (see chunks_of)
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      double* acc = partial.data() + k * keep;
      for (int64_t r = k * per, end = std::min(rows, r + per); r < end; ++r) {
        const float* row = data + r * K;
        float* out = dst + r * keep;
        for (int64_t j = 0; j < keep; ++j) {
          out[j] = row[j] * s[j];
          acc[j] += out[j];
        }
      }
    }
  });
  std::vector<float> pooled(C, 0.0f);
  for (int64_t j = 0; j < keep; ++j) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += partial[k * keep + j];
    pooled[idx[j]] = static_cast<float>(total / static_cast<double>(rows));
  }
  return pooled;
}

// y (K kept channels) *= mask[index] in place; returns the fp32 global mean pool of the result scattered
// into a [1, C, 1, 1] map (zeros at the skipped channels): the input of the block's next gate.
at::Tensor scale_pool_(at::Tensor& y, const at::Tensor& index, const at::Tensor& mask) {
  check_gathered(y, "y");
  const std::vector<float> p = scale_pool_into(y, index, mask, y.size(1), y.data_ptr<float>());
  at::Tensor pooled = at::empty({1, mask.size(1), 1, 1}, mask.options());
  std::copy(p.begin(), p.end(), pooled.data_ptr<float>());
  return pooled;
}

// scale_pool_ and the next gate in one call, the kept channels compacted on the way: y (K kept channels)
// times mask[index]; the result is y itself (in place) when keep == K, else a new map of its first keep
// channels (the rest must have mask 0: a padded kept set's padding), the input a convolution built on the
// kept channels alone reads whole. Returned with the mask [1, cout] of the gate (w1t ... round_to, as
// gate_mask takes them) on the [1, C] pool of the scaled channels: the same values, in the same order of
// sums, as scale_pool_ then gate_mask on its pool, without a second dispatch or a copy of the map.
std::tuple<at::Tensor, at::Tensor> scale_pool_gate(at::Tensor& y, const at::Tensor& index, const at::Tensor& mask,
                                                   int64_t keep, const at::Tensor& w1t,
                                                   const c10::optional<at::Tensor>& b1,
                                                   const c10::optional<at::Tensor>& w2t,
                                                   const c10::optional<at::Tensor>& b2, bool relu_out, bool abs_pool,
                                                   double clamp_max, double cut, int64_t topk, int64_t round_to) {
  check_gathered(y, "y");
  TORCH_CHECK(keep >= 1 && keep <= y.size(1), "manidp scale_pool_gate: keep must be in [1, ", y.size(1), "], got ",
              keep);
  const Gate g = make_gate(mask.size(1), w1t, b1, w2t, b2, relu_out, abs_pool, clamp_max, cut, topk, round_to);
  at::Tensor result = keep == y.size(1) ? y : at::empty({1, keep, y.size(2), y.size(3)},
                                                         y.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::vector<float> p = scale_pool_into(y, index, mask, keep, result.data_ptr<float>());
  for (auto& v : p) v = static_cast<float>(value(v, g.abs_pool));  // as gate_mask reads a [1, C, 1, 1] pool
  at::Tensor masks = at::zeros({1, g.cout}, w1t.options());
  std::vector<float> h, z, sal;
  std::vector<int64_t> order;
  mask_of(g, p.data(), h, z, order, sal, masks.data_ptr<float>());
  return std::make_tuple(result, masks);
}

// out[:, index[j]] += z[:, j] * mask[index[j]], then ReLU over out when relu: the residual sum of a
// gathered block (out: the shortcut, C channels; z: the last conv's K kept outputs), one pass.
#if defined(__AVX512F__)
// add_channels_ on 16-channel blocks of out, for the kept channels idx[0..P) in ascending order: a block's
// kept values are consecutive in z's row, so one masked expand-load puts them at their channels, and the
// sum and the ReLU are one vector op each per block, where the scalar loop pays a load, a multiply-add
// and a store per kept channel. What the scalar loop computes (z * s added once per kept channel, then
// max(., 0)), rounded the same (one fused multiply-add).
void add_channels_blocks(float* o, const float* zd, const int64_t* idx, const float* s, int64_t P, int64_t K,
                         int64_t C, int64_t rows, bool relu) {
  const int64_t B = C / 16;
  std::vector<uint16_t> bits(B, 0);
  std::vector<int64_t> offset(B, 0);
  std::vector<float> scale(C, 0.0f);
  for (int64_t j = 0; j < P; ++j) {
    bits[idx[j] / 16] |= static_cast<uint16_t>(1u << (idx[j] % 16));
    scale[idx[j]] = s[j];
  }
  for (int64_t b = 1; b < B; ++b) offset[b] = offset[b - 1] + __builtin_popcount(bits[b - 1]);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = begin; r < end; ++r) {
      float* row = o + r * C;
      const float* zr = zd + r * K;
      for (int64_t j = P; j < K; ++j) row[idx[j]] += zr[j] * s[j];  // the rest of the set (a padding), if any
      for (int64_t b = 0; b < B; ++b) {
        __m512 v = _mm512_loadu_ps(row + 16 * b);
        if (bits[b])
          v = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(bits[b], zr + offset[b]),
                              _mm512_loadu_ps(scale.data() + 16 * b), v);
        if (relu) v = _mm512_max_ps(v, zero);
        _mm512_storeu_ps(row + 16 * b, v);
      }
    }
  });
}
#endif

at::Tensor& add_channels_(at::Tensor& out, const at::Tensor& index, const at::Tensor& z, const at::Tensor& mask,
                          bool relu) {
  check_gathered(out, "out");
  check_gathered(z, "z");
  const int64_t C = out.size(1), K = z.size(1), rows = out.size(2) * out.size(3);
  TORCH_CHECK(z.size(2) == out.size(2) && z.size(3) == out.size(3), "manidp add_channels_: z and out sizes differ");
  const std::vector<float> s = kept_scales(mask, index, K, C);
  const int64_t* idx = index.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float* zd = z.data_ptr<float>();
#if defined(__AVX512F__)
  if (C % 16 == 0 && K > 0) {
    int64_t P = 1;  // the ascending head of the index: a padded kept set's kept channels (then its padding)
    while (P < K && idx[P] > idx[P - 1]) ++P;
    add_channels_blocks(o, zd, idx, s.data(), P, K, C, rows, relu);
    return out;
  }
#endif
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = o + r * C;
      const float* zr = zd + r * K;
      for (int64_t j = 0; j < K; ++j) row[idx[j]] += zr[j] * s[j];
      if (relu)
        for (int64_t c = 0; c < C; ++c) row[c] = row[c] > 0.0f ? row[c] : 0.0f;
    }
  });
  return out;
}

// ---------------------------------------------------------------- kept weights (a slice-cache miss)
// gather_slice(weight, rows, cols) = weight[rows][:, cols] of a contiguous OIHW weight, written
// channels_last ([O', kh, kw, I'] in memory) in one pass. oneDNN's blocked weight layouts keep input
// channels innermost, so its reorder runs several times faster from channels_last than from OIHW; ATen
// would need two index_selects and a layout copy to get there (benchmarks/miss_path.py). None for rows
// or cols keeps every output or input channel. Elements are copied as raw 2- or 4-byte words (bf16 or
// fp32); output rows are independent, so the rows split between threads with no shared state.
template <typename Word>
void gather_words(const Word* src, Word* dst, const int64_t* rows, const int64_t* cols, int64_t n_rows,
                  int64_t n_cols, int64_t in_channels, int64_t taps) {
  at::parallel_for(0, n_rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t o = first; o < last; ++o) {
      const Word* s = src + (rows ? rows[o] : o) * in_channels * taps;
      Word* d = dst + o * taps * n_cols;
      for (int64_t j = 0; j < n_cols; ++j) {
        const Word* sj = s + (cols ? cols[j] : j) * taps;
        for (int64_t t = 0; t < taps; ++t) d[t * n_cols + j] = sj[t];
      }
    }
  });
}

at::Tensor gather_slice(const at::Tensor& weight, const std::optional<at::Tensor>& rows,
                        const std::optional<at::Tensor>& cols) {
  TORCH_CHECK(weight.dim() == 4 && weight.device().is_cpu() && weight.is_contiguous() &&
              (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "manidp gather_slice: weight must be a contiguous 4-D fp32 or bf16 CPU tensor (OIHW)");
  const int64_t O = weight.size(0), I = weight.size(1), taps = weight.size(2) * weight.size(3);
  const int64_t n_rows = rows ? rows->numel() : O, n_cols = cols ? cols->numel() : I;
  if (rows) check_index(*rows, n_rows, O);
  if (cols) check_index(*cols, n_cols, I);
  at::Tensor out = at::empty({n_rows, n_cols, weight.size(2), weight.size(3)},
                             weight.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t* r = rows ? rows->data_ptr<int64_t>() : nullptr;
  const int64_t* c = cols ? cols->data_ptr<int64_t>() : nullptr;
  if (weight.element_size() == 4)
    gather_words(static_cast<const uint32_t*>(weight.data_ptr()), static_cast<uint32_t*>(out.data_ptr()), r, c,
                 n_rows, n_cols, I, taps);
  else
    gather_words(static_cast<const uint16_t*>(weight.data_ptr()), static_cast<uint16_t*>(out.data_ptr()), r, c,
                 n_rows, n_cols, I, taps);
  return out;
}

}  // namespace

TORCH_LIBRARY(manidp, m) {
  m.def("gate_scale_(Tensor source, Tensor(a!) target, Tensor w1t, Tensor? b1, Tensor? w2t, Tensor? b2, "
        "bool relu_out, bool abs_pool, float clamp_max, float cut, int topk, int round_to) -> Tensor(a!)");
  m.def("gate_mask(Tensor source, Tensor w1t, Tensor? b1, Tensor? w2t, Tensor? b2, bool relu_out, "
        "bool abs_pool, float clamp_max, float cut, int topk, int round_to) -> Tensor");
  m.def("scale_pool_(Tensor(a!) y, Tensor index, Tensor mask) -> Tensor");
  m.def("scale_pool_gate(Tensor(a!) y, Tensor index, Tensor mask, int keep, Tensor w1t, Tensor? b1, Tensor? w2t, "
        "Tensor? b2, bool relu_out, bool abs_pool, float clamp_max, float cut, int topk, int round_to) "
        "-> (Tensor, Tensor)");
  m.def("add_channels_(Tensor(a!) out, Tensor index, Tensor z, Tensor mask, bool relu) -> Tensor(a!)");
  m.def("gather_slice(Tensor weight, Tensor? rows, Tensor? cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(manidp, CPU, m) {
  m.impl("gate_scale_", &gate_scale_);
  m.impl("gate_mask", &gate_mask);
  m.impl("scale_pool_", &scale_pool_);
  m.impl("scale_pool_gate", &scale_pool_gate);
  m.impl("add_channels_", &add_channels_);
  m.impl("gather_slice", &gather_slice);
}

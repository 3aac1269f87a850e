// packrnn native backend: a whole SequenceClassifier's inference forward in one operator call.
//
// NOTE [Fused classifier inference]
//   A service classifying one text (or a small batch) without gradients pays, in eager mode,
//   for every module call, argument check and tensor op of the Python forward: at B = 1 and
//   H = 32 that Python work is twice the kernel's. classifier_infer does the packed execution's
//   whole forward in C++ instead, with the same aten calls, so the logits are bit-identical to
//   SequenceClassifier's own path (tested):
//     packing      the real steps of each sequence, longest first (at::sort, as
//                  pack_padded_sequence with enforce_sorted=False), the ids range-checked on
//                  the way (real positions only);
//     embedding    index_select of the packed ids' rows (what nn.Embedding does);
//     recurrence   stack_forward: every layer and direction (zero initial states, no dropout);
//     pooling      last: the last layer's final state(s); mean: index_add over each sequence's
//                  rows / length (ops.mean_pool on a PackedSequence); max: scatter_reduce amax
//                  (ops.max_pool). One sequence runs as the module's B = 1 path does (no
//                  packing; its mean sums the rows with at::sum as the padded mean_pool);
//     head         addmm(bias, features, weight^T) (nn.Linear).
//   Only eval-mode calls without gradients come here (dropout is the identity); the Python side
//   (SequenceClassifier._fused_inference) decides, and falls back to the module path on any
//   ValueError raised here, so bad input still gets the module's own error.
#include "recurrence.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace packrnn {

namespace {

at::Tensor head(const at::Tensor& features, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, features, weight.t()) : at::mm(features, weight.t());
}

// The last layer's final state: (B, D*H_out), forward direction first.
at::Tensor last_states(const at::Tensor& h_n, int64_t D) {
  const int64_t n = h_n.size(0);
  if (D == 1) return h_n.select(0, n - 1);
  return at::cat({h_n.select(0, n - 2), h_n.select(0, n - 1)}, 1);
}

// The packed layout of padded ids (B, T) with lengths (B,), as pack_padded_sequence(ids, lengths,
// batch_first=True, enforce_sorted=False) computes it: the columns sorted longest first by the
// same at::sort call, each step's active columns in that order. The ids are range-checked on the
// way (real positions only).
struct PackedIds {
  at::Tensor packed;          // (N,) int64 ids, step-major
  at::Tensor column;          // (N,) int64: each row's sorted column
  at::Tensor batch_sizes;     // (T',) int64, T' = the longest length
  at::Tensor sorted_lengths;  // (B,) int64
  at::Tensor order;           // (B,) int64 sorted_indices; undefined when B == 1
  int64_t rows = 0, nonzero = 0;
};

PackedIds pack_ids_impl(const at::Tensor& ids, const at::Tensor& lengths, int64_t vocab) {
  TORCH_CHECK_VALUE(ids.dim() == 2 && (ids.scalar_type() == at::kLong ||
                                       ids.scalar_type() == at::kInt) && ids.device().is_cpu(),
                    "ids: expected a (B, T) int64 CPU tensor, got ", ids.sizes(), " ",
                    ids.scalar_type(), " on ", ids.device());
  const int64_t B = ids.size(0), T = ids.size(1);
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B &&
                        lengths.scalar_type() == at::kLong && lengths.device().is_cpu(),
                    "lengths: expected a (", B, ",) int64 CPU tensor, got ", lengths.sizes(), " ",
                    lengths.scalar_type());
  TORCH_CHECK_VALUE(B >= 1, "ids: expected at least one sequence, got B = 0");
  const at::Tensor lens = lengths.contiguous();
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= T, "lengths: expected every length in [0, ", T,
                      "] (the padded time dimension), got ", len[b], " at index ", b);
  }
  PackedIds out;
  // Column order, longest first: as pack_padded_sequence(enforce_sorted=False).
  out.sorted_lengths = lens;
  if (B > 1) std::tie(out.sorted_lengths, out.order) = at::sort(lens, 0, /*descending=*/true);
  const int64_t* slen = out.sorted_lengths.data_ptr<int64_t>();
  const int64_t* perm = B > 1 ? out.order.data_ptr<int64_t>() : nullptr;
  const int64_t steps = slen[0];
  for (int64_t j = 0; j < B; ++j) {
    out.rows += slen[j];
    out.nonzero += slen[j] > 0;
  }
  // The packed ids (step-major, columns longest first), each row's column, batch_sizes.
  const at::Tensor id64 = ids.to(at::kLong);
  const auto id = id64.accessor<int64_t, 2>();
  out.packed = at::empty({out.rows}, at::kLong);
  out.column = at::empty({out.rows}, at::kLong);
  out.batch_sizes = at::empty({steps}, at::kLong);
  int64_t* p = out.packed.data_ptr<int64_t>();
  int64_t* col = out.column.data_ptr<int64_t>();
  int64_t* bs = out.batch_sizes.data_ptr<int64_t>();
  for (int64_t t = 0, row = 0, active = out.nonzero; t < steps; ++t) {
    while (active > 0 && slen[active - 1] <= t) --active;
    bs[t] = active;
    for (int64_t j = 0; j < active; ++j, ++row) {
      const int64_t b = perm ? perm[j] : j, v = id[b][t];
      TORCH_CHECK_VALUE(v >= 0 && v < vocab, "ids: expected token ids in [0, ", vocab,
                        ") (vocab_size), got ", v, " at (", b, ", ", t, ")");
      p[row] = v;
      col[row] = j;
    }
  }
  return out;
}

// The inverse of the sorted columns' order: position b holds b's sorted column.
at::Tensor inverse_order(const at::Tensor& order) {
  const int64_t B = order.numel();
  at::Tensor inverse = at::empty({B}, at::kLong);
  const int64_t* perm = order.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  for (int64_t j = 0; j < B; ++j) inv[perm[j]] = j;
  return inverse;
}

// The checks the classifier operators share: a (V, E) embedding of the layer's dtype, a pooling
// they implement.
void check_embedding_and_pooling(const at::Tensor& embedding, at::TensorList weights,
                                 const std::string& pooling) {
  TORCH_CHECK_VALUE(embedding.dim() == 2 && !weights.empty() &&
                        embedding.scalar_type() == weights[0].scalar_type(),
                    "embedding: expected a (V, E) tensor of the layer's dtype ",
                    weights.empty() ? at::kFloat : weights[0].scalar_type(), ", got ",
                    embedding.sizes(), " ", embedding.scalar_type());
  TORCH_CHECK_VALUE(pooling == "last" || pooling == "mean" || pooling == "max",
                    "pooling: expected last, mean or max, got ", pooling);
}

// Mean or max over each sequence's rows of output (N, F), (B, F) in sorted column order, as
// the module path pools: one padded sequence (`one`, the module's one-sequence path) over all
// its rows with at::sum / amax (the padded mean_pool / max_pool); otherwise index_add over each
// row's column / length, or scatter_reduce amax (ops.mean_pool / max_pool on a PackedSequence).
at::Tensor pool_rows(const std::string& pooling, const at::Tensor& output, const PackedIds& p,
                     int64_t B, bool one) {
  if (one) {
    return pooling == "mean" ? output.unsqueeze(1).sum(0) /
                                   p.sorted_lengths.to(output.scalar_type()).view({-1, 1})
                             : output.unsqueeze(1).amax(0);
  }
  if (pooling == "mean") {
    const at::Tensor sums = at::zeros({B, output.size(1)}, output.options())
                                .index_add(0, p.column, output);
    return sums / p.sorted_lengths.clamp_min(1).to(output.scalar_type()).view({-1, 1});
  }
  return at::zeros({B, output.size(1)}, output.options())
      .scatter_reduce(0, p.column.view({-1, 1}).expand_as(output), output, "amax",
                      /*include_self=*/false);
}

// The same layout from ids already packed (a checked PackedSequence's data (N,), batch_sizes
// (T',) and sorted_indices (B,), or None when the columns are in order): each row's column,
// the sorted lengths (zero for columns never active), the ids range-checked.
PackedIds from_packed_ids(const at::Tensor& data, const at::Tensor& batch_sizes,
                          const std::optional<at::Tensor>& sorted_indices, int64_t vocab) {
  TORCH_CHECK_VALUE(data.dim() == 1 && (data.scalar_type() == at::kLong ||
                                        data.scalar_type() == at::kInt) && data.device().is_cpu(),
                    "ids.data: expected an (N,) int64 CPU tensor, got ", data.sizes(), " ",
                    data.scalar_type(), " on ", data.device());
  TORCH_CHECK_VALUE(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong &&
                        batch_sizes.device().is_cpu() && batch_sizes.numel() > 0,
                    "ids.batch_sizes: expected a non-empty (T,) int64 CPU tensor, got ",
                    batch_sizes.sizes(), " ", batch_sizes.scalar_type());
  PackedIds out;
  out.batch_sizes = batch_sizes.contiguous();
  const int64_t* bs = out.batch_sizes.data_ptr<int64_t>();
  const int64_t steps = out.batch_sizes.numel();
  const int64_t B = sorted_indices.has_value() ? sorted_indices->numel() : bs[0];
  TORCH_CHECK_VALUE(bs[0] >= 1 && bs[0] <= B, "ids.batch_sizes: expected batch_sizes[0] in [1, ",
                    B, "], got ", bs[0]);
  out.packed = data.to(at::kLong).contiguous();
  out.rows = out.packed.numel();
  out.nonzero = bs[0];
  out.column = at::empty({out.rows}, at::kLong);
  out.sorted_lengths = at::zeros({B}, at::kLong);
  int64_t* col = out.column.data_ptr<int64_t>();
  int64_t* len = out.sorted_lengths.data_ptr<int64_t>();
  const int64_t* id = out.packed.data_ptr<int64_t>();
  int64_t row = 0;
  for (int64_t t = 0; t < steps; ++t) {
    TORCH_CHECK_VALUE(bs[t] >= 1 && bs[t] <= (t ? bs[t - 1] : B) && row + bs[t] <= out.rows,
                      "ids.batch_sizes: expected non-increasing sizes >= 1 summing to ",
                      out.rows, ", got ", bs[t], " at step ", t);
    for (int64_t j = 0; j < bs[t]; ++j, ++row) {
      TORCH_CHECK_VALUE(id[row] >= 0 && id[row] < vocab, "ids: expected token ids in [0, ",
                        vocab, ") (vocab_size), got ", id[row], " at packed row ", row);
      col[row] = j;
      ++len[j];
    }
  }
  TORCH_CHECK_VALUE(row == out.rows, "ids.batch_sizes: expected sizes summing to ", out.rows,
                    " (the data's rows), got ", row);
  out.order = sorted_indices.has_value() ? sorted_indices->to(at::kLong).contiguous()
                                         : at::arange(B, at::kLong);
  return out;
}

}  // namespace

std::vector<at::Tensor> pack_ids(const at::Tensor& ids, const at::Tensor& lengths,
                                 int64_t vocab_size) {
  PackedIds packed = pack_ids_impl(ids, lengths, vocab_size);
  TORCH_CHECK_VALUE(packed.rows > 0, "lengths: expected at least one non-empty sequence");
  at::Tensor order = packed.order.defined() ? packed.order : at::zeros({1}, at::kLong);
  return {packed.packed, packed.batch_sizes, order, inverse_order(order)};
}

at::Tensor classifier_infer(const std::string& mode, const at::Tensor& ids,
                            const at::Tensor& lengths, const at::Tensor& embedding,
                            at::TensorList weights, const at::Tensor& fc_weight,
                            const std::optional<at::Tensor>& fc_bias, int64_t num_layers,
                            bool bidirectional, bool has_bias, const std::string& pooling) {
  check_embedding_and_pooling(embedding, weights, pooling);
  TORCH_CHECK_VALUE(fc_weight.scalar_type() == weights[0].scalar_type(),
                    "fc_weight: expected the layer's dtype ", weights[0].scalar_type(), ", got ",
                    fc_weight.scalar_type());
  const int64_t B = ids.dim() == 2 ? ids.size(0) : 0;
  const int64_t D = bidirectional ? 2 : 1;
  const PackedIds ids_p = pack_ids_impl(ids, lengths, embedding.size(0));
  const at::Tensor& packed = ids_p.packed;
  const at::Tensor& batch_sizes = ids_p.batch_sizes;
  const int64_t rows = ids_p.rows, nonzero = ids_p.nonzero;

  const at::Tensor& w0 = weights[1];  // w_hh of layer 0: (G*H, H_out)
  const int64_t H_out = w0.size(1);
  at::Tensor features;  // (B, D*H_out) in sorted column order
  if (rows == 0) {
    features = at::zeros({B, D * H_out}, embedding.options());
  } else {
    const at::Tensor x = embedding.index_select(0, packed);  // (N, E)
    std::optional<at::Tensor> h0, c0;  // zero-length sequences: zero states of all B rows
    if (nonzero < B) {
      h0 = at::zeros({num_layers * D, B, H_out}, x.options());
      if (mode == "lstm") {
        const int64_t H = w0.size(0) / 4;
        c0 = at::zeros({num_layers * D, B, H}, x.options());
      }
    }
    const auto out = stack_forward(mode, batch_sizes, x, weights, h0, c0, num_layers,
                                   bidirectional, has_bias, /*padded=*/false);
    features = pooling == "last" ? last_states(out[1], D)
                                 : pool_rows(pooling, out[0], ids_p, B, /*one=*/B == 1);
  }
  if (B > 1) features = features.index_select(0, inverse_order(ids_p.order));  // caller's order
  return head(features, fc_weight, fc_bias);
}

// NOTE [Fused classifier training]
//   A training step of a small classifier (B = 16, H = 32) spends ~40 % of its time outside the
//   arithmetic: the module path's Python, the autograd nodes of the embedding, each layer, the
//   bias folds, the packing and the pooling, each with its own Python. classifier_train runs the
//   packed execution's forward up to the pooled features, and classifier_train_backward its
//   whole backward, as ONE autograd node (SequenceClassifier._fused_features, NOTE [fused
//   training] in models.py), with the same aten calls and kernels as the module path:
//     forward      pack_ids_impl (or, for ids already packed, from_packed_ids); index_select
//                  of the embedding rows; per layer layer_forward
//                  (need_backward, the bias folded as functional folds it: b_ih + b_hh but
//                  for gru); pooling as classifier_infer.
//     backward     pooling: last -> the last layer's grad_h_n; mean -> grad / length on each
//                  row; max -> torch's own rules: amax's (B = 1: ties share the gradient) and
//                  scatter_reduce's (B > 1: ties share it, and the zero the result started from
//                  counts as one more tie where the max is 0). Per layer from the top:
//                  recurrence_backward_directions, then the GEMMs over all rows of
//                  _ops._backward_layer (grad_w_ih = grad_gates^T x, grad_bias = column sums,
//                  grad_x = sum over directions of grad_gates w_ih); the embedding's dense
//                  gradient as models._EmbeddingRows makes it (buffer cache, zeros, index_add_
//                  in row order, padding row zeroed).
//   Dropout on the embedded rows and between layers draws its masks as at::dropout does on CPU
//   (noise = bernoulli(1 - p) / (1 - p) from the default generator, then x * noise; ATen's
//   _dropout_impl), in the module path's order, so a seed gives the same masks; backward
//   multiplies by the saved noise (mul's backward). No proj_size. Features and gradients are
//   those of the module path (tested, float64 and float32, with and without dropout).
//
// The saved list (classifier_train's result after the features, handed back unchanged):
//   [0] packed (N,) ids  [1] column (N,)  [2] batch_sizes (T',)  [3] order (B,) (zeros(1) for
//   one padded sequence)  [4] sorted_lengths (B,)  [5] zero_h (B, H_out)  [6] zero_c (B, H)
//   (lstm; else zero_h again)  [7] pooled (B, D*H_out) in sorted order; then per layer: its
//   input (N, E) or (N, D*H_out), after dropout; the dropout's noise (same shape; an empty
//   tensor without dropout); and layer_forward's result (per direction [output, h_n, (c_n),
//   saved...]).
namespace {

constexpr int64_t kSavedHead = 8;

struct StackShape {
  bool lstm = false, gru = false;
  int64_t D = 1, per = 0, H = 0, H_out = 0, per_dir = 0;  // per_dir: layer_forward's count
};

StackShape stack_shape(const std::string& mode, at::TensorList weights, int64_t num_layers,
                       bool bidirectional, bool has_bias) {
  StackShape s;
  s.lstm = mode == "lstm";
  s.gru = mode == "gru";
  TORCH_CHECK_VALUE(s.lstm || s.gru || mode == "rnn_tanh" || mode == "rnn_relu",
                    "mode: expected rnn_tanh, rnn_relu, lstm or gru, got ", mode);
  s.D = bidirectional ? 2 : 1;
  const int64_t slots = num_layers * s.D, base = has_bias ? 4 : 2;
  TORCH_CHECK_VALUE(num_layers >= 1 && static_cast<int64_t>(weights.size()) == slots * base,
                    "weights: expected ", slots * base, " tensors (no proj_size) for num_layers=",
                    num_layers, ", bidirectional=", bidirectional, ", bias=", has_bias, ", got ",
                    weights.size());
  s.per = base;
  TORCH_CHECK_VALUE(weights[1].dim() == 2, "weights[1] (w_hh): expected a 2-D tensor, got ",
                    weights[1].sizes());
  s.H = weights[1].size(0) / (s.lstm ? 4 : s.gru ? 3 : 1);
  s.H_out = weights[1].size(1);
  s.per_dir = (s.lstm ? 3 : 2) + (s.lstm ? 2 : s.gru ? 1 : 0);
  return s;
}

// at::dropout(x, p, train=true) on CPU, keeping its noise for backward: {x * noise, noise};
// p == 0 draws nothing and returns x (with an empty noise), as at::dropout.
std::pair<at::Tensor, at::Tensor> dropout_with_noise(const at::Tensor& x, double p) {
  if (p == 0 || x.numel() == 0) return {x, at::empty({0}, x.options())};
  at::Tensor noise = at::empty_like(x);
  noise.bernoulli_(1 - p);
  noise.div_(1 - p);
  return {x.mul(noise), noise};
}

c10::List<std::optional<at::Tensor>> optional_list(const std::vector<at::Tensor>& tensors) {
  c10::List<std::optional<at::Tensor>> out;
  for (const auto& t : tensors) {
    out.push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
  }
  return out;
}

}  // namespace

std::vector<at::Tensor> classifier_train(const std::string& mode, const at::Tensor& ids,
                                         const at::Tensor& lengths, bool packed,
                                         const std::optional<at::Tensor>& sorted_indices,
                                         const at::Tensor& embedding, at::TensorList weights,
                                         int64_t num_layers, bool bidirectional, bool has_bias,
                                         const std::string& pooling, double embed_dropout,
                                         double layer_dropout) {
  const StackShape s = stack_shape(mode, weights, num_layers, bidirectional, has_bias);
  check_embedding_and_pooling(embedding, weights, pooling);
  TORCH_CHECK_VALUE(embed_dropout >= 0 && embed_dropout < 1 && layer_dropout >= 0 &&
                        layer_dropout < 1,
                    "dropout: expected probabilities in [0, 1), got ", embed_dropout, " and ",
                    layer_dropout);
  const PackedIds p = packed ? from_packed_ids(ids, lengths, sorted_indices, embedding.size(0))
                             : pack_ids_impl(ids, lengths, embedding.size(0));
  TORCH_CHECK_VALUE(p.rows > 0, "lengths: expected at least one non-empty sequence");
  const int64_t B = p.sorted_lengths.size(0), D = s.D;
  const bool one = !packed && B == 1;  // the module's one-sequence path (NOTE [one sequence])
  const auto opts = embedding.options();
  const at::Tensor zero_h = at::zeros({B, s.H_out}, opts);
  const at::Tensor zero_c = s.lstm ? at::zeros({B, s.H}, opts) : zero_h;
  const at::Tensor order = p.order.defined() ? p.order : at::zeros({1}, at::kLong);
  std::vector<at::Tensor> result{at::Tensor(), p.packed, p.column, p.batch_sizes, order,
                                 p.sorted_lengths, zero_h, zero_c, at::Tensor()};
  at::Tensor input = embedding.index_select(0, p.packed);  // (N, E)
  std::vector<at::Tensor> last_h;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    at::Tensor noise;
    std::tie(input, noise) = dropout_with_noise(input, layer == 0 ? embed_dropout : layer_dropout);
    std::vector<at::Tensor> w_ih, bias, h0, c0, w_hh, b_hh, w_hr;
    for (int64_t k = 0; k < D; ++k) {
      const at::Tensor* w = weights.data() + (layer * D + k) * s.per;
      w_ih.push_back(w[0]);
      w_hh.push_back(w[1]);
      bias.push_back(!has_bias ? at::Tensor() : s.gru ? w[2] : at::add(w[2], w[3]));
      b_hh.push_back(has_bias && s.gru ? w[3] : at::Tensor());
      h0.push_back(zero_h);
      c0.push_back(s.lstm ? zero_c : at::Tensor());
      w_hr.emplace_back();
    }
    const auto out = layer_forward(mode, p.batch_sizes, input, w_ih, optional_list(bias), h0,
                                   optional_list(c0), w_hh, optional_list(b_hh),
                                   optional_list(w_hr), /*need_backward=*/true, /*padded=*/false);
    TORCH_CHECK(static_cast<int64_t>(out.size()) == D * s.per_dir,
                "classifier_train: unexpected layer_forward result count ", out.size());
    result.push_back(input);
    result.push_back(noise);
    result.insert(result.end(), out.begin(), out.end());
    std::vector<at::Tensor> outputs;
    last_h.clear();
    for (int64_t k = 0; k < D; ++k) {
      outputs.push_back(out[k * s.per_dir]);
      last_h.push_back(out[k * s.per_dir + 1]);
    }
    input = D == 1 ? outputs[0] : at::cat(outputs, 1);  // (N, D*H_out)
  }
  const at::Tensor pooled =  // (B, D*H_out), sorted order; input: the top layer's output
      pooling == "last" ? (D == 1 ? last_h[0] : at::cat(last_h, 1))
                        : pool_rows(pooling, input, p, B, one);
  result[kSavedHead] = pooled;  // saved[7]
  result[0] = one ? pooled : pooled.index_select(0, inverse_order(order));
  return result;
}

std::vector<at::Tensor> classifier_train_backward(
    const std::string& mode, const at::Tensor& grad_features, at::TensorList saved,
    at::TensorList weights, int64_t vocab_size, int64_t num_layers, bool bidirectional,
    bool has_bias, const std::string& pooling, int64_t padding_idx, bool table_grad,
    bool one_sequence) {
  const StackShape s = stack_shape(mode, weights, num_layers, bidirectional, has_bias);
  const int64_t D = s.D;
  const int64_t per_layer = 2 + D * s.per_dir;
  TORCH_CHECK_VALUE(static_cast<int64_t>(saved.size()) == kSavedHead + num_layers * per_layer,
                    "saved: expected classifier_train's ", kSavedHead + num_layers * per_layer,
                    " saved tensors, got ", saved.size());
  const at::Tensor &packed = saved[0], &column = saved[1], &batch_sizes = saved[2];
  const at::Tensor &order = saved[3], &sorted_lengths = saved[4];
  const at::Tensor &zero_h = saved[5], &zero_c = saved[6], &pooled = saved[7];
  const int64_t B = sorted_lengths.size(0);
  TORCH_CHECK_VALUE(grad_features.dim() == 2 && grad_features.size(0) == B &&
                        grad_features.size(1) == D * s.H_out,
                    "grad_features: expected shape (", B, ", ", D * s.H_out, "), got ",
                    grad_features.sizes());
  const bool one = one_sequence && B == 1;
  const at::Tensor g = one ? grad_features.contiguous()
                           : grad_features.index_select(0, order);  // (B, D*H_out) sorted
  // The top layer's output (N, D*H_out) and final-state gradients from the pooling.
  at::Tensor grad_out;
  std::vector<at::Tensor> grad_h_n(D);
  if (pooling == "last") {
    for (int64_t k = 0; k < D; ++k) {
      grad_h_n[k] = D == 1 ? g : g.narrow(1, k * s.H_out, s.H_out).contiguous();
    }
  } else if (pooling == "mean") {
    const at::Tensor scale =
        g / (one ? sorted_lengths : sorted_lengths.clamp_min(1)).to(g.scalar_type()).view({-1, 1});
    grad_out = scale.index_select(0, column);
  } else {  // max: torch's backward of the module path's reduction (NOTE above)
    const int64_t top = kSavedHead + (num_layers - 1) * per_layer + 2;  // direction 0's output
    const at::Tensor output =  // the top layer's (N, D*H_out) output
        D == 1 ? saved[top] : at::cat({saved[top], saved[top + s.per_dir]}, 1);
    const at::Tensor mask = output.eq(pooled.index_select(0, column)).to(g.scalar_type());
    const at::Tensor count = one ? mask.sum(0, /*keepdim=*/true)
                                 : pooled.eq(0).to(g.scalar_type()).index_add(0, column, mask);
    grad_out = mask * (g / count).index_select(0, column);
  }
  std::vector<at::Tensor> grads(weights.size());
  at::Tensor grad_x;
  for (int64_t layer = num_layers - 1; layer >= 0; --layer) {
    const int64_t base = kSavedHead + layer * per_layer;
    const at::Tensor& x = saved[base];
    std::vector<at::Tensor> go, ghn, gcn, h0, c0, w_hh, b_hh, w_hr, outputs, act;
    for (int64_t k = 0; k < D; ++k) {
      const at::Tensor* w = weights.data() + (layer * D + k) * s.per;
      const int64_t pos = base + 2 + k * s.per_dir;
      go.push_back(!grad_out.defined() ? at::Tensor()
                   : D == 1            ? grad_out
                                       : grad_out.narrow(1, k * s.H_out, s.H_out));
      ghn.push_back(layer == num_layers - 1 ? grad_h_n[k] : at::Tensor());
      gcn.emplace_back();
      h0.push_back(zero_h);
      c0.push_back(s.lstm ? zero_c : at::Tensor());
      w_hh.push_back(w[1]);
      b_hh.push_back(has_bias && s.gru ? w[3] : at::Tensor());
      w_hr.emplace_back();
      outputs.push_back(saved[pos]);
      const int64_t states = s.lstm ? 3 : 2;
      for (int64_t j = states; j < s.per_dir; ++j) act.push_back(saved[pos + j]);
    }
    const auto r = recurrence_backward_directions(
        mode, batch_sizes, optional_list(go), optional_list(ghn), optional_list(gcn), h0,
        optional_list(c0), w_hh, optional_list(b_hh), optional_list(w_hr), outputs, act,
        /*padded=*/false);
    const int64_t n = static_cast<int64_t>(r.size()) / D;  // [ggx, gh0, (gc0), gw_hh, (gb_hh)]
    const bool want_x = layer > 0 || table_grad;
    grad_x = at::Tensor();
    for (int64_t k = 0; k < D; ++k) {
      const int64_t idx = (layer * D + k) * s.per;
      const at::Tensor& ggx = r[k * n];  // (N, G*H)
      grads[idx] = ggx.t().mm(x);                         // w_ih
      grads[idx + 1] = r[k * n + (s.lstm ? 3 : 2)];       // w_hh
      if (has_bias) {
        grads[idx + 2] = ggx.sum(0);                                              // b_ih
        grads[idx + 3] = s.gru ? r[k * n + 3] : grads[idx + 2].clone();           // b_hh
      }
      if (want_x) {
        const at::Tensor part = ggx.mm(weights[idx]);  // (N, E_layer)
        grad_x = grad_x.defined() ? grad_x.add_(part) : part;
      }
    }
    const at::Tensor& noise = saved[base + 1];
    if (want_x && noise.numel() > 0) grad_x = grad_x.mul(noise);  // through the dropout
    grad_out = grad_x;  // the layer below's output gradient
  }
  at::Tensor grad_table = at::empty({0}, grad_features.options());
  if (table_grad) {
    const int64_t E = saved[kSavedHead].size(1);
    grad_table = empty_buffer(vocab_size, E, grad_features.scalar_type()).zero_();
    grad_table.index_add_(0, packed, grad_x.contiguous());
    if (padding_idx >= 0) grad_table.select(0, padding_idx).zero_();
  }
  grads.insert(grads.begin(), grad_table);
  return grads;
}

}  // namespace packrnn

TORCH_LIBRARY_FRAGMENT(packrnn, m) {
  m.def(
      "classifier_infer(str mode, Tensor ids, Tensor lengths, Tensor embedding, "
      "Tensor[] weights, Tensor fc_weight, Tensor? fc_bias, int num_layers, bool bidirectional, "
      "bool has_bias, str pooling) -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(packrnn, m) {
  m.def("pack_ids(Tensor ids, Tensor lengths, int vocab_size) -> Tensor[]");
  m.def(
      "classifier_train(str mode, Tensor ids, Tensor lengths, bool packed, "
      "Tensor? sorted_indices, Tensor embedding, Tensor[] weights, int num_layers, "
      "bool bidirectional, bool has_bias, str pooling, "
      "float embed_dropout, float layer_dropout) -> Tensor[]");
  m.def(
      "classifier_train_backward(str mode, Tensor grad_features, Tensor[] saved, "
      "Tensor[] weights, int vocab_size, int num_layers, bool bidirectional, bool has_bias, "
      "str pooling, int padding_idx, bool table_grad, bool one_sequence) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(packrnn, CPU, m) {
  m.impl("classifier_infer", &packrnn::classifier_infer);
  m.impl("pack_ids", &packrnn::pack_ids);
  m.impl("classifier_train", &packrnn::classifier_train);
  m.impl("classifier_train_backward", &packrnn::classifier_train_backward);
}

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
  TORCH_CHECK_VALUE(embedding.dim() == 2 && !weights.empty() &&
                        embedding.scalar_type() == weights[0].scalar_type() &&
                        fc_weight.scalar_type() == weights[0].scalar_type(),
                    "embedding: expected a (V, E) tensor of the layer's dtype ",
                    weights.empty() ? at::kFloat : weights[0].scalar_type(), ", got ",
                    embedding.sizes(), " ", embedding.scalar_type());
  TORCH_CHECK_VALUE(pooling == "last" || pooling == "mean" || pooling == "max",
                    "pooling: expected last, mean or max, got ", pooling);
  const int64_t B = ids.dim() == 2 ? ids.size(0) : 0;
  const int64_t D = bidirectional ? 2 : 1;
  const PackedIds ids_p = pack_ids_impl(ids, lengths, embedding.size(0));
  const at::Tensor& packed = ids_p.packed;
  const at::Tensor& column = ids_p.column;
  const at::Tensor& batch_sizes = ids_p.batch_sizes;
  const at::Tensor& sorted_lengths = ids_p.sorted_lengths;
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
    const at::Tensor& output = out[0];  // (N, D*H_out)
    if (pooling == "last") {
      features = last_states(out[1], D);
    } else if (B == 1) {  // the module's one-sequence path: padded pooling over all rows
      features = pooling == "mean"
                     ? output.unsqueeze(1).sum(0) / sorted_lengths.to(output.scalar_type())
                           .view({-1, 1})
                     : output.unsqueeze(1).amax(0);
    } else if (pooling == "mean") {
      const at::Tensor sums = at::zeros({B, output.size(1)}, output.options())
                                  .index_add(0, column, output);
      features = sums / sorted_lengths.clamp_min(1).to(output.scalar_type()).view({-1, 1});
    } else {
      features = at::zeros({B, output.size(1)}, output.options())
                     .scatter_reduce(0, column.view({-1, 1}).expand_as(output), output, "amax",
                                     /*include_self=*/false);
    }
  }
  if (B > 1) features = features.index_select(0, inverse_order(ids_p.order));  // caller's order
  return head(features, fc_weight, fc_bias);
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
}

TORCH_LIBRARY_IMPL(packrnn, CPU, m) {
  m.impl("classifier_infer", &packrnn::classifier_infer);
  m.impl("pack_ids", &packrnn::pack_ids);
}

// packrnn native backend: the time loop of one recurrent layer, each direction, on CPU.
//
// Implements the backend contract (see NOTE [Backend contract] in src/packrnn/_lean.py, which is
// the readable Python version of the same algorithm): the caller has already done every GEMM
// that spans all packed rows (input projections, their gradients); this kernel runs only what
// must be sequential in time.
//
// Letters: T steps, B batch, N packed rows (= sum(batch_sizes)), H hidden size, P proj_size,
// H_out = P if P > 0 else H, G gates (rnn 1, lstm 4, gru 3), b_t = batch_sizes[t] (active rows of
// step t), off_t = sum(batch_sizes[:t]) (first packed row of step t).
//
// NOTE [Active prefix]
//   Sequences are sorted longest first, so the sequences active at step t are exactly state rows
//   [0, b_t), and packed rows [off_t, off_t + b_t) hold them in the same order. Every buffer
//   below is therefore touched as one contiguous row range per step.
//
// Threads (NOTE [Row slabs] and NOTE [Direction tasks] in recurrence.cpp): sequences never read
// each other's state, and the directions of a bidirectional layer never read each other's
// either. One call runs every direction of a layer (the _directions ops; the single-direction
// ops are the same code with one direction): the rows are cut once into about threads / D
// contiguous slabs per direction, balanced by work (one whole direction per thread when
// threads <= D), and each (direction, slab) task runs the WHOLE time loop of its direction on
// its slab -- per step: recurrent GEMM (single-threaded BLAS call), one fused elementwise pass
// (gate nonlinearities + state update), and the projection GEMM for LSTM with proj_size. One
// parallel region per call, no barrier per step. Small problems run on one thread. One
// sequence (b_0 = 1) at large H with spare threads is the exception: each step is split by
// hidden units over the threads, with one wait per step (NOTE [Unit split]). Each direction has
// its own buffers below; the GEMMs over all rows after the backward loop run per
// direction, after the parallel region.
//
// Subnormal floats are flushed to zero inside the kernel (FTZ and DAZ on every thread it runs
// on, the caller's floating-point mode restored on return; torch.set_flush_denormal is never
// changed). PACKRNN_KEEP_SUBNORMALS=1 (read per call) runs with the caller's mode instead. See
// NOTE [Subnormals] in recurrence.cpp.
//
// Per step (forward):   S[0:b_t] = h[0:b_t] @ w_hh^T                 one GEMM  (b_t, G*H)
//                       fused pass: gates = act(gates_x rows + S), update h (and c), write output
// Per step (backward):  fused pass: grads of the pre-activations -> grad_gates_x rows
//                       dh[0:b_t] = grad_gates_h rows @ w_hh           one GEMM  (b_t, H_out)
// After the backward loop: grad_w_hh = grad_gates_h^T @ h_prev         one GEMM over all N rows
//
// ---------------------------------------------------------------------------------------------
// Buffers of recurrence_forward. Owner "caller" = tensor passed in (read only, never written);
// "returned" = allocated here once per call and handed back; "scratch" = allocated here once per
// call and dropped at return. No buffer is allocated inside the time loop. Buffers with N rows
// of 4 MiB or more come from a cache of blocks earlier calls released, else new 2 MiB aligned
// transparent huge pages (NOTE [Buffer cache] in recurrence.cpp).
// Threads write disjoint row ranges of every buffer (their slabs), never the same row; in a
// unit split, disjoint unit ranges of the one row.
// Every buffer below is one direction's.
//
//   gates_x   (N, G*H)   caller    x @ w_ih^T + b_ih (+ b_hh for rnn/lstm). Read only.
//   w_hh      (G*H, H_out) caller  recurrent weight; S = h @ w_hh^T.
//   b_hh      (G*H,)     caller    gru only: added to S inside the fused pass (r multiplies it).
//   w_hr      (P, H)     caller    lstm projection; h = (o * tanh(c)) @ w_hr^T.
//   output    (N, H_out) returned  new h of every packed row.
//   h_n       (B, H_out) returned  the running state h: a clone of h0, updated in place on rows
//                                  [0, b_t) each step; rows >= batch_sizes[0] keep h0.
//   c_n       (B, H)     returned  lstm: the running cell state, same scheme as h_n.
//   S         (b_0, G*H) scratch   h @ w_hh^T of the current step (rows [0, b_t) used).
//   act       (N, 4H) | (N, G*H)   returned as saved[0] when need_backward, else a (b_0, ...)
//                                  scratch indexed by active row instead of packed row:
//                                  lstm: i, f, g, o after their nonlinearity (N, 4H);
//                                  gru:  r, z, n and hn = h @ w_hn^T + b_hn (N, 4H);
//                                  rnn:  not used (backward reads `output`).
//   cells     (N, H)     returned  lstm, saved[1]: c after each row's step (scratch (b_0, H)
//                                  when not need_backward).
//   r_all     (N, H)     returned  lstm with proj, saved[2]: o * tanh(c) of each row, the input of
//                                  the projection GEMM (scratch (b_0, H) when not need_backward).
//
// Buffers of recurrence_backward (forward's `output` and `saved` are read only):
//   grad_output (N, H_out) caller  read only; None = zero. Its rows must be contiguous but the
//                                  row stride is free: a direction's column block of the
//                                  layer's (N, D*H_out) gradient is read in place.
//   grad_h_n, grad_c_n   caller    read only (cloned into dh / dc); None = zero.
//   grad_gates_x (N, G*H) returned gradient of the pre-activations, = gradient of gates_x.
//   grad_gh   (N, G*H)   scratch   gru only: gradient of S + b_hh (differs from grad_gates_x in
//                                  the n block: r * grad). For rnn/lstm it ALIASES grad_gates_x.
//   h_prev    (N, H_out) scratch   the state each row started from (output row of the previous
//                                  step of the same sequence, or h0); input of grad_w_hh's GEMM.
//   dh        (B, H_out) returned  grad_h0: clone of grad_h_n (zeros if None); on rows
//                                  [0, b_t) it accumulates grad_output and is replaced by the
//                                  recurrent gradient.
//   dc        (B, H)     returned  grad_c0 (lstm): clone of grad_c_n (zeros if None), same scheme.
//   d_proj    (N, P)     scratch   lstm with proj: dh of every row (input of grad_w_hr's GEMM).
//   DR        (b_0, H)   scratch   lstm with proj: dh @ w_hr of the current step.
//   grad_w_hh (G*H, H_out), grad_b_hh (G*H,) (gru), grad_w_hr (P, H) returned.
// ---------------------------------------------------------------------------------------------

#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace packrnn {

// Every entry point takes `padded`: false = packed rows (off_t = sum(batch_sizes[:t])), true =
// a time-major padded batch sorted longest first (off_t = t * B, N = T * B, b_t may be 0); see
// NOTE [Padded layout] in recurrence.cpp. Padding rows of the returned N-row buffers are zero.
//
// One direction (reverse = run t = T-1..0). Returns [output, h_n, (c_n if lstm), saved...];
// saved is backend-private (see above).
std::vector<at::Tensor> recurrence_forward(
    const std::string& mode, const at::Tensor& gates_x, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse,
    bool need_backward, bool padded);

// Every direction of one layer in one parallel region (NOTE [Direction tasks]): each list has one
// entry per direction (1 or 2), direction 1 runs reversed. Returns the results of
// recurrence_forward for direction 0, then for direction 1, concatenated (same count each).
std::vector<at::Tensor> recurrence_forward_directions(
    const std::string& mode, const at::Tensor& batch_sizes, at::TensorList gates_x,
    at::TensorList h0, const c10::List<std::optional<at::Tensor>>& c0, at::TensorList w_hh,
    const c10::List<std::optional<at::Tensor>>& b_hh,
    const c10::List<std::optional<at::Tensor>>& w_hr, bool need_backward, bool padded);

// One direction. grad_output, grad_h_n, grad_c_n: None means zero (the loss did not use that
// output); grad_output may be a column block of a wider tensor (rows contiguous, any row
// stride). Returns [grad_gates_x, grad_h0, (grad_c0 if lstm), grad_w_hh, (grad_b_hh if gru),
// (grad_w_hr if lstm with proj)].
std::vector<at::Tensor> recurrence_backward(
    const std::string& mode, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_h_n, const std::optional<at::Tensor>& grad_c_n,
    const at::Tensor& batch_sizes, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, const at::Tensor& output,
    at::TensorList saved, bool padded);

// Every direction of one layer, as recurrence_forward_directions: one entry per direction in
// each list; `saved` is the directions' saved tensors concatenated (the same count each).
// Returns the results of recurrence_backward per direction, concatenated.
std::vector<at::Tensor> recurrence_backward_directions(
    const std::string& mode, const at::Tensor& batch_sizes,
    const c10::List<std::optional<at::Tensor>>& grad_output,
    const c10::List<std::optional<at::Tensor>>& grad_h_n,
    const c10::List<std::optional<at::Tensor>>& grad_c_n, at::TensorList h0,
    const c10::List<std::optional<at::Tensor>>& c0, at::TensorList w_hh,
    const c10::List<std::optional<at::Tensor>>& b_hh,
    const c10::List<std::optional<at::Tensor>>& w_hr, at::TensorList output,
    at::TensorList saved, bool padded);

// One layer: the input projections gates_x[k] = x @ w_ih[k]^T (+ bias[k]: b_ih + b_hh folded for
// rnn/lstm, b_ih for gru) into buffers of the cache, then recurrence_forward_directions. This is
// the entry point the layers call (one opaque operator per layer for torch.compile/export; its
// autograd, registered in packrnn/_ops.py, computes the projections' gradients as GEMMs over
// all rows after recurrence_backward_directions).
//   x (N, E) caller; w_ih[k] (G*H, E) caller; bias[k] (G*H,) caller or None.
//   Returns what recurrence_forward_directions returns.
std::vector<at::Tensor> layer_forward(
    const std::string& mode, const at::Tensor& batch_sizes, const at::Tensor& x,
    at::TensorList w_ih, const c10::List<std::optional<at::Tensor>>& bias, at::TensorList h0,
    const c10::List<std::optional<at::Tensor>>& c0, at::TensorList w_hh,
    const c10::List<std::optional<at::Tensor>>& b_hh,
    const c10::List<std::optional<at::Tensor>>& w_hr, bool need_backward, bool padded);

// Every layer and direction of a module, inference only (no autograd, nothing saved): for each
// layer, the input projections and recurrence_forward_directions, the directions' outputs
// concatenated as the next layer's input. One call instead of one per layer: at B = 1 the
// per-call costs (dispatch, checks, allocations) are a large part of the time. No dropout.
//   x (N, E) caller; weights: torch's flat list (per layer, per direction: w_ih, w_hh[, b_ih,
//   b_hh][, w_hr]) caller, every shape checked; h0 (L*D, B, H_out), c0 (L*D, B, H) (lstm)
//   caller, or None for zeros (B = batch_sizes[0]; padded layout: N / T).
//   Returns [output (N, D*H_out), h_n (L*D, B, H_out), (c_n (L*D, B, H) if lstm)].
std::vector<at::Tensor> stack_forward(const std::string& mode, const at::Tensor& batch_sizes,
                                      const at::Tensor& x, at::TensorList weights,
                                      const std::optional<at::Tensor>& h0,
                                      const std::optional<at::Tensor>& c0, int64_t num_layers,
                                      bool bidirectional, bool has_bias, bool padded);

// A SequenceClassifier's whole inference forward (classifier.cpp, NOTE [Fused classifier
// inference]): packing, embedding rows, stack_forward, pooling, linear head. Buffers:
//   ids (B, T) int64/int32 caller; lengths (B,) int64 caller, each in [0, T];
//   embedding (V, E), weights (as stack_forward), fc_weight (C, D*H_out), fc_bias (C,) caller;
//   packed (N,) / column (N,) / batch_sizes (T',) int64 scratch: each real step's id, its
//   sorted column, the active columns per step; x (N, E) scratch: the embedded rows;
//   features (B, D*H_out) scratch: the pooled states. Returns the logits (B, C).
// Throws ValueError on bad ids or lengths (the Python caller then runs the module path).
at::Tensor classifier_infer(const std::string& mode, const at::Tensor& ids,
                            const at::Tensor& lengths, const at::Tensor& embedding,
                            at::TensorList weights, const at::Tensor& fc_weight,
                            const std::optional<at::Tensor>& fc_bias, int64_t num_layers,
                            bool bidirectional, bool has_bias, const std::string& pooling);

// The packing of padded ids for a SequenceClassifier's training forward (classifier.cpp):
// pack_padded_sequence(ids, lengths, batch_first=True, enforce_sorted=False) of integer ids,
// with each real id range-checked against vocab_size, in one call. Buffers:
//   ids (B, T) int64/int32 caller; lengths (B,) int64 caller, each in [0, T], at least one > 0.
//   Returns [data (N,) int64, batch_sizes (T',) int64, sorted_indices (B,), unsorted_indices
//   (B,)], as that call returns them (int64 data whatever the ids' integer type).
// Throws ValueError on bad ids or lengths (the Python caller then runs the checked path).
std::vector<at::Tensor> pack_ids(const at::Tensor& ids, const at::Tensor& lengths,
                                 int64_t vocab_size);

// A SequenceClassifier's training forward up to the pooled features, and its backward, as one
// autograd node (classifier.cpp, NOTE [Fused classifier training]). Arguments as
// classifier_infer (no proj_size); with packed, ids and lengths are a checked PackedSequence's
// data (N,) and batch_sizes (T',), with its sorted_indices (None: in order); and the dropout
// probabilities on the embedded rows and
// between layers (0: none; drawn as at::dropout draws). classifier_train returns [features
// (B, D*H_out) in the caller's order, then the saved tensors]; classifier_train_backward takes
// the features' gradient (B, D*H_out) and those saved tensors, and returns [the embedding's
// dense gradient (V, E) (an empty tensor unless table_grad), then one gradient per weight,
// torch's flat order]. padding_idx < 0: none. Throws ValueError on bad ids or lengths, or a
// batch with no real step (the Python caller then runs the module path). one_sequence: the
// forward ran one padded sequence (the module's one-sequence path, whose pooling differs).
std::vector<at::Tensor> classifier_train(const std::string& mode, const at::Tensor& ids,
                                         const at::Tensor& lengths, bool packed,
                                         const std::optional<at::Tensor>& sorted_indices,
                                         const at::Tensor& embedding, at::TensorList weights,
                                         int64_t num_layers, bool bidirectional, bool has_bias,
                                         const std::string& pooling, double embed_dropout,
                                         double layer_dropout);
std::vector<at::Tensor> classifier_train_backward(
    const std::string& mode, const at::Tensor& grad_features, at::TensorList saved,
    at::TensorList weights, int64_t vocab_size, int64_t num_layers, bool bidirectional,
    bool has_bias, const std::string& pooling, int64_t padding_idx, bool table_grad,
    bool one_sequence);

// Frees the blocks the buffer cache holds (NOTE [Buffer cache] in recurrence.cpp).
void clear_cache();

// The threads setting of every call (NOTE [Threads] in recurrence.cpp): 0 = auto, from the work
// size; n >= 1 = up to n threads (at most torch's intra-op threads). Process-wide.
void set_kernel_threads(int64_t threads);
int64_t kernel_threads();

// How many time loops this process has run with their steps split by hidden units (NOTE [Unit
// split] in recurrence.cpp): lets tests check that the split path ran.
int64_t split_loops();

// An uninitialised contiguous (rows, cols) CPU tensor; large ones come from the buffer cache.
// For callers whose big per-call outputs (e.g. the input projection) should skip page faults.
at::Tensor empty_buffer(int64_t rows, int64_t cols, at::ScalarType dtype);

// A short description of how the kernel was built and what it runs on (SIMD level, BLAS, and
// whether a call now flushes subnormals: reads PACKRNN_KEEP_SUBNORMALS).
std::string kernel_info();

}  // namespace packrnn

"""The native (C++) recurrence backend and backend selection.

Contract level: ``packrnn._native`` against an autograd per-step oracle written here (forward and
every gradient), and against the lean backend. Module level: packrnn layers on the native backend
against torch.nn with copied weights, at sizes that take the kernel's parallel and vectorised
paths (tests/test_rnn.py runs the full oracle matrix on every backend at tiny sizes).
The first test of a session compiles the kernel (~15 s) unless it is cached on disk already.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.nn.utils import rnn as tnn_rnn

import packrnn
from packrnn import _lean, backend

_NATIVE_ERROR = None if os.environ.get(backend.ENV_VAR) == "python" else backend.native_error()
native_only = pytest.mark.skipif(
    os.environ.get(backend.ENV_VAR) == "python" or _NATIVE_ERROR is not None,
    reason=f"native backend not available: {_NATIVE_ERROR or 'PACKRNN_BACKEND=python'}",
)

MODES = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def batch_sizes_of(lengths: list[int]) -> torch.Tensor:
    """torch's batch_sizes for lengths sorted longest first."""
    return torch.tensor([sum(n > t for n in lengths) for t in range(max(lengths))])


def make_case(mode: str, lengths: list[int], hidden: int, dtype, extra_rows: int = 0,
              proj: int = 0, seed: int = 0) -> dict:
    """Random contract arguments; w_hh scaled so the recurrence is contractive (not chaotic)."""
    g = torch.Generator().manual_seed(seed)
    kind = "lstm" if mode == "lstm_proj" else mode
    gates = GATES[kind]
    h_out = proj or hidden
    batch_sizes = batch_sizes_of(lengths)
    n, b = int(batch_sizes.sum()), len(lengths) + extra_rows

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(
        mode=kind,
        gates_x=rand(n, gates * hidden),
        batch_sizes=batch_sizes,
        h0=rand(b, h_out),
        c0=rand(b, hidden) if kind == "lstm" else None,
        w_hh=rand(gates * hidden, h_out, scale=h_out ** -0.5),
        b_hh=rand(gates * hidden) if kind == "gru" else None,
        w_hr=rand(proj, hidden, scale=hidden ** -0.5) if proj else None,
    )


def oracle_forward(mode, gates_x, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse):
    """Straightforward per-step recurrence with autograd: the reference for forward and grads."""
    hidden = w_hh.shape[0] // GATES[mode]
    sizes = batch_sizes.tolist()
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    h, c = h0, c0
    outputs = [None] * len(sizes)
    for t in order:
        b, rows = sizes[t], slice(offsets[t], offsets[t] + sizes[t])
        gx, hp = gates_x[rows], h[:b]  # (b, G*H), (b, H_out)
        gh = hp @ w_hh.t() + (b_hh if b_hh is not None else 0)  # (b, G*H)
        if mode == "rnn_tanh":
            hn = torch.tanh(gx + gh)
        elif mode == "rnn_relu":
            hn = torch.relu(gx + gh)
        elif mode == "gru":
            r = torch.sigmoid(gx[:, :hidden] + gh[:, :hidden])
            z = torch.sigmoid(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
            n = torch.tanh(gx[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
            hn = (1 - z) * n + z * hp
        else:
            i, f, gg, o = (gx + gh).chunk(4, 1)
            cn = torch.sigmoid(f) * c[:b] + torch.sigmoid(i) * torch.tanh(gg)
            hn = torch.sigmoid(o) * torch.tanh(cn)
            if w_hr is not None:
                hn = hn @ w_hr.t()
            c = torch.cat([cn, c[b:]])
        h = torch.cat([hn, h[b:]])
        outputs[t] = hn
    return torch.cat(outputs), h, c


def run_native_and_oracle(case: dict, reverse: bool):
    """Native forward + backward and the autograd oracle's, on the same random output grads."""
    from packrnn import _native

    out, h_n, c_n, saved = _native.recurrence_forward(**case, reverse=reverse,
                                                      need_backward=True)
    g = torch.Generator().manual_seed(1)
    grads = dict(
        grad_output=torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype),
        grad_h_n=torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(out.dtype),
        grad_c_n=(torch.randn(c_n.shape, generator=g, dtype=torch.float64).to(out.dtype)
                  if c_n is not None else None),
    )
    native_grads = _native.recurrence_backward(
        **grads, **{k: v for k, v in case.items() if k != "gates_x"}, reverse=reverse,
        output=out, saved=saved)

    names = ["gates_x", "h0", "c0", "w_hh", "b_hh", "w_hr"]
    leaves = {k: case[k].detach().clone().requires_grad_() for k in names if case[k] is not None}
    ref_out, ref_h, ref_c = oracle_forward(case["mode"], leaves["gates_x"], case["batch_sizes"],
                                           leaves["h0"], leaves.get("c0"), leaves["w_hh"],
                                           leaves.get("b_hh"), leaves.get("w_hr"), reverse)
    loss = (ref_out * grads["grad_output"]).sum() + (ref_h * grads["grad_h_n"]).sum()
    if ref_c is not None:
        loss = loss + (ref_c * grads["grad_c_n"]).sum()
    ref_grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return (out, h_n, c_n, saved), native_grads, (ref_out, ref_h, ref_c), ref_grads


def assert_matches_oracle(case, reverse, dtype):
    (out, h_n, c_n, _), native_grads, ref, ref_grads = run_native_and_oracle(case, reverse)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref[0].detach(), **tol)
    torch.testing.assert_close(h_n, ref[1].detach(), **tol)
    if c_n is not None:
        torch.testing.assert_close(c_n, ref[2].detach(), **tol)
    names = ["gates_x", "h0", "c0", "w_hh", "b_hh", "w_hr"]
    for name, got in zip(names, native_grads):
        if case[name] is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# Contract level.

@native_only
@pytest.mark.parametrize("extra_rows", [0, 2], ids=["B=b0", "B>b0"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", MODES)
def test_contract_matches_autograd_oracle(mode, dtype, reverse, extra_rows):
    case = make_case(mode, [6, 4, 4, 2, 1], hidden=5, dtype=dtype, extra_rows=extra_rows,
                     proj=3 if mode == "lstm_proj" else 0)
    assert_matches_oracle(case, reverse, dtype)


@native_only
@pytest.mark.parametrize("num_threads", [2], indirect=True)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", MODES)
def test_contract_parallel_and_vector_paths(mode, dtype, reverse, num_threads):
    # 150 active rows and H = 37 (not a multiple of any vector width): steps are split over
    # threads and the fused loops run their vector body and their remainder.
    g = torch.Generator().manual_seed(3)
    lengths = sorted(torch.randint(1, 9, (150,), generator=g).tolist(), reverse=True)
    case = make_case(mode, lengths, hidden=37, dtype=dtype, extra_rows=3,
                     proj=11 if mode == "lstm_proj" else 0, seed=4)
    assert_matches_oracle(case, reverse, dtype)


@native_only
@pytest.mark.parametrize("mode", MODES)
def test_contract_agrees_with_lean_backend(mode):
    from packrnn import _native

    case = make_case(mode, [9, 7, 7, 3, 3, 1], hidden=6, dtype=torch.float64, extra_rows=1,
                     proj=4 if mode == "lstm_proj" else 0)
    for reverse in (False, True):
        ours = _native.recurrence_forward(**case, reverse=reverse, need_backward=True)
        lean = _lean.recurrence_forward(**case, reverse=reverse, need_backward=True)
        for a, b in zip(ours[:3], lean[:3]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, **TOL[torch.float64])
        grads = dict(grad_output=torch.ones_like(ours[0]), grad_h_n=torch.ones_like(ours[1]),
                     grad_c_n=torch.ones_like(ours[2]) if ours[2] is not None else None)
        rest = {k: v for k, v in case.items() if k != "gates_x"}
        g_ours = _native.recurrence_backward(**grads, **rest, reverse=reverse, output=ours[0],
                                             saved=ours[3])
        g_lean = _lean.recurrence_backward(**grads, **rest, reverse=reverse, output=lean[0],
                                           saved=lean[3])
        for a, b in zip(g_ours, g_lean):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, **TOL[torch.float64])


@native_only
@pytest.mark.parametrize("mode", MODES)
def test_inference_saves_nothing_and_matches_training_forward(mode):
    from packrnn import _native

    case = make_case(mode, [5, 5, 3, 2], hidden=7, dtype=torch.float32, extra_rows=1,
                     proj=3 if mode == "lstm_proj" else 0)
    train = _native.recurrence_forward(**case, reverse=False, need_backward=True)
    infer = _native.recurrence_forward(**case, reverse=False, need_backward=False)
    assert infer[3] == ()
    for a, b in zip(train[:3], infer[:3]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@native_only
def test_float32_saturation_is_exact_and_finite():
    # Pre-activations far outside the range of exp: gates saturate to exactly 0/1, no inf/nan.
    from packrnn import _native

    case = make_case("lstm", [3, 2], hidden=9, dtype=torch.float32)
    case["gates_x"] = torch.linspace(-500, 500, case["gates_x"].numel()).view_as(case["gates_x"])
    out, h_n, c_n, saved = _native.recurrence_forward(**case, reverse=False, need_backward=True)
    ref = oracle_forward(**{k: v for k, v in case.items()}, reverse=False)
    assert torch.isfinite(out).all() and torch.isfinite(c_n).all()
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_n, ref[2], rtol=1e-5, atol=1e-6)


@native_only
@pytest.mark.parametrize("change, error, match", [
    (dict(mode="lstmx"), ValueError, "mode: expected one of"),
    (dict(batch_sizes=torch.tensor([2, 1])), ValueError, "batch_sizes: expected them to sum"),
    (dict(batch_sizes=torch.tensor([1, 2, 1, 1])), ValueError, "non-increasing"),
    (dict(batch_sizes=torch.tensor([2, 1, 1, 1], dtype=torch.int32)), TypeError,
     "batch_sizes: expected a 1-D int64 CPU tensor"),
    (dict(h0=torch.zeros(1, 4), c0=torch.zeros(1, 4)), ValueError,
     "h0: expected at least batch_sizes"),
    (dict(h0=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "h0: expected dtype"),
    (dict(c0=None), ValueError, "c0: expected a"),
    (dict(b_hh=torch.zeros(16)), ValueError, "b_hh: expected None"),
])
def test_contract_errors(change, error, match):
    from packrnn import _native

    args = dict(mode="lstm", gates_x=torch.zeros(5, 16), batch_sizes=torch.tensor([2, 1, 1, 1]),
                h0=torch.zeros(2, 4), c0=torch.zeros(2, 4), w_hh=torch.zeros(16, 4), b_hh=None,
                w_hr=None, reverse=False, need_backward=False)
    args.update(change)
    with pytest.raises(error, match=match):
        _native.recurrence_forward(**args)


@native_only
def test_buffer_cache_reuse_and_clear():
    # N * 4H floats >= 4 MiB: output, saved and gradient buffers go through the buffer cache, so
    # the second call gets the first call's (stale) blocks and must overwrite every row.
    from packrnn import _native

    for seed in (0, 1, 2):
        if seed == 2:
            _native.clear_cache()
        case = make_case("lstm", [40] * 48 + [9] * 16, hidden=128, dtype=torch.float32,
                         seed=seed)
        assert case["gates_x"].numel() * 4 >= 4 << 20
        ours = _native.recurrence_forward(**case, reverse=seed == 1, need_backward=True)
        lean = _lean.recurrence_forward(**case, reverse=seed == 1, need_backward=True)
        torch.testing.assert_close(ours[0], lean[0], **TOL[torch.float32])
        grads = dict(grad_output=torch.ones_like(ours[0]), grad_h_n=torch.zeros_like(ours[1]),
                     grad_c_n=torch.zeros_like(ours[2]))
        rest = {k: v for k, v in case.items() if k != "gates_x"}
        g_ours = _native.recurrence_backward(**grads, **rest, reverse=seed == 1, output=ours[0],
                                             saved=ours[3])
        g_lean = _lean.recurrence_backward(**grads, **rest, reverse=seed == 1, output=lean[0],
                                           saved=lean[3])
        torch.testing.assert_close(g_ours[0], g_lean[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g_ours[3], g_lean[3], rtol=1e-4, atol=1e-3)


@native_only
@pytest.mark.parametrize("rows, cols", [(3, 5), (4096, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_buffer(rows, cols, dtype):
    from packrnn import _native

    x = _native.empty(rows, cols, dtype)
    assert x.shape == (rows, cols) and x.dtype == dtype and x.is_contiguous()
    x.fill_(1.5)  # writable end to end
    assert x.sum().item() == 1.5 * rows * cols


# --------------------------------------------------------------------------------------------
# The per-layer entry points: both directions in one call (NOTE [Direction tasks]).

@pytest.fixture
def num_threads(request):
    """torch.set_num_threads(param) and packrnn.set_kernel_threads(param) for the test (so the
    kernel splits even small calls over that many threads), restored after."""
    import packrnn

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    packrnn.set_kernel_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
    packrnn.set_kernel_threads(None)


# lengths, H, extra (zero-length) rows: the first is big enough for the parallel path (several
# slabs per direction at 3 threads), B=1 is one long sequence (parallel path too: one slab per
# direction), the last has zero-length rows and an all-zero-length batch (T = 0).
DIRECTION_CASES = {
    "many": ([8] * 20 + [5] * 60 + [2] * 70, 45, 3),
    "B=1": ([250], 64, 0),
    "zero-length": ([5, 3, 3, 1], 6, 2),
    "T=0": ([], 6, 2),
}


def direction_cases(mode: str, case: str, dtype) -> list[dict]:
    """Two directions' contract arguments on the same batch_sizes (make_case, seeds 0 and 1)."""
    lengths, hidden, extra = DIRECTION_CASES[case]
    proj = hidden // 2 if mode == "lstm_proj" else 0
    out = []
    for seed in (0, 1):
        if lengths:
            d = make_case(mode, lengths, hidden=hidden, dtype=dtype, extra_rows=extra, proj=proj,
                          seed=seed)
        else:  # T = 0: make_case needs one step; keep its states and weights, drop its rows
            d = make_case(mode, [1], hidden=hidden, dtype=dtype, extra_rows=extra - 1, proj=proj,
                          seed=seed)
            d.update(gates_x=d["gates_x"][:0], batch_sizes=torch.zeros(0, dtype=torch.int64))
        out.append(d)
    return out


@native_only
@pytest.mark.parametrize("num_threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("case", list(DIRECTION_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", MODES)
def test_directions_call_equals_single_direction_calls(mode, dtype, case, num_threads):
    """recurrence_{forward,backward}_directions == one recurrence_{forward,backward} call per
    direction (direction 1 reversed); absent gradients (None) == zero gradients."""
    from packrnn import _native

    dirs = direction_cases(mode, case, dtype)
    kind, batch_sizes = dirs[0]["mode"], dirs[0]["batch_sizes"]
    per_dir = [{k: v for k, v in d.items() if k not in ("mode", "batch_sizes")} for d in dirs]
    singles = [_native.recurrence_forward(**d, reverse=k == 1, need_backward=True)
               for k, d in enumerate(dirs)]
    together = _native.recurrence_forward_directions(
        mode=kind, batch_sizes=batch_sizes, need_backward=True, directions=per_dir)
    inference = _native.recurrence_forward_directions(
        mode=kind, batch_sizes=batch_sizes, need_backward=False, directions=per_dir)
    tol = TOL[dtype]
    assert len(together) == len(inference) == 2
    for one, both, infer in zip(singles, together, inference):
        assert len(both[3]) == len(one[3]) and infer[3] == ()
        for a, b, c in zip(one[:3] + one[3], both[:3] + both[3], infer[:3] + (None,) * 3):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, **tol)
            if c is not None:
                torch.testing.assert_close(c, a, **tol)

    g = torch.Generator().manual_seed(5)

    def rand_like(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)

    # the layer's gradient of output is (N, 2*H_out): each direction gets a column block view
    grad_layer = rand_like(torch.cat([r[0] for r in singles], 1))
    width = singles[0][0].shape[1]
    for used in ("output", "h_n", "c_n"):
        if used == "c_n" and kind != "lstm":
            continue
        given, zeros = [], []
        for k, (d, r) in enumerate(zip(per_dir, singles)):
            block = grad_layer[:, k * width : (k + 1) * width]  # (N, H_out) view
            grad = dict(grad_output=block if used == "output" else None,
                        grad_h_n=rand_like(r[1]) if used == "h_n" else None,
                        grad_c_n=rand_like(r[2]) if used == "c_n" else None)
            common = {key: d[key] for key in ("h0", "c0", "w_hh", "b_hh", "w_hr")}
            given.append(dict(grad, **common, output=together[k][0], saved=together[k][3]))
            explicit = {name: (t.contiguous() if t is not None else torch.zeros_like(like))
                        for (name, t), like in zip(grad.items(), r[:3]) if like is not None}
            zeros.append(_native.recurrence_backward(
                mode=kind, batch_sizes=batch_sizes, **{"grad_c_n": None, **explicit}, **common,
                reverse=k == 1, output=r[0], saved=r[3]))
        both = _native.recurrence_backward_directions(mode=kind, batch_sizes=batch_sizes,
                                                      directions=given)
        for one, two in zip(zeros, both):
            for a, b in zip(one, two, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{used}: {m}")


@native_only
@pytest.mark.parametrize("num_threads", [2], indirect=True)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", MODES)
def test_contract_one_sequence_split_by_units(mode, dtype, reverse, num_threads):
    """One sequence with 2 threads: the forward's steps are split by hidden units (NOTE [Unit
    split]; not with a projection), H = 230 is no multiple of the chunk alignment, and the
    forward saves for backward: forward and every gradient match the oracle."""
    case = make_case(mode, [30], hidden=230, dtype=dtype, extra_rows=1,
                     proj=100 if mode == "lstm_proj" else 0, seed=6)
    before = torch.ops.packrnn.split_loops()
    assert_matches_oracle(case, reverse, dtype)
    assert torch.ops.packrnn.split_loops() - before == (0 if mode == "lstm_proj" else 1)


@native_only
@pytest.mark.parametrize("num_threads", [4], indirect=True)
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_contract_one_sequence_split_padded_layout(mode, num_threads):
    """Both directions of one padded sequence, 2 threads each (NOTE [Unit split]): steps past
    its end have no active row (the reverse direction starts at its last real step); the same
    bits as the packed rows on one thread, and zero padding rows."""
    from packrnn import _native

    steps, length = 30, 24
    dirs = [make_case(mode, [length], hidden=230, dtype=torch.float32, seed=seed)
            for seed in (7, 8)]
    batch_sizes = dirs[0]["batch_sizes"]  # (24,) ones
    per_dir = [{k: v for k, v in d.items() if k not in ("mode", "batch_sizes")} for d in dirs]
    padded_dirs = [dict(d, gates_x=torch.cat([d["gates_x"], torch.randn(steps - length,
                                                                        d["gates_x"].shape[1])]))
                   for d in per_dir]
    padded_sizes = torch.cat([batch_sizes, torch.zeros(steps - length, dtype=torch.int64)])
    before = torch.ops.packrnn.split_loops()
    padded = _native.recurrence_forward_directions(
        mode=dirs[0]["mode"], batch_sizes=padded_sizes, need_backward=False,
        directions=padded_dirs, padded=True)
    assert torch.ops.packrnn.split_loops() - before == 1
    packrnn.set_kernel_threads(1)
    packed = _native.recurrence_forward_directions(
        mode=dirs[0]["mode"], batch_sizes=batch_sizes, need_backward=False, directions=per_dir)
    for got, want in zip(padded, packed, strict=True):
        assert torch.equal(got[0][:length], want[0]) and got[0][length:].eq(0).all()
        assert torch.equal(got[1], want[1])
        assert (got[2] is None) == (want[2] is None)
        if got[2] is not None:
            assert torch.equal(got[2], want[2])


@native_only
def test_directions_call_errors():
    from packrnn import _native

    (d0, d1) = direction_cases("lstm", "zero-length", torch.float64)
    per_dir = [{k: v for k, v in d.items() if k not in ("mode", "batch_sizes")} for d in (d0, d1)]
    args = dict(mode="lstm", batch_sizes=d0["batch_sizes"], need_backward=False)
    with pytest.raises(ValueError, match="directions: expected 1 or 2 entries, got 3"):
        _native.recurrence_forward_directions(**args, directions=per_dir + per_dir[:1])
    with pytest.raises(TypeError, match=r"directions\[1\]: expected the keys"):
        _native.recurrence_forward_directions(**args, directions=[per_dir[0], {"gates_x": None}])
    bad = dict(per_dir[1], h0=per_dir[1]["h0"].float())
    with pytest.raises(TypeError, match="h0: expected dtype"):
        _native.recurrence_forward_directions(**args, directions=[per_dir[0], bad])


# --------------------------------------------------------------------------------------------
# Module level: packrnn layers on the native backend vs torch.nn (copied weights).

def _torch_layer(kind, **kwargs):
    cls = {"rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN, "lstm": torch.nn.LSTM,
           "lstm_proj": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    ours_cls = {"rnn_tanh": packrnn.RNN, "rnn_relu": packrnn.RNN, "lstm": packrnn.LSTM,
                "lstm_proj": packrnn.LSTM, "gru": packrnn.GRU}[kind]
    if kind.startswith("rnn"):
        kwargs["nonlinearity"] = kind[4:]
    if kind == "lstm_proj":
        kwargs["proj_size"] = 5
    torch.manual_seed(0)
    reference = cls(**kwargs)
    ours = ours_cls(**kwargs)
    ours.load_state_dict(reference.state_dict())
    ours.backend = "native"
    return reference, ours


@native_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", MODES)
def test_layers_on_native_match_torch_packed(kind, dtype):
    reference, ours = _torch_layer(kind, input_size=6, hidden_size=19, num_layers=2,
                                   bidirectional=True, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 9, (24,), generator=g)
    x = torch.randn(int(lengths.max()), 24, 6, generator=g, dtype=torch.float64).to(dtype)
    packed = tnn_rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    results = []
    for module in (reference, ours):
        data = packed.data.detach().clone().requires_grad_()
        inp = tnn_rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                     packed.unsorted_indices)
        out, state = module(inp)
        states = state if isinstance(state, tuple) else (state,)
        loss = (out.data * torch.linspace(-1, 1, out.data.numel(), dtype=dtype)
                .view_as(out.data)).sum() + sum(s.square().sum() for s in states)
        grads = torch.autograd.grad(loss, [data, *module.parameters()])
        results.append((out.data, states, grads))
    tol = TOL[dtype]
    (ref_out, ref_states, ref_grads), (out, states, grads) = results
    torch.testing.assert_close(out, ref_out, **tol)
    for a, b in zip(states, ref_states):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


@native_only
@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn_tanh"])
def test_layers_on_native_gradcheck(kind):
    # Input and the recurrent weights of both directions (the ones the kernel differentiates);
    # the other parameters' gradients are one GEMM in functional.py, checked against torch above.
    _, ours = _torch_layer(kind, input_size=2, hidden_size=6, bidirectional=True,
                           dtype=torch.float64)
    lengths = torch.tensor([3, 1, 2])
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in ours.named_parameters() if n.startswith(("weight_hh", "weight_hr"))]

    def run(x, *params):
        out, _ = torch.func.functional_call(ours, dict(zip(names, params)), (x,),
                                            {"lengths": lengths})
        return out

    params = [ours.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True)


# --------------------------------------------------------------------------------------------
# Subnormal floats: flushed inside the kernel only (NOTE [Subnormals] in recurrence.cpp).

IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
x86_only = pytest.mark.skipif(not IS_X86, reason="FTZ/DAZ are set only on x86 (MXCSR)")
KEEP_VAR = "PACKRNN_KEEP_SUBNORMALS"
# A subnormal of each dtype, as its bits (converting 1e-40 to float32 would itself be flushed on
# a thread that flushes).
SUBNORMAL_BITS = {torch.float32: (torch.int32, 1 << 20), torch.float64: (torch.int64, 1 << 40)}


def subnormal_like(x: Tensor) -> Tensor:
    """A tensor of x's shape and dtype filled with one subnormal value, whatever the FP mode."""
    int_dtype, bits = SUBNORMAL_BITS[x.dtype]
    return torch.full(x.shape, bits, dtype=int_dtype).view(x.dtype)


def bits(x: Tensor) -> Tensor:
    """x's bit patterns as integers: compared on a thread with DAZ, a subnormal equals zero."""
    return x.view(SUBNORMAL_BITS[x.dtype][0])


@pytest.fixture
def flush_denormal(request):
    """torch.set_flush_denormal(param) on this thread for the test, switched off after."""
    if not torch.set_flush_denormal(request.param):
        pytest.skip("torch.set_flush_denormal is not supported on this CPU")
    yield request.param
    torch.set_flush_denormal(False)


def torch_flushes_here() -> bool:
    """Whether torch, on the calling thread, flushes a subnormal product to zero now."""
    product = torch.tensor([1e-30]) * torch.tensor([1e-10])  # 1e-40: subnormal float32
    return bits(product).item() == 0


def torch_flushed_pattern() -> torch.Tensor:
    """Which elements of a product big enough for torch's worker threads come out zero."""
    return bits(torch.full((1 << 18,), 1e-30) * 1e-10) == 0  # (2^18,) 1e-40 or 0 each


def subnormal_case(dtype, threads: int) -> dict:
    """rnn_relu with w_hh = 0 and h0 = 0: forward output = relu(gates_x); parallel at 2 threads
    (16 x 40 rows, H = 64: above the kernel's parallel threshold)."""
    lengths, hidden = ([40] * 16, 64) if threads > 1 else ([3, 2], 4)
    case = make_case("rnn_relu", lengths, hidden=hidden, dtype=dtype)
    case.update(h0=torch.zeros_like(case["h0"]), w_hh=torch.zeros_like(case["w_hh"]))
    return case


def run_subnormal_case(case: dict, phase: str) -> Tensor:
    """The kernel result that holds a subnormal unless the kernel flushed: forward output of
    gates_x = subnormal; or grad_gates_x of grad_output = subnormal (forward output 1)."""
    from packrnn import _native

    if phase == "forward":
        case = dict(case, gates_x=subnormal_like(case["gates_x"]))
        return _native.recurrence_forward(**case, reverse=False, need_backward=False)[0]
    case = dict(case, gates_x=torch.ones_like(case["gates_x"]))
    out, _, _, saved = _native.recurrence_forward(**case, reverse=False, need_backward=True)
    rest = {k: v for k, v in case.items() if k != "gates_x"}
    return _native.recurrence_backward(grad_output=subnormal_like(out), grad_h_n=None,
                                       grad_c_n=None, **rest, reverse=False, output=out,
                                       saved=saved)[0]


@native_only
@x86_only
@pytest.mark.parametrize("flush_denormal", [False, True], indirect=True,
                         ids=["caller-keeps", "caller-flushes"])
@pytest.mark.parametrize("keep", ["0", "1"], ids=["default", "KEEP=1"])
@pytest.mark.parametrize("num_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_kernel_flushes_subnormals_and_restores_the_caller(dtype, phase, num_threads, keep,
                                                           flush_denormal, monkeypatch):
    # By default every thread of the call flushes; with KEEP=1 every thread follows the caller
    # (so torch.set_flush_denormal(True) still flushes, worker threads included). Either way the
    # caller's and the workers' own setting is the same after the call as before it.
    monkeypatch.setenv(KEEP_VAR, keep)
    workers_before = torch_flushed_pattern()
    case = subnormal_case(dtype, num_threads)
    got = run_subnormal_case(case, phase)
    assert torch_flushes_here() == flush_denormal
    assert torch.equal(torch_flushed_pattern(), workers_before)
    if keep == "0" or flush_denormal:
        assert torch.all(bits(got) == 0), f"{int((bits(got) != 0).sum())} of {got.numel()} kept"
    else:
        assert torch.equal(bits(got), bits(subnormal_like(got)))


@native_only
@x86_only
@pytest.mark.parametrize("flush_denormal", [False, True], indirect=True)
def test_kernel_restores_the_caller_when_it_raises(flush_denormal):
    from packrnn import _native

    case = subnormal_case(torch.float32, threads=1)
    with pytest.raises(ValueError, match="batch_sizes: expected them to sum"):
        _native.recurrence_forward(**dict(case, gates_x=case["gates_x"][:-1]), reverse=False,
                                   need_backward=False)
    assert torch_flushes_here() == flush_denormal


@native_only
def test_keep_subnormals_variable(monkeypatch):
    from packrnn import _native

    expect = "subnormals: flushed" if IS_X86 else "subnormals: not controlled"
    monkeypatch.delenv(KEEP_VAR, raising=False)
    assert expect in _native.kernel_info()
    assert expect in backend.backend_info()
    if IS_X86:
        monkeypatch.setenv(KEEP_VAR, "1")
        assert "subnormals: kept" in _native.kernel_info()
    monkeypatch.setenv(KEEP_VAR, "yes")
    case = subnormal_case(torch.float32, threads=1)
    with pytest.raises(ValueError, match="PACKRNN_KEEP_SUBNORMALS: expected 0 or 1, got 'yes'"):
        _native.recurrence_forward(**case, reverse=False, need_backward=False)


# --------------------------------------------------------------------------------------------
# Backend selection.

def test_backend_env_var_python_and_invalid(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "python")
    assert backend.backend_name() == "python"
    assert backend.backend_info().startswith("python")
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="PACKRNN_BACKEND: expected one of auto, native, python"):
        backend.backend_name()


@native_only
def test_backend_auto_selects_native(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.backend_name() == "native"
    assert packrnn.functional._get_backend().__name__ == "packrnn._native"
    info = backend.backend_info()
    assert info.startswith("native") and str(torch.get_num_threads()) in info


_FAILED_BUILD = r"""
import os, warnings
import packrnn.backend as b
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    names = [b.backend_name() for _ in range(3)]
print(names, len([w for w in caught if "native backend unavailable" in str(w.message)]))
os.environ["PACKRNN_BACKEND"] = "native"
try:
    b.backend_name()
except RuntimeError as e:
    print("raised:", "cannot be built" in str(e))
"""


def test_failed_build_warns_once_and_falls_back(tmp_path):
    # A compiler that always fails, in an empty cache directory: auto falls back with one
    # warning that says why; native raises.
    env = dict(os.environ, PACKRNN_BACKEND="auto", PACKRNN_CACHE_DIR=str(tmp_path),
               CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    src = str(Path(packrnn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _FAILED_BUILD], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "['python', 'python', 'python'] 1" in result.stdout
    assert "raised: True" in result.stdout


# --------------------------------------------------------------------------------------------
# The benchmark module (smoke tests only: nothing is timed here).

def test_lognormal_lengths_follow_the_protocol():
    from packrnn.bench import lognormal_lengths

    torch.manual_seed(0)
    lengths = lognormal_lengths(4000)
    assert lengths.dtype == torch.int64
    assert int(lengths.min()) >= 5 and int(lengths.max()) <= 200
    assert 38 <= float(lengths.float().median()) <= 42


def test_bench_config_errors():
    from packrnn.bench import BenchConfig

    with pytest.raises(ValueError, match="kind: expected 'lstm', 'gru' or 'rnn_tanh'"):
        BenchConfig("x", "transformer", 4, 3, 5)
    with pytest.raises(ValueError, match="batch: expected a positive int, got 0"):
        BenchConfig("x", "lstm", 0, 3, 5)
    with pytest.raises(ValueError, match="longest: expected None or a positive int, got 0"):
        BenchConfig("x", "lstm", 4, 3, 5, longest=0)
    with pytest.raises(ValueError, match="loss: expected 'sum' or 'last', got 'mean'"):
        BenchConfig("x", "lstm", 4, 3, 5, loss="mean")


def test_run_bench_tiny_prints_the_table():
    from packrnn.bench import BenchConfig, run_bench

    lines = []
    config = BenchConfig("tiny", "gru", 3, 4, 5, num_layers=2, bidirectional=True)
    (result,) = run_bench([config], repeats=1, threads=1, memory=False, out=lines.append)
    text = "\n".join(lines)
    assert "backend" in text and "matmul peak" in text and config.label in text
    assert set(result.train) == set(result.infer) == {"packrnn", "torch_padded", "torch_packed"}
    assert all(v > 0 for v in result.train.values())
    assert result.real_steps <= result.padded_steps


def test_step_memory_is_measured_in_a_subprocess():
    from packrnn.bench import BenchConfig, measure_step_memory

    # bench_long's settings (longest, loss) travel to the child process too.
    megabytes = measure_step_memory(BenchConfig("tiny", "lstm", 64, 32, 64, longest=30,
                                                loss="last"), "packrnn", threads=1)
    assert megabytes >= 0


def _load_bench_long():
    """benchmarks/bench_long.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_long.py"
    spec = importlib.util.spec_from_file_location("bench_long", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_scaled_lengths_reach_the_longest():
    from packrnn.bench import scaled_lengths

    torch.manual_seed(0)
    lengths = scaled_lengths(32, 1000)
    assert lengths.dtype == torch.int64 and int(lengths.max()) == 1000
    assert int(lengths.min()) >= 1 and float(lengths.float().median()) < 1000


def test_bench_long_tiny_sweep_prints_goals_and_skips_torch_packed(monkeypatch):
    # packed_limit_s=0: torch packed runs at the first length only (no estimate yet), and is
    # skipped after with the reason.
    bench_long = _load_bench_long()
    monkeypatch.delenv("PACKRNN_KEEP_SUBNORMALS", raising=False)
    lines = []
    results, goals = bench_long.run_long(lengths=[6, 12], repeats=1, threads=1, memory=False,
                                         packed_limit_s=0.0, batch=3, input_size=2,
                                         hidden_size=4, out=lines.append)
    text = "\n".join(lines)
    assert [r.longest for r in results] == [6, 12]
    assert set(results[0].seconds) == set(bench_long.VARIANTS)
    assert set(results[1].seconds) == set(bench_long.VARIANTS) - {"torch_packed"}
    assert "T=12: torch packed skipped: estimated" in text and "> the 0 s limit" in text
    assert goals["vs_padded"] is None and "SKIP: packrnn vs torch padded at T=1000" in text
    assert isinstance(goals["flat"], bool)
    assert ("PASS: packrnn's time per real step" in text) == goals["flat"]
    assert "load average at start" in text and "load average at end" in text
    assert os.environ.get("PACKRNN_KEEP_SUBNORMALS") is None  # the kept variant restored it


def test_bench_long_rejects_bad_lengths(capsys):
    bench_long = _load_bench_long()
    with pytest.raises(SystemExit):
        bench_long.main(["--lengths", "50,x"])
    assert "expected comma-separated positive ints, got '50,x'" in capsys.readouterr().err


def test_run_bench_reports_progress_and_the_load_average(monkeypatch):
    from packrnn import bench

    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: 1e9)  # nothing timed is checked here
    loads = iter([(0.2, 0.3, 0.4), (9.5, 4.0, 2.0)])  # idle at the start, busy at the end
    monkeypatch.setattr(bench.os, "getloadavg", lambda: next(loads))
    configs = [bench.BenchConfig("a", "lstm", 2, 3, 4), bench.BenchConfig("b", "gru", 2, 3, 4)]
    lines, progress = [], []
    bench.run_bench(configs, repeats=2, threads=1, memory=False, out=lines.append,
                    progress=progress.append)
    assert [p.split(" (")[0] for p in progress] == [
        f"bench: [1/2] {configs[0].label}: warmed up", f"bench: [2/2] {configs[1].label}: warmed up",
        "bench: round 1/2 of every config timed", "bench: round 2/2 of every config timed"]
    cpus = os.cpu_count()
    assert f"load average at start: 0.20 0.30 0.40 (1, 5, 15 min) on {cpus} CPUs" in lines
    assert f"load average at end: 9.50 4.00 2.00 (1, 5, 15 min) on {cpus} CPUs" in lines
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: the machine is busy at the end")

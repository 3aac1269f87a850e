"""torch.compile and torch.export of packrnn layers and the classifier (issue: PyTorch 2 stack).

The layers' padded + lengths path is traced as one registered operator per layer
(``packrnn::layer_forward``) with static shapes: no graph breaks (``fullgraph=True``), outputs
and every gradient equal eager's. Most cases compile with the ``aot_eager`` backend (dynamo +
AOTAutograd + the fake implementations and registered autograd, without inductor's codegen, to
keep the suite fast); one case per kind of check goes through inductor.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import packrnn
from packrnn.models import ModelConfig, SequenceClassifier

pytestmark = pytest.mark.skipif(packrnn.backend_name() != "native",
                                reason="compile/export trace the native operators")

E, H = 5, 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo's caches are per code object, and every layer
    shares forward's (compiles of other tests would count against the recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(kind: str, **kwargs):
    if kind.startswith("rnn"):
        return packrnn.RNN(E, H, nonlinearity=kind[4:], batch_first=True, **kwargs)
    cls = {"lstm": packrnn.LSTM, "gru": packrnn.GRU}[kind]
    return cls(E, H, batch_first=True, **kwargs)


def _batch(batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, E, generator=g)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps  # the longest fills the padded length
    if batch > 2:
        lengths[-1] = 1
    return x, lengths


def _states(out):
    return list(out[1]) if isinstance(out[1], tuple) else [out[1]]


def _run_and_grads(module, x, lengths, seed: int):
    """Outputs and the gradients of a loss over every output, input and parameter."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # dropout masks
    out = module(x, lengths=lengths)
    states = _states(out)
    loss = (out[0] * torch.linspace(-1, 1, out[0].shape[-1])).sum()
    loss = loss + sum((s * s).sum() for s in states)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, [x] + params)
    return [out[0].detach()] + [s.detach() for s in states], list(grads)


CASES = [
    ("rnn_tanh", dict()),
    ("rnn_relu", dict(num_layers=2, bidirectional=True)),
    ("lstm", dict(bidirectional=True)),
    ("lstm", dict(num_layers=3, dropout=0.3)),
    ("lstm", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("gru", dict(num_layers=2, bidirectional=True, dropout=0.5)),
    ("gru", dict(num_layers=3)),
]


@pytest.mark.parametrize("kind,kwargs", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_compiled_layer_matches_eager(kind, kwargs):
    torch.manual_seed(0)
    module = _layer(kind, **kwargs).train()  # dropout (where set) is active
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for step, (batch, steps) in enumerate([(4, 6), (3, 9)]):
        x, lengths = _batch(batch, steps, seed=step)
        want_out, want_grads = _run_and_grads(module, x, lengths, seed=step)
        got_out, got_grads = _run_and_grads(compiled, x, lengths, seed=step)
        for got, want in zip(got_out + got_grads, want_out + want_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # padding stays zero
        for b, n in enumerate(lengths.tolist()):
            assert got_out[0][b, n:].abs().max().item() == 0 if n < steps else True


def test_fullgraph_no_recompile_per_shape():
    """Dynamic shapes: the first call compiles for its sizes, the second for symbolic ones;
    recompiling is dynamo's decision, whatever the backend (aot_eager keeps the test fast)."""
    torch.manual_seed(1)
    module = packrnn.LSTM(E, H, num_layers=2, bidirectional=True, batch_first=True).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    shapes = [(4, 7), (5, 9), (3, 4), (6, 12), (2, 3), (7, 5), (3, 11), (5, 6), (8, 8), (2, 10)]
    for step, (batch, steps) in enumerate(shapes):
        x, lengths = _batch(batch, steps, seed=step)
        want_out, want_grads = _run_and_grads(module, x, lengths, seed=step)
        got_out, got_grads = _run_and_grads(compiled, x, lengths, seed=step)
        for got, want in zip(got_out + got_grads, want_out + want_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counter.frame_count <= 2, f"compiled {counter.frame_count} times for 10 shapes"


def test_compiled_backward_sorts_the_batch_without_scatter():
    """The padded + lengths path sorts the batch longest first and unsorts the results
    (NOTE [Permuting the batch] in ``packrnn.rnn``): its traced backward gathers with the
    inverse permutation instead of scatter-adding (which inductor compiles to atomic adds), with
    eager's numbers, initial states included."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    backward_ops = set()

    def capture_backward(graph, example_inputs):
        backward_ops.update(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
        return graph.forward

    def backend(graph, example_inputs):
        return aot_module_simplified(graph, example_inputs, fw_compiler=lambda g, _: g.forward,
                                     bw_compiler=capture_backward,
                                     partition_fn=default_partition)

    torch.manual_seed(5)
    module = packrnn.LSTM(E, H, bidirectional=True, batch_first=True)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    x, lengths = _batch(5, 6, seed=4)
    lengths = torch.tensor([2, 6, 1, 4, 6])  # unsorted, with a tie
    h0, c0 = torch.randn(2, 5, H), torch.randn(2, 5, H)
    results = []
    for m in (module, compiled):
        inputs = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
        out, (h_n, c_n) = m(inputs[0], (inputs[1], inputs[2]), lengths=lengths)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() \
            + (h_n * c_n).sum()
        results.append([out.detach(), *torch.autograd.grad(loss, inputs)])
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "aten.index_select.default" in backward_ops, sorted(backward_ops)
    scatters = {op for op in backward_ops if "index_add" in op or "scatter" in op
                or "index_put" in op}
    assert not scatters, f"the backward scatters: {sorted(scatters)}"


def test_inductor_dropout_matches_eager_with_fallback_random():
    """Inter-layer dropout: the compiled graph draws the same masks as eager for a seed when
    inductor uses torch's RNG (fallback_random), as eager's compact padded form draws its mask
    over the padded layout's rows (NOTE [Compact padded calls])."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(2)
    module = packrnn.GRU(E, H, num_layers=2, dropout=0.5, batch_first=True).train()
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    x, lengths = _batch(4, 6, seed=3)
    want_out, want_grads = _run_and_grads(module, x, lengths, seed=7)
    with inductor_config.patch(fallback_random=True):
        got_out, got_grads = _run_and_grads(compiled, x, lengths, seed=7)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def assert_classifier_matches(model, compiled, seed: int, batch: int, steps: int, **tol) -> None:
    """Logits and every parameter's gradient of ``compiled`` equal ``model``'s (eager) on a
    random (batch, steps) batch of ids padded with 0 after each length (the first is full)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (batch, steps), generator=g)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    for b, n in enumerate(lengths.tolist()):
        ids[b, n:] = 0
    results = []
    for m in (model, compiled):
        logits = m(ids, lengths)
        grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
        results.append([logits.detach(), *grads])
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "mean_padded"])
def test_compiled_classifier_matches_eager(pooling):
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=30, num_classes=3, embed_dim=6, hidden_size=5,
                         num_layers=2, bidirectional=True, pooling=pooling, padding_idx=0,
                         execution="padded" if pooling == "mean_padded" else "packed")
    model = SequenceClassifier(config).train()  # dropouts are 0 by default
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step, (batch, steps) in enumerate([(4, 7), (3, 5)]):
        assert_classifier_matches(model, compiled, step, batch, steps, rtol=1e-5, atol=1e-6)


def test_export_classifier_dynamic_batch_and_time():
    torch.manual_seed(4)
    model = SequenceClassifier(ModelConfig(vocab_size=30, num_classes=4, embed_dim=6,
                                           hidden_size=5, bidirectional=True,
                                           pooling="max")).eval()
    ids = torch.randint(1, 30, (4, 7))
    lengths = torch.tensor([7, 3, 5, 1])
    batch, time = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    program = torch.export.export(model, (ids, lengths),
                                  dynamic_shapes=({0: batch, 1: time}, {0: batch}))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "packrnn.layer_forward.default" in ops
    for shape in [(6, 11), (2, 3), (9, 4)]:
        ids = torch.randint(1, 30, shape)
        lengths = torch.randint(1, shape[1] + 1, (shape[0],))
        lengths[0] = shape[1]
        torch.testing.assert_close(program.module()(ids, lengths), model(ids, lengths))


def test_export_layer_with_lengths():
    torch.manual_seed(5)
    module = packrnn.GRU(E, H, bidirectional=True, batch_first=True).eval()
    x, lengths = _batch(4, 6, seed=0)
    batch, time = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    program = torch.export.export(module, (x,), {"lengths": lengths},
                                  dynamic_shapes={"input": {0: batch, 1: time},
                                                  "lengths": {0: batch}})
    x, lengths = _batch(5, 9, seed=1)
    got = program.module()(x, lengths=lengths)
    want = module(x, lengths=lengths)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_jit_script_and_trace_point_to_compile_and_export():
    module = packrnn.LSTM(E, H, batch_first=True)
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported.*torch.compile"):
        torch.jit.script(module)
    with pytest.raises(RuntimeError, match="torch.jit.trace is not supported.*torch.export"):
        torch.jit.trace(module, (torch.randn(2, 3, E),))
    classifier = SequenceClassifier(ModelConfig(vocab_size=10, num_classes=2)).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="torch.jit.trace is not supported"):
        torch.jit.trace(classifier, (torch.tensor([[1, 2, 3]]),))  # not the fused call either


def test_compile_for_training_compiles_at_most_twice():
    """What ``--compile`` runs (``compile_for_training``: inductor, dynamic shapes, torch's RNG
    for dropout) over 10 differently shaped batches, forward and backward: at most two
    compilations (NOTE [compiled training]), and without dropout eager's numbers."""
    from torch._dynamo.utils import counters

    from packrnn.train import compile_for_training

    torch.manual_seed(4)
    config = ModelConfig(vocab_size=30, num_classes=3, embed_dim=6, hidden_size=5,
                         bidirectional=True, pooling="max", padding_idx=0)
    model = SequenceClassifier(config).train()
    net = compile_for_training(model)
    counters.clear()
    shapes = [(4, 7), (5, 9), (3, 4), (6, 12), (2, 3), (7, 5), (3, 11), (5, 6), (8, 8), (2, 10)]
    for step, (batch, steps) in enumerate(shapes):
        assert_classifier_matches(model, net, step, batch, steps, rtol=1e-4, atol=1e-5)
    compiled = counters["stats"]["unique_graphs"]
    assert 1 <= compiled <= 2, f"compiled {compiled} graphs for 10 shapes"


@pytest.mark.parametrize("pool", ["mean_pool", "max_pool"])
def test_compiled_pools_match_eager(pool):
    """Traced, the padded pools reduce with time last (NOTE [time reductions under inductor] in
    ``packrnn.ops``): same values and gradients as eager, extra feature dims, an empty sequence
    and ties (which share the gradient, as torch.amax) included."""
    fn = getattr(packrnn.ops, pool)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    x[1, 2, 0, 1] = x[3, 2, 0, 1] = 9.0  # a tie in sequence 2's real steps
    lengths = torch.tensor([5, 0, 4, 2])
    results = []
    for f in (fn, compiled):
        xg = x.clone().requires_grad_(True)
        out = f(xg, lengths)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 2, out.numel()).view_as(out)
                                       .to(out.dtype)).sum(), xg)
        results.append((out.detach(), grad))
    (got, got_grad), (want, want_grad) = results[1], results[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)
    assert bool(got[1].eq(0).all())  # the empty sequence

"""Swap packrnn's recurrent layers and torch.nn's: the same weights under the other class.

packrnn's RNN / LSTM / GRU and cells speak torch's API but are not torch's classes:
``isinstance(m, torch.nn.LSTM)`` is False, so tools that pick modules by torch's classes pass
them by without a word. ``torch.ao.quantization.quantize_dynamic`` is one: it leaves a packrnn
layer in float. :func:`to_torch` returns a copy of a model in which every packrnn layer is the
``torch.nn`` layer with the same constructor arguments and parameters, so such tools apply;
:func:`from_torch` goes the other way.

    >>> import torch, packrnn
    >>> model = torch.nn.Sequential(packrnn.LSTM(2, 3))
    >>> twin = packrnn.to_torch(model)
    >>> type(twin[0]).__module__, torch.equal(twin[0].weight_hh_l0, model[0].weight_hh_l0)
    ('torch.nn.modules.rnn', True)
    >>> type(packrnn.from_torch(twin)[0]) is packrnn.LSTM
    True
"""

from __future__ import annotations

import copy

from torch import nn

from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = ["to_torch", "from_torch"]

_PACKRNN_TO_TORCH: dict[type, type] = {
    RNN: nn.RNN, LSTM: nn.LSTM, GRU: nn.GRU,
    RNNCell: nn.RNNCell, LSTMCell: nn.LSTMCell, GRUCell: nn.GRUCell,
}
_TORCH_TO_PACKRNN = {theirs: ours for ours, theirs in _PACKRNN_TO_TORCH.items()}
_CELLS = (RNNCell, LSTMCell, GRUCell, nn.RNNCell, nn.LSTMCell, nn.GRUCell)


def to_torch(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose packrnn layers are ``torch.nn``'s, with the same parameters.

    Every submodule (or ``module`` itself) whose class is exactly ``packrnn.RNN``, ``LSTM``,
    ``GRU``, ``RNNCell``, ``LSTMCell`` or ``GRUCell`` becomes the torch class of the same name,
    with the same constructor arguments, parameter values, ``requires_grad`` flags and training
    mode; everything else is deep-copied. ``module`` is not modified. Use it to hand a packrnn
    model to tools that only know torch's classes, e.g. dynamic quantization:
    ``torch.ao.quantization.quantize_dynamic(packrnn.to_torch(model), {nn.LSTM, nn.Linear})``.

    The torch layers keep torch's contract: no ``lengths=`` keyword, no zero-length sequences
    and no T = 0 input (see the README, "Using torch-only tools").

    Args:
        module: any ``nn.Module``.

    Returns:
        The converted copy (a torch layer if ``module`` is a packrnn layer).

    >>> import torch, packrnn
    >>> gru = packrnn.GRU(2, 3, num_layers=2, bidirectional=True)
    >>> twin = packrnn.to_torch(gru)
    >>> isinstance(twin, torch.nn.GRU), twin.num_layers, twin.bidirectional
    (True, 2, True)
    """
    return _convert(module, _PACKRNN_TO_TORCH)


def from_torch(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose ``torch.nn`` recurrent layers are packrnn's: the inverse of
    :func:`to_torch`.

    Every submodule whose class is exactly ``torch.nn.RNN``, ``LSTM``, ``GRU``, ``RNNCell``,
    ``LSTMCell`` or ``GRUCell`` becomes packrnn's, with the same constructor arguments,
    parameters, ``requires_grad`` flags and training mode. Quantized layers are not converted.

    Args:
        module: any ``nn.Module``.

    Returns:
        The converted copy (a packrnn layer if ``module`` is a torch layer).

    >>> import torch, packrnn
    >>> type(packrnn.from_torch(torch.nn.LSTMCell(2, 3))).__name__
    'LSTMCell'
    """
    return _convert(module, _TORCH_TO_PACKRNN)


def _convert(module: nn.Module, table: dict[type, type]) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if type(module) in table:
        return _twin(module, table[type(module)])
    result = copy.deepcopy(module)
    _replace_children(result, table, memo={})
    return result


def _replace_children(module: nn.Module, table: dict[type, type], memo: dict[int, nn.Module]) -> None:
    """Replace, in place, every descendant whose class is in ``table``; a layer used at several
    places stays one (shared) layer."""
    for name, child in module.named_children():
        if type(child) in table:
            if id(child) not in memo:
                memo[id(child)] = _twin(child, table[type(child)])
            setattr(module, name, memo[id(child)])
        else:
            _replace_children(child, table, memo)


def _twin(module: nn.Module, cls: type) -> nn.Module:
    """``cls`` built with ``module``'s constructor arguments and a copy of its parameters."""
    names = ("input_size", "hidden_size", "bias")
    if not isinstance(module, _CELLS):
        names += ("num_layers", "batch_first", "dropout", "bidirectional")
    kwargs = {name: getattr(module, name) for name in names}
    if isinstance(module, (RNN, RNNCell, nn.RNN, nn.RNNCell)):
        kwargs["nonlinearity"] = module.nonlinearity
    if isinstance(module, (LSTM, nn.LSTM)):
        kwargs["proj_size"] = module.proj_size
    params = dict(module.named_parameters())
    first = next(iter(params.values()))  # every recurrent layer or cell has weight_ih
    # built on "meta" then given empty storage: no initialisation, so the global RNG is left
    # untouched (load_state_dict writes every value)
    twin = cls(**kwargs, device="meta", dtype=first.dtype).to_empty(device=first.device)
    twin.load_state_dict(module.state_dict())
    for name, param in twin.named_parameters():
        param.requires_grad_(params[name].requires_grad)
    return twin.train(module.training)

"""Exception classes that both torch-style and packrnn-style ``except`` clauses catch.

packrnn documents ``ValueError`` for a bad value and ``TypeError`` for a bad type, with messages
of the form ``"<argument>: expected X, got Y"``. For many of the same mistakes torch raises
``RuntimeError`` (a wrong ``hx`` or input size, unsorted lengths with ``enforce_sorted=True``,
packing an empty batch, a non-iterable ``pad_sequence`` argument) and, for a dtype that does not
match the parameters, ``ValueError``. So that code written against either library keeps working
when the other's layers are swapped in, those errors are raised as the classes below, which
derive from every class concerned. The messages are packrnn's.

    >>> import torch, packrnn
    >>> try:
    ...     packrnn.GRU(4, 5)(torch.randn(3, 2, 4), torch.zeros(1, 7, 5))
    ... except RuntimeError as e:  # as torch.nn.GRU; `except ValueError` catches it too
    ...     print(type(e).__name__, e)
    InputError hx: expected shape (1, 2, 5), got (1, 7, 5)
"""

from __future__ import annotations

__all__ = ["InputError", "InputTypeError"]


class InputError(ValueError, RuntimeError):
    """A tensor or length of the wrong shape, size, order or contents.

    A ``ValueError`` (packrnn's documented contract) and a ``RuntimeError`` (what torch raises
    for the same input).
    """


class InputTypeError(TypeError, ValueError, RuntimeError):
    """An argument of the wrong type or dtype where torch raises something other than TypeError.

    A ``TypeError`` (packrnn's documented contract), a ``ValueError`` (torch's RNN layers for an
    input whose dtype differs from the parameters', and for a non-number ``dropout``) and a
    ``RuntimeError`` (torch's kernels for a state or cell input of another dtype, and
    ``pad_sequence`` for a non-iterable argument).
    """

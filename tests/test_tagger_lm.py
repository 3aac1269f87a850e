"""SequenceTagger and LanguageModel: packed per-token loss == masked padded loss, character
features, execution modes, generate carrying the state."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn import functional as F

from packrnn import pack_sequence
from packrnn.data import IGNORE_INDEX, collate_tokens
from packrnn.language_model import LanguageModel, LanguageModelConfig
from packrnn.tagger import SequenceTagger, TaggerConfig
from packrnn.tasks.tag import token_cross_entropy


def _batch(seed: int, n: int, vocab: int, tags: int, chars: bool, zero: bool = True):
    r = random.Random(seed)
    items = []
    for _ in range(n):
        length = r.choice([0, 1, 3, 6, 11] if zero else [1, 3, 6, 11])
        ids = [r.randrange(1, vocab) for _ in range(length)]
        tg = [r.randrange(tags) for _ in range(length)]
        items.append((ids, tg, [[r.randrange(1, 9) for _ in range(r.randint(1, 6))] for _ in ids])
                     if chars else (ids, tg))
    return items


def _masked_padded_ce(logits, targets, lengths):
    """The oracle: per-position cross-entropy of a padded batch, masked, mean over real tokens."""
    B, T, K = logits.shape
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    per = F.cross_entropy(logits.reshape(-1, K), targets.clamp(min=0).reshape(-1),
                          reduction="none").view(B, T)
    return (per * mask).sum() / mask.sum()


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cell, chars, bidirectional", [("lstm", True, True), ("gru", False, True),
                                                         ("rnn", True, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_tagger_packed_loss_equals_masked_padded_loss(cell, chars, bidirectional, seed):
    torch.manual_seed(seed)
    cfg = TaggerConfig(vocab_size=30, num_tags=5, embed_dim=6, hidden_size=5, cell=cell,
                       bidirectional=bidirectional, num_layers=2,
                       char_vocab_size=9 if chars else 0, char_embed_dim=3, char_hidden_size=2)
    model = SequenceTagger(cfg).double()
    items = _batch(seed, 7, 30, 5, chars)  # unsorted, with zero-length sentences
    packed = collate_tokens(items, packed=True)
    loss, real = token_cross_entropy(model(packed.inputs, chars=packed.chars).data,
                                     packed.targets.data)
    assert bool(real.all())  # packed rows are exactly the real tokens: nothing to mask
    loss.backward()
    g_packed = _grads(model)
    model.zero_grad()
    # The oracle: the same model on the padded batch (run packed inside), masked by hand.
    padded = collate_tokens(items, batch_first=True)
    logits = model(padded.inputs, padded.lengths, chars=padded.chars)  # (B, T, K)
    oracle = _masked_padded_ce(logits, padded.targets, padded.lengths)
    oracle.backward()
    torch.testing.assert_close(loss, oracle, rtol=1e-12, atol=1e-12)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g_packed[k], g, rtol=1e-10, atol=1e-12, msg=k)


def test_lm_packed_loss_equals_masked_padded_loss():
    torch.manual_seed(0)
    model = LanguageModel(LanguageModelConfig(vocab_size=20, embed_dim=6, hidden_size=6,
                                              num_layers=2, tie_weights=True)).double()
    assert model.fc.weight is model.embedding.weight
    items = [(x, y) for x, y in ((ids, ids[1:] + [3]) for ids, _ in _batch(3, 6, 20, 1, False, False))]
    packed = collate_tokens(items, packed=True)
    logits, _ = model(packed.inputs)
    loss = F.cross_entropy(logits.data, packed.targets.data)
    loss.backward()
    g_packed = _grads(model)
    model.zero_grad()
    padded = collate_tokens(items, batch_first=True)
    plogits, _ = model(padded.inputs, padded.lengths)
    oracle = _masked_padded_ce(plogits, padded.targets, padded.lengths)
    oracle.backward()
    torch.testing.assert_close(loss, oracle, rtol=1e-12, atol=1e-12)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g_packed[k], g, rtol=1e-10, atol=1e-12, msg=k)


def test_tagger_float32_matches_float64_loosely():
    torch.manual_seed(0)
    model = SequenceTagger(TaggerConfig(vocab_size=30, num_tags=4, embed_dim=8, hidden_size=8,
                                        char_vocab_size=9))
    items = _batch(5, 5, 30, 4, True)
    b = collate_tokens(items, packed=True)
    out32 = model(b.inputs, chars=b.chars).data
    out64 = model.double()(b.inputs, chars=b.chars).data
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)


def test_char_features_are_each_words_own():
    """Packed character features of a batch == running the character layer on each word alone."""
    torch.manual_seed(0)
    model = SequenceTagger(TaggerConfig(vocab_size=30, num_tags=4, embed_dim=4, hidden_size=4,
                                        char_vocab_size=9, char_embed_dim=3, char_hidden_size=2))
    b = collate_tokens(_batch(2, 6, 30, 4, True), packed=True)
    feats = model._char_features(b.chars)  # (N, 4)
    from packrnn import unpack_sequence

    for r, word in enumerate(unpack_sequence(b.chars.inputs)):
        _, (h, _) = model.char_rnn(model.char_embedding(word)[None])  # one word, (1, C, Ec)
        torch.testing.assert_close(feats[r], torch.cat([h[0, 0], h[1, 0]]))


def test_padded_execution_is_the_lessons_run_over_padding():
    """Unidirectional, no characters: real positions equal the packed run (padding comes after);
    bidirectional: the reverse direction starts in the padding, so they differ."""
    torch.manual_seed(0)
    items = _batch(1, 5, 30, 4, False, zero=False)
    b = collate_tokens(items, batch_first=True)
    mask = torch.arange(b.inputs.shape[1])[None, :] < b.lengths[:, None]
    for bidirectional, same in ((False, True), (True, False)):
        cfg = TaggerConfig(vocab_size=30, num_tags=4, embed_dim=4, hidden_size=4,
                           bidirectional=bidirectional)
        packed_model = SequenceTagger(cfg)
        padded_model = SequenceTagger(TaggerConfig(**{**cfg.to_dict(), "execution": "padded"}))
        padded_model.load_state_dict(packed_model.state_dict())
        a = packed_model(b.inputs, b.lengths)[mask]
        p = padded_model(b.inputs, b.lengths)[mask]
        assert torch.allclose(a, p, atol=1e-6) == same
        assert bool((packed_model(b.inputs, b.lengths)[~mask] == 0).all())  # zeros at padding


def test_empty_batch_loss_is_zero_and_backpropagates():
    model = SequenceTagger(TaggerConfig(vocab_size=10, num_tags=3, char_vocab_size=5))
    b = collate_tokens([([], [], []), ([], [], [])], packed=True)
    loss, real = token_cross_entropy(model(b.inputs, chars=b.chars).data, b.targets.data)
    assert float(loss.detach()) == 0.0 and real.numel() == 0
    loss.backward()


def test_tagger_config_and_input_errors():
    with pytest.raises(ValueError, match=r"cell: expected one of rnn, lstm, gru, got 'tcn'"):
        TaggerConfig(vocab_size=10, num_tags=3, cell="tcn")
    with pytest.raises(ValueError, match=r"char_padding_idx: expected < 5, got 5"):
        TaggerConfig(vocab_size=10, num_tags=3, char_vocab_size=5, char_padding_idx=5)
    model = SequenceTagger(TaggerConfig(vocab_size=10, num_tags=3, char_vocab_size=5))
    with pytest.raises(ValueError, match=r"chars: expected the words' characters"):
        model(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"ids: expected a \(B, T\) tensor of word ids, got \(2,\)"):
        SequenceTagger(TaggerConfig(vocab_size=10, num_tags=3))(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"tie_weights: expected embed_dim == hidden_size"):
        LanguageModelConfig(vocab_size=10, embed_dim=4, hidden_size=8, tie_weights=True)


def test_generate_carries_the_state_step_by_step():
    """Greedy generation one step at a time == argmax of one full forward over the result."""
    torch.manual_seed(0)
    lm = LanguageModel(LanguageModelConfig(vocab_size=12, embed_dim=5, hidden_size=7,
                                           num_layers=2)).double()
    prefix = [4, 5, 6]
    new = lm.generate(prefix, max_new=15, temperature=0)
    seq = torch.tensor([[2, *prefix, *new]])
    logits, _ = lm(seq)  # (1, L, V)
    logits[..., [0, 1, 2]] = float("-inf")  # generate never picks <pad>, <unk>, <bos>
    greedy = logits[0, len(prefix):].argmax(-1).tolist()  # predictions after the prefix
    assert greedy[:len(new)] == new
    if len(new) < 15:
        assert greedy[len(new)] == 3  # stopped at <eos>


def test_generate_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    lm = LanguageModel(LanguageModelConfig(vocab_size=12, embed_dim=5, hidden_size=7))
    state = torch.get_rng_state()
    a = lm.generate([4], max_new=20, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert a == lm.generate([4], max_new=20, seed=7)
    assert all(t not in (0, 1, 2) for t in a)
    top1 = lm.generate([4], max_new=10, top_k=1, seed=3)
    assert top1 == lm.generate([4], max_new=10, temperature=0)  # top-1 sampling is greedy
    with pytest.raises(ValueError, match=r"temperature: expected a number >= 0, got -1"):
        lm.generate([4], temperature=-1)
    with pytest.raises(ValueError, match=r"prefix: expected token ids in \[0, 12\), got 12"):
        lm.generate([12])

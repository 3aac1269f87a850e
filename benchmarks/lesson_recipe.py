"""The classic torchtext AG News lesson, re-implemented in plain torch (no torchtext, no packrnn).

This is the baseline ``bench_agnews.py`` compares ``packrnn train`` against. It follows the
lesson's third classifier ("LSTM on packed input") step for step:

- tokens: torchtext's ``get_tokenizer("basic_english")`` (lowercase; split off ``' . , ( ) ! ?``;
  drop ``"``; ``; :`` and ``<br />`` become spaces), applied to ``title + " " + description``
  (torchtext's AG_NEWS joins the two text columns with a space);
- vocabulary: every token of the training file (``min_freq=1``), specials ``<pad>`` = 0 and
  ``<unk>`` = 1, then tokens by decreasing count, ties alphabetical (torchtext's order);
- model: ``nn.Embedding(V, 64, padding_idx=0)`` -> ``nn.LSTM(64, 32, batch_first=True)`` on a
  ``pack_padded_sequence(..., enforce_sorted=False)`` batch -> last hidden state ``h_n[-1]``
  -> ``nn.Linear(32, 4)``;
- training: ``DataLoader(batch_size=16, shuffle=True)`` with a collate that pads ids with
  ``pad_sequence``; ``CrossEntropyLoss``; ``Adam(lr=1e-3)``; one epoch.

Everything here is torch only, so the numbers are those of the lesson's recipe, not of packrnn.
Importable (``bench_agnews.py`` uses it) and runnable on its own::

    python benchmarks/lesson_recipe.py --data-dir ../shared/data/ag_news
"""

from __future__ import annotations

import argparse
import csv
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

__all__ = ["basic_english", "read_agnews", "build_vocab", "LessonData", "load_lesson_data",
           "LSTMPackedClassifier", "train_epoch", "evaluate", "run_lesson"]

# torchtext.data.utils._basic_english_normalize: these patterns, in this order, on the
# lowercased line, then str.split().
_PATTERNS = [(re.compile(p), r) for p, r in (
    (r"\'", " '  "), (r"\"", ""), (r"\.", " . "), (r"<br \/>", " "), (r",", " , "),
    (r"\(", " ( "), (r"\)", " ) "), (r"\!", " ! "), (r"\?", " ? "), (r"\;", " "), (r"\:", " "),
    (r"\s+", " "),
)]


def basic_english(line: str) -> list[str]:
    """torchtext's ``basic_english`` tokenizer."""
    line = line.lower()
    for pattern, replacement in _PATTERNS:
        line = pattern.sub(replacement, line)
    return line.split()


def read_agnews(path: str | Path) -> tuple[list[int], list[str]]:
    """Labels (0-3) and texts (title + " " + description) of a headerless AG News CSV."""
    labels, texts = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            labels.append(int(row[0]) - 1)
            texts.append(" ".join(row[1:]))
    return labels, texts


def build_vocab(token_lists: list[list[str]]) -> dict[str, int]:
    """Token -> index: ``<pad>`` 0, ``<unk>`` 1, then by decreasing count, ties alphabetical."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    stoi = {"<pad>": 0, "<unk>": 1}
    for token, _ in ordered:
        stoi.setdefault(token, len(stoi))
    return stoi


@dataclass
class LessonData:
    """The lesson's encoded data: token ids per text and labels, train and test."""

    vocab: dict[str, int]
    train_ids: list[Tensor]  # (L_i,) int64 per training text
    train_labels: list[int]
    test_ids: list[Tensor]
    test_labels: list[int]


def load_lesson_data(train_path: str | Path, test_path: str | Path) -> LessonData:
    """Read, tokenize and encode both files (vocabulary from the training file only)."""
    train_labels, train_texts = read_agnews(train_path)
    test_labels, test_texts = read_agnews(test_path)
    train_tokens = [basic_english(t) for t in train_texts]
    vocab = build_vocab(train_tokens)

    def encode(tokens: list[str]) -> Tensor:
        return torch.tensor([vocab.get(t, 1) for t in tokens], dtype=torch.int64)

    return LessonData(vocab, [encode(t) for t in train_tokens], train_labels,
                      [encode(basic_english(t)) for t in test_texts], test_labels)


class LSTMPackedClassifier(nn.Module):
    """The lesson's "LSTM on packed input": embedding -> LSTM (packed) -> h_n[-1] -> linear."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden_size: int = 32,
                 num_classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        emb = self.embedding(ids)  # (B, T, E)
        packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n (1, B, H): each text's state at its last token
        return self.fc(h_n[-1])  # (B, C)


def _collate(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, Tensor]:
    ids = [x for x, _ in batch]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)  # (B,)
    labels = torch.tensor([y for _, y in batch], dtype=torch.int64)  # (B,)
    return pad_sequence(ids, batch_first=True, padding_value=0), lengths, labels  # (B, T)


def train_epoch(model: nn.Module, data: LessonData, *, batch_size: int = 16, lr: float = 1e-3,
                seed: int = 0) -> dict[str, float]:
    """One epoch of the lesson's training loop; ``seconds`` covers batching + steps only."""
    pairs = list(zip(data.train_ids, data.train_labels))
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, shuffle=True,
                                         collate_fn=_collate,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    t0 = time.perf_counter()
    for ids, lengths, labels in loader:
        logits = model(ids, lengths)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "train_loss": loss_sum / count, "train_accuracy": correct / count}


@torch.no_grad()
def evaluate(model: nn.Module, ids: list[Tensor], labels: list[int], batch_size: int = 256) -> float:
    """Accuracy (the packed model's prediction does not depend on the batch)."""
    model.eval()
    correct = 0
    for start in range(0, len(ids), batch_size):
        x, lengths, y = _collate(list(zip(ids[start:start + batch_size],
                                          labels[start:start + batch_size])))
        correct += int((model(x, lengths).argmax(-1) == y).sum())
    return correct / len(ids)


def run_lesson(data: LessonData, *, embed_dim: int = 64, hidden_size: int = 32,
               batch_size: int = 16, lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Build the lesson's model, train it one epoch, test it: seconds, losses, accuracies."""
    torch.manual_seed(seed)
    model = LSTMPackedClassifier(len(data.vocab), embed_dim, hidden_size)
    result = train_epoch(model, data, batch_size=batch_size, lr=lr, seed=seed)
    result["test_accuracy"] = evaluate(model, data.test_ids, data.test_labels)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/ag_news"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_lesson_data(Path(args.data_dir) / "train_partial.csv", Path(args.data_dir) / "test.csv")
    print(f"data: {len(data.train_ids)} train, {len(data.test_ids)} test, vocabulary "
          f"{len(data.vocab)} ({time.perf_counter() - t0:.1f} s to read and tokenize)")
    r = run_lesson(data, seed=args.seed)
    print(f"lesson recipe: epoch {r['seconds']:.1f} s, train_loss {r['train_loss']:.4f}, "
          f"train_accuracy {r['train_accuracy']:.4f}, test_accuracy {r['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()

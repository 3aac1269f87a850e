"""The ``packrnn`` command: a thin argparse layer over ``packrnn.train`` and friends.

    packrnn train [--task classify|tag|lm] --train PATH [--test PATH] --model lstm --output DIR [...]
    packrnn train --resume --output DIR          (continue a run with its saved settings)
    packrnn evaluate DIR --data PATH [--json]
    packrnn predict DIR "some text" ... [--json]      (or one text per line on stdin; options
                                                      may come before or after the texts)
    packrnn export DIR model.onnx                     (then: packrnn predict model.onnx ...)
    packrnn generate DIR "prefix" [--max-new N] [--temperature T] [--top-k K] [--seed S]
    packrnn bench [...]
    packrnn demo [...]

Errors a user can fix are printed as one line, ``packrnn: error: ...``, with a nonzero exit
status (2 for bad arguments and inputs, 130 when interrupted); set ``PACKRNN_DEBUG=1`` to see
the traceback of an unexpected error. Distributed: run the same command under torchrun, e.g.
``torchrun --nproc_per_node 2 -m packrnn.cli train ...``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Mapping, Sequence

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2  # bad arguments or inputs (argparse's code too)
EXIT_FAILURE = 1  # an unexpected error
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise SystemExit(_fail(f"{self.prog}: {message}", EXIT_USAGE))


def _fail(message: str, code: int) -> int:
    print(f"packrnn: error: {message}", file=sys.stderr)
    return code


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_format_args(p: argparse.ArgumentParser, default_format: str | None) -> None:
    p.add_argument("--format", choices=["agnews", "csv", "tsv", "jsonl", "conllu", "conll", "text"],
                   default=None,
                   help="file format: agnews (label 1-4, title, description; no header), csv or "
                        "tsv with a header row, jsonl; tag: conllu, conll (columns), jsonl "
                        "(token and tag lists); lm: text (a text per line) or a column of the "
                        "others" + (" (default: agnews; tag: conllu; lm: text)" if default_format
                                    else " (default: the training run's)"))
    p.add_argument("--text-column", metavar="NAME",
                   help="csv/jsonl: column(s) holding the text, comma-separated (default: text)")
    p.add_argument("--label-column", metavar="NAME",
                   help="csv/jsonl: column holding the label (default: label)")
    p.add_argument("--skip-bad-rows", action="store_true", default=None,
                   help="skip and count malformed rows instead of stopping at the first")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="packrnn", description="Recurrent text classifiers over packed "
                     "variable-length sequences.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"packrnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a text classifier, a tagger or a language model",
                       description="Train a recurrent text classifier (--task classify), "
                                   "sequence tagger (tag) or language model (lm); writes "
                                   "checkpoint.pt, metrics.json and curves.png to --output.")
    t.add_argument("--task", choices=["classify", "tag", "lm"], default="classify",
                   help="classify: a label per text; tag: a tag per token; lm: the next "
                        "character or word (default: classify)")
    # --train and --model are required unless --resume finds a run in --output (_train_config).
    t.add_argument("--train", metavar="PATH", help="labelled training file (required unless "
                   "--resume continues a run)")
    t.add_argument("--test", metavar="PATH", help="labelled file evaluated after every epoch")
    _add_format_args(t, "agnews")
    t.add_argument("--delimiter", metavar="CHAR", help="csv: field separator (default: tab for "
                   ".tsv, else comma)")
    t.add_argument("--model", choices=["rnn", "lstm", "gru"], help="recurrent cell (required "
                   "unless --resume continues a run)")
    t.add_argument("--bidirectional", action="store_true", help="add a reverse direction")
    t.add_argument("--layers", type=_positive_int, default=1, metavar="N",
                   help="stacked recurrent layers (default: 1)")
    t.add_argument("--embed-dim", type=_positive_int, default=64, metavar="N", help="(default: 64)")
    t.add_argument("--hidden-size", type=_positive_int, default=32, metavar="N",
                   help="hidden size per direction (default: 32)")
    t.add_argument("--dropout", type=_float, default=0.0, metavar="P",
                   help="dropout between layers and before the output layer (default: 0)")
    t.add_argument("--embed-dropout", type=_float, default=0.0, metavar="P",
                   help="dropout on the embedded tokens, the recurrent input (default: 0)")
    t.add_argument("--pooling", choices=["last", "mean", "max", "mean_padded"], default="last",
                   help="features for the classifier: last state, mean or max over the real "
                        "steps, or the lesson's mean over padded outputs (default: last)")
    t.add_argument("--execution", choices=["packed", "padded"], default="packed",
                   help="packed: compute only real steps; padded: the lesson's run over padding "
                        "(default: packed)")
    t.add_argument("--vectors", metavar="PATH", help="word2vec/GloVe text file to initialise the "
                   "embedding from")
    t.add_argument("--freeze-embedding", action="store_true", help="do not train the embedding")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (classify; padded batches with "
                        "lengths through the layers' traceable path; compiling takes ~30 s)")
    t.add_argument("--sparse-embedding", action="store_true",
                   help="sparse embedding gradients with lazy Adam (only the batch's rows are "
                        "updated): much faster with a large vocabulary")
    t.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="(default: 16)")
    t.add_argument("--epochs", type=_positive_int, default=1, metavar="N", help="(default: 1)")
    t.add_argument("--lr", type=_float, default=1e-3, help="Adam learning rate (default: 0.001)")
    t.add_argument("--lr-decay", type=_float, default=1.0, metavar="F",
                   help="multiply the learning rate by F after every epoch (default: 1, constant)")
    t.add_argument("--weight-decay", type=_float, default=0.0, help="(default: 0)")
    t.add_argument("--grad-clip", type=_float, metavar="NORM", help="clip the gradient norm")
    t.add_argument("--seed", type=int, default=0, help="(default: 0)")
    t.add_argument("--bucket", action="store_true",
                   help="batch texts of similar length together (less padding, faster)")
    t.add_argument("--max-tokens", type=_positive_int, metavar="N",
                   help="with --bucket: at most N padded tokens per batch")
    t.add_argument("--min-freq", type=_positive_int, default=1, metavar="N",
                   help="vocabulary: keep tokens seen at least N times (default: 1)")
    t.add_argument("--max-vocab", type=_positive_int, metavar="N", help="vocabulary size limit")
    t.add_argument("--max-length", type=_positive_int, metavar="N", help="truncate texts to N tokens")
    t.add_argument("--tokenizer", choices=["basic_english", "split"], default="basic_english")
    g = t.add_argument_group("tagging (--task tag) and language modelling (--task lm)")
    g.add_argument("--tagset", choices=["upos", "xpos"], default="upos",
                   help="conllu: tag column UPOS (4) or XPOS (5) (default: upos)")
    g.add_argument("--token-column", type=int, default=0, metavar="I",
                   help="conll: 0-based column of the word (default: 0)")
    g.add_argument("--tag-column", type=int, default=-1, metavar="I",
                   help="conll: 0-based column of the tag, negative from the end (default: -1)")
    g.add_argument("--lowercase", action="store_true",
                   help="tag: look words up lowercased (characters keep their case)")
    g.add_argument("--char-features", action="store_true",
                   help="tag: add word features from a character-level recurrent layer")
    g.add_argument("--char-embed-dim", type=_positive_int, default=16, metavar="N",
                   help="tag: character embedding size (default: 16)")
    g.add_argument("--char-hidden-size", type=_positive_int, default=32, metavar="N",
                   help="tag: character layer's hidden size per direction (default: 32)")
    g.add_argument("--level", choices=["char", "word"], default="char",
                   help="lm: model characters or words (default: char)")
    g.add_argument("--tie-weights", action="store_true",
                   help="lm: the output layer reuses the embedding (needs --embed-dim == "
                        "--hidden-size)")
    t.add_argument("--output", required=True, metavar="DIR", help="run directory")
    group = t.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --output from its last checkpoint, with its "
                            "saved settings (other flags given must match them, except --epochs, "
                            "--test, --threads, --device and the like)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run in --output (removes only packrnn's files)")
    t.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue even if a data file changed since the checkpoint")
    t.add_argument("--checkpoint-every", type=_positive_int, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (default: every epoch)")
    t.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader workers")
    t.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch threads (default: 1 for a small model, else torch's default; "
                        "see README 'Threads')")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    t.add_argument("--eval-batch-size", type=_positive_int, default=256, metavar="N")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="score a trained run on a labelled file",
                       description="classify: accuracy and loss, per-class precision, recall "
                                   "and F1 with their macro averages, and the confusion matrix; "
                                   "tag: token accuracy and loss, per-tag precision/recall/F1, "
                                   "macro averages; lm: loss, perplexity, bits per token.")
    e.add_argument("dir", metavar="DIR", help="run directory written by `packrnn train`")
    e.add_argument("--data", required=True, metavar="PATH", help="labelled file")
    _add_format_args(e, None)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="label texts (or tag sentences) with a trained run or an "
                       "exported .onnx",
                       description="Label each text (arguments, or one per line on stdin): one "
                                   "output line per text, blank lines included. Options may come "
                                   "before or after the texts; a text starting with '-' goes "
                                   "after '--'. With a .onnx file from `packrnn export`, "
                                   "onnxruntime serves it without packrnn's model code. A tagger "
                                   "reads sentences of whitespace-separated tokens and prints one "
                                   "token<TAB>tag per line, a blank line after each sentence.")
    p.add_argument("dir", metavar="DIR", help="run directory written by `packrnn train`, or a "
                   ".onnx file written by `packrnn export`")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts; none: read lines from stdin")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.set_defaults(func=_cmd_predict)

    x = sub.add_parser("export", help="write a trained run as an ONNX file",
                       description="Write the run's classifier as ONNX (standard LSTM/GRU/RNN "
                                   "operators fed the real lengths; inputs ids (B, T) and "
                                   "lengths (B,), output logits), with the vocabulary, labels "
                                   "and tokenizer as metadata. Needs packrnn[onnx].")
    x.add_argument("dir", metavar="DIR", help="run directory written by `packrnn train`")
    x.add_argument("output", metavar="MODEL.onnx", help="file to write")
    x.set_defaults(func=_cmd_export)

    gen = sub.add_parser("generate", help="continue a text with a trained language model",
                         description="Sample a continuation of PREFIX from a run of --task lm, "
                                     "step by step, until <eos> or --max-new units.")
    gen.add_argument("dir", metavar="DIR", help="run directory written by `packrnn train --task lm`")
    gen.add_argument("prefix", nargs="?", default="", metavar="PREFIX",
                     help="start of the text (default: empty)")
    gen.add_argument("--max-new", type=_positive_int, default=100, metavar="N",
                     help="at most N new characters or words (default: 100)")
    gen.add_argument("--temperature", type=_float, default=1.0, metavar="T",
                     help="sampling temperature; 0 takes the likeliest unit (default: 1)")
    gen.add_argument("--top-k", type=_positive_int, metavar="K",
                     help="sample among the K likeliest units only")
    gen.add_argument("--seed", type=int, help="same seed, same text")
    gen.add_argument("--samples", type=_positive_int, default=1, metavar="N",
                     help="N continuations, one per line (seeds SEED, SEED+1, ...) (default: 1)")
    gen.set_defaults(func=_cmd_generate)

    # bench and demo parse their own options (main() hands them the rest of argv).
    sub.add_parser("bench", help="speed table: packrnn vs torch (`packrnn bench --help`)",
                   add_help=False)
    sub.add_parser("demo", help="the main job: a classifier on a synthetic task where word "
                   "order matters, packed vs padded, the 'hello' example and the 'hihello' "
                   "character RNN (`packrnn demo --help`)", add_help=False)
    return parser


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------


# `packrnn train` options whose TrainConfig field has another name; the others keep theirs.
_TRAIN_FIELDS = {"train": "train_path", "test": "test_path", "layers": "num_layers",
                 "max_vocab": "max_vocab_size", "checkpoint_every": "checkpoint_every_steps",
                 "no_progress": "progress", "no_plot": "plot"}


def _train_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> option string ("--hidden-size") of every `packrnn train` option."""
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                 ).choices["train"]
    return {a.dest: a.option_strings[-1] for a in train._actions
            if a.option_strings and a.dest != "help"}


def train_command(fields: Mapping[str, Any]) -> str:
    """The ``packrnn train`` command line that sets these TrainConfig ``fields`` (in their
    order; False flags left out), as the benchmarks print the configurations they ran.

    Raises ValueError for a field that ``packrnn train`` has no option for, rather than print a
    command that would run something else.

    >>> train_command({"task": "lm", "train_path": "t.txt", "num_layers": 2, "lr": 3e-3,
    ...                "bucket": True, "progress": False})
    'packrnn train --task lm --train t.txt --layers 2 --lr 0.003 --bucket --no-progress'
    """
    train = _subparser(build_parser(), "train")
    actions = {_TRAIN_FIELDS.get(a.dest, a.dest): a for a in train._actions
               if a.option_strings and a.dest != "help"}
    parts = ["packrnn train"]
    for name, value in fields.items():
        action = actions.get(name)
        if action is None:
            raise ValueError(f"fields: expected TrainConfig fields that packrnn train has an "
                             f"option for, got {name!r}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch: --bucket, or --no-progress for progress=False
            if bool(value) != action.dest.startswith("no_"):
                parts.append(flag)
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def _given_options(argv: Sequence[str]) -> set[str]:
    """The dests of the `packrnn train` options written on the command line (not defaults)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["train"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) & set(_train_options(parser))


def _field(a: argparse.Namespace, dest: str) -> tuple[str, object]:
    """The TrainConfig field and value of option ``dest``."""
    value = getattr(a, dest)
    if dest in ("no_progress", "no_plot"):
        value = not value
    elif dest == "skip_bad_rows":
        value = bool(value)
    elif dest == "format" and value is None:  # each task has its own default format
        from .train import TASK_FORMATS

        value = TASK_FORMATS[a.task][0]
    return _TRAIN_FIELDS.get(dest, dest), value


def _train_config(a: argparse.Namespace, given: set[str]):
    """The run's TrainConfig: from the flags, or with --resume from the run's saved settings.

    ``packrnn train --resume --output DIR`` alone continues with the saved settings; a flag
    given beside it must match its saved value unless it may change on resume (--epochs,
    --test, --threads, ...), and is refused otherwise, naming the flag.
    """
    from .checkpoint import CHECKPOINT_NAME, load_checkpoint
    from .rundir import classify
    from .train import _RESUMABLE_CHANGES, TrainConfig, TrainError

    options = _train_options(build_parser())
    run = a.resume and classify(a.output, [CHECKPOINT_NAME]) == "run"
    if not run:
        missing = [options[d] for d in ("train", "model") if getattr(a, d) is None]
        if missing:
            why = f" (no packrnn run in {a.output!r} to resume)" if a.resume else ""
            raise SystemExit(_fail("packrnn train: the following arguments are required: "
                                   f"{', '.join(missing)}{why}", EXIT_USAGE))
        return TrainConfig(**dict(_field(a, d) for d in options))
    saved = dict(load_checkpoint(a.output)["train_config"])
    values = dict(saved)
    for dest in sorted(given - {"output", "resume", "overwrite"}):
        name, value = _field(a, dest)
        if name not in _RESUMABLE_CHANGES and value != saved.get(name):
            raise TrainError(f"{options[dest]}: expected {saved.get(name)!r} as saved in the run "
                             f"{a.output!r} (--resume continues with its settings: leave "
                             f"{options[dest]} out), got {value!r}")
        values[name] = value
    values.update(output=a.output, resume=True, overwrite=False)
    return TrainConfig.from_dict(values)


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import train

    train(_train_config(a, a.given))
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .train import evaluate

    r = evaluate(a.dir, a.data, format=a.format, text_column=a.text_column,
                 label_column=a.label_column, skip_bad_rows=a.skip_bad_rows)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    if "macro_f1" in r:
        return _print_tag_scores(r)
    if "perplexity" in r:
        return _print_lm_scores(r)
    names = r["labels"]
    width = max(len("macro avg"), *(len(n) for n in names))

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    print(f"accuracy {r['accuracy']:.4f} on {r['count']} texts, loss {r['loss']:.4f}"
          + (f" ({r['skipped']} bad rows skipped)" if r["skipped"] else ""))
    print()
    print(f"{'label':<{width}}  precision  recall      f1  support")
    for i, n in enumerate(names):
        print(f"{n:<{width}}  {cell(r['precision'][i]):>9}  {cell(r['recall'][i]):>6}  "
              f"{cell(r['f1'][i]):>6}  {r['support'][i]:>7}")
    m = r["macro"]
    print(f"{'macro avg':<{width}}  {cell(m['precision']):>9}  {cell(m['recall']):>6}  "
          f"{cell(m['f1']):>6}  {r['count']:>7}")
    print()
    print("confusion matrix (rows: true label, columns: predicted)")
    cells = [str(v) for row in r["confusion"] for v in row]
    cw = max(len(c) for c in cells + [str(i) for i in range(len(names))])
    print(f"{'':<{width}}  " + " ".join(f"{j:>{cw}}" for j in range(len(names))))
    for i, n in enumerate(names):
        print(f"{n:<{width}}  " + " ".join(f"{v:>{cw}}" for v in r["confusion"][i]) + f"   ({i})")
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from .train import load_run, predict

    if os.path.isfile(a.dir):  # a run is a directory; a file is an exported model
        from .serve_onnx import OnnxClassifier

        try:  # fail on a bad file before waiting for stdin
            served = OnnxClassifier(a.dir)
        except ImportError as e:
            return _fail(f"predict: {e}", EXIT_FAILURE)
        predictor = served.predict
    else:
        run = load_run(a.dir)  # fail on a bad directory before waiting for stdin
        predictor = functools.partial(predict, run)
    texts = a.texts
    if not texts:
        if sys.stdin.isatty():
            print("packrnn predict: reading texts from stdin, one per line (Ctrl-D to end)",
                  file=sys.stderr)
        texts = _stdin_lines()
        if not texts:
            return _fail("predict: expected texts as arguments or lines on stdin, got none",
                         EXIT_USAGE)
    for p in predictor(texts):
        if a.json:
            print(json.dumps(p, ensure_ascii=False))
        elif "tags" in p:  # a tagger: one token<TAB>tag per line, a blank line per sentence
            print("".join(f"{t}\t{g}\n" for t, g in zip(p["tokens"], p["tags"])))
        else:
            print(f"{p['label']}\t{p['probability']:.4f}\t{p['text']}")
    return 0


def _stdin_lines() -> list[str]:
    """Every line of stdin, blank ones included, so that output line i answers input line i.

    Lines end at \\n, \\r\\n or a lone \\r; bytes that are not UTF-8 are an error naming the line.
    """
    from .data.datasets import _BAD_BYTE, _LINE_END, _bad_byte_reason

    stream = getattr(sys.stdin, "buffer", None)  # bytes, to report bad ones ourselves
    if stream is not None:
        text = stream.read().decode("utf-8", errors="surrogateescape")
    else:  # a text stream without bytes underneath (tests, some IDEs)
        text = sys.stdin.read()
    text = text.removeprefix("\ufeff")
    lines = _LINE_END.split(text)
    if lines[-1] == "":  # the last line end closes the last line; it starts no new one
        lines.pop()
    for number, line in enumerate(lines, start=1):
        bad = _BAD_BYTE.search(line)
        if bad:
            raise ValueError(f"stdin:{number}: {_bad_byte_reason(bad.group())}")
    return lines


def _print_tag_scores(r: dict) -> int:
    names = r["labels"]
    width = max(len("macro avg"), *(len(n) for n in names))
    print(f"token accuracy {r['accuracy']:.4f} on {r['count']} tokens, loss {r['loss']:.4f}, "
          f"macro F1 {r['macro_f1']:.4f}"
          + (f" ({r['skipped']} bad sentences skipped)" if r["skipped"] else ""))
    print()
    print(f"{'tag':<{width}}  precision  recall      F1  support")

    def fmt(x, w):
        return f"{'-' if x is None else f'{x:.4f}':>{w}}"

    for i, n in enumerate(names):
        print(f"{n:<{width}}  {fmt(r['precision'][i], 9)}  {fmt(r['recall'][i], 6)}  "
              f"{fmt(r['f1'][i], 6)}  {r['support'][i]:>7}")
    m = r["macro"]
    print(f"{'macro avg':<{width}}  {fmt(m['precision'], 9)}  {fmt(m['recall'], 6)}  "
          f"{fmt(m['f1'], 6)}  {r['count']:>7}")
    return 0


def _print_lm_scores(r: dict) -> int:
    unit = "char" if r["level"] == "char" else "word"
    print(f"loss {r['loss']:.4f} nats per {unit}, perplexity {r['perplexity']:.3f}, "
          f"{r['bits_per_token']:.4f} bits per {unit}, next-{unit} accuracy {r['accuracy']:.4f} "
          f"on {r['count']} {unit}s (<eos> included)"
          + (f" ({r['skipped']} bad rows skipped)" if r["skipped"] else ""))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from .train import generate, load_run

    run = load_run(a.dir)
    for i in range(a.samples):
        seed = None if a.seed is None else a.seed + i
        print(generate(run, a.prefix, a.max_new, temperature=a.temperature, top_k=a.top_k,
                       seed=seed))
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .onnx_export import export_onnx
    from .train import load_run

    run = load_run(a.dir)
    try:
        path = export_onnx(run, a.output)
    except ImportError as e:
        return _fail(f"export: {e}", EXIT_FAILURE)
    c = run.model.config
    print(f"wrote {path} ({'bidirectional ' if c.bidirectional else ''}{c.cell}, "
          f"{c.num_layers} layer(s), pooling {c.pooling}, {len(run.labels)} labels); serve it "
          f"with: packrnn predict {path} \"some text\"")
    return 0


def _cmd_bench(argv: list[str]) -> int:
    try:
        from . import bench
    except ImportError as e:
        return _fail(f"bench: the benchmark module is not available ({e})", EXIT_FAILURE)
    if hasattr(bench, "main"):
        return int(bench.main(argv) or 0)
    if argv:
        return _fail(f"bench: expected no arguments, got {' '.join(argv)}", EXIT_USAGE)
    bench.run_bench()
    return 0


def _cmd_demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return int(demo_main(argv) or 0)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``packrnn`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from .checkpoint import CheckpointError, DiskFullError
    from .rundir import TrainInterrupted
    from .train import TrainError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            return _cmd_bench(argv[1:])
        if argv[:1] == ["demo"]:
            return _cmd_demo(argv[1:])
        parser = build_parser()
        if argv[:1] == ["predict"]:  # texts and options in any order
            args = _subparser(parser, "predict").parse_intermixed_args(argv[1:])
        else:
            args = parser.parse_args(argv)
        if argv[:1] == ["train"]:
            args.given = _given_options(argv)
        return args.func(args)
    except SystemExit as e:  # argparse: --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except TrainInterrupted as e:  # Ctrl-C in training, after saving a checkpoint
        print(f"packrnn: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("packrnn: interrupted" + ("; continue with `packrnn train --resume --output DIR`"
                                        if argv[:1] == ["train"] else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except DiskFullError as e:  # the environment, not the input: exit 1, but one clear line
        if os.environ.get("PACKRNN_DEBUG"):
            raise
        return _fail(str(e), EXIT_FAILURE)
    except (CheckpointError, TrainError, ValueError, TypeError, FileNotFoundError,
            PermissionError, IsADirectoryError, UnicodeDecodeError) as e:
        if os.environ.get("PACKRNN_DEBUG"):
            raise
        return _fail(_one_line(e), EXIT_USAGE)
    except Exception as e:  # a bug or an environment problem: still one line, traceback on demand
        if os.environ.get("PACKRNN_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {_one_line(e)} (set PACKRNN_DEBUG=1 for the traceback)",
                     EXIT_FAILURE)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)) and e.filename:
        text = f"{e.strerror}: {e.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())

"""Small helpers shared by the example scripts (run_clm.py, run_classification.py, run_seq2seq.py).

The examples tokenise text they generate themselves (or a local file) with the two tokenizers here,
so they run without a model hub. The API is deliberately small:

- `parse_example_args(dataclass_types, defaults)`: HfArgumentParser over the script's dataclasses
  and `xtrainer.TrainingArguments`, with script-specific defaults (e.g. a learning rate that trains
  a tiny model from scratch) that the command line still overrides.
- `SimpleTokenizer`: character- or whitespace-level vocabulary built from text, with special
  tokens, `encode`/`decode`, and `save`/`load` as `vocab.json` next to the exported model.
- `finish_example(output_dir, results)`: prints the results and writes `example_results.json`.
- `platform_env_defaults(backend)`: environment defaults a backend needs before its first import.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

RESULTS_FILE = "example_results.json"
VOCAB_FILE = "vocab.json"


def platform_env_defaults(argv: Sequence[str] | None = None) -> None:
    """Sets environment defaults for the backend named on the command line, before jax/torch_xla load.

    torch_xla reads `PJRT_DEVICE` when its runtime starts. A TPU VM sets it (or torch_xla finds the
    TPU); elsewhere we default to the PJRT CPU device so the examples run on a laptop. Values
    already set are kept.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    backend = None
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            backend = argv[i + 1]
        elif arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
    if backend == "torch_xla" and not _tpu_device_files():
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    # Every model is built from a config: nothing should ever wait on a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tpu_device_files() -> bool:
    """Whether this host exposes TPU chips (/dev/accel* on v2-v4, numbered /dev/vfio/* groups on v5+)."""
    vfio = os.listdir("/dev/vfio") if os.path.isdir("/dev/vfio") else []
    return os.path.exists("/dev/accel0") or any(name != "vfio" for name in vfio)


def parse_example_args(dataclass_types: Sequence[type], defaults: dict[str, Any] | None = None,
                       argv: Sequence[str] | None = None) -> tuple:
    """Parses the command line into the given dataclasses plus `xtrainer.TrainingArguments` (last).

    Args:
        dataclass_types: the script's own argument dataclasses (model, data, ...).
        defaults: field defaults to use when the command line does not give them, e.g.
            {"learning_rate": 3e-3, "output_dir": "/tmp/run_clm"}.
        argv: arguments (default sys.argv[1:]); a single `.json` path is read as a config file.

    Returns:
        One instance per dataclass, TrainingArguments last.
    """
    from transformers import HfArgumentParser

    from xtrainer import TrainingArguments

    parser = HfArgumentParser((*dataclass_types, TrainingArguments))
    if defaults:
        parser.set_defaults(**defaults)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


class SimpleTokenizer:
    """A vocabulary over characters (`level="char"`) or whitespace-separated words (`level="word"`).

    Ids 0.. are the special tokens in `specials` order ("[PAD]", "[UNK]", ...), then the symbols by
    decreasing frequency (ties alphabetical, so the vocabulary is deterministic).

    Example:
        >>> tok = SimpleTokenizer.build(["ab ba"], level="char")
        >>> tok.decode(tok.encode("ab"))
        'ab'
    """

    def __init__(self, symbols: Sequence[str], level: str, specials: Sequence[str]):
        if level not in ("char", "word"):
            raise ValueError(f"level must be 'char' or 'word', got {level!r}")
        self.level = level
        self.specials = list(specials)
        self.symbols = list(symbols)
        self.id_of = {s: i for i, s in enumerate(self.symbols)}
        self.unk_id = self.id_of.get("[UNK]")

    @classmethod
    def build(cls, texts: Iterable[str], level: str = "char", max_size: int | None = None,
              specials: Sequence[str] = ("[PAD]", "[UNK]")) -> SimpleTokenizer:
        """Builds the vocabulary from texts; `max_size` caps it (rarer symbols become [UNK])."""
        counts = collections.Counter()
        for text in texts:
            counts.update(text if level == "char" else text.split())
        ranked = sorted((s for s in counts if s not in specials), key=lambda s: (-counts[s], s))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(specials))]
        return cls([*specials, *ranked], level, specials)

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    @property
    def pad_id(self) -> int:
        return self.id_of.get("[PAD]", 0)

    def token_id(self, symbol: str) -> int:
        """The id of one symbol (e.g. a special token such as "[CLS]")."""
        return self.id_of[symbol]

    def encode(self, text: str) -> list[int]:
        """Token ids of text; symbols outside the vocabulary map to [UNK] (KeyError without one)."""
        pieces = text if self.level == "char" else text.split()
        if self.unk_id is None:
            return [self.id_of[p] for p in pieces]
        return [self.id_of.get(p, self.unk_id) for p in pieces]

    def decode(self, ids: Iterable[int], skip_specials: bool = True) -> str:
        """Text of ids (characters joined as they are, words with single spaces)."""
        pieces = [self.symbols[int(i)] for i in ids]
        if skip_specials:
            pieces = [p for p in pieces if p not in self.specials]
        return ("" if self.level == "char" else " ").join(pieces)

    def save(self, directory: str) -> str:
        """Writes vocab.json into directory (next to the exported model); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VOCAB_FILE)
        with open(path, "w") as f:
            json.dump({"level": self.level, "specials": self.specials, "symbols": self.symbols}, f)
        return path

    @classmethod
    def load(cls, directory: str) -> SimpleTokenizer:
        """Reads the vocab.json that `save` wrote."""
        with open(os.path.join(directory, VOCAB_FILE)) as f:
            d = json.load(f)
        return cls(d["symbols"], d["level"], d["specials"])


def perplexity(loss: float) -> float:
    """exp(loss), or inf when that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def finish_example(output_dir: str, results: dict[str, Any], is_main_process: bool = True) -> str:
    """Prints the results, one per line, and writes them to `<output_dir>/example_results.json`.

    Returns the path of the JSON file (written by the main process only).
    """
    path = os.path.join(output_dir, RESULTS_FILE)
    if not is_main_process:
        return path
    scalars = {k: v for k, v in results.items() if not isinstance(v, (list, dict))}  # lists go to the file only
    width = max(map(len, scalars), default=0)
    print("\n***** results *****")
    for key, value in scalars.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"  {key:<{width}} = {shown}")
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"results written to {path}")
    return path


def resolve_model_kind(model_kind: str | None, backend: str) -> str:
    """`--model_kind` or its default for the backend: the Flax reference model on jax, else an HF model.

    Raises:
        SystemExit: the Flax reference model was asked for on a torch backend.
    """
    kind = model_kind or ("reference" if backend in ("jax", "auto") else "hf")
    if kind == "reference" and backend not in ("jax", "auto"):
        raise SystemExit(f"--model_kind reference is a Flax model: it runs on --backend jax, not {backend!r}. "
                         "Use --model_kind hf for the torch backends.")
    return kind

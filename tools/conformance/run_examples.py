"""Run transformers' examples/pytorch scripts with only their imports changed to xtrainer, offline.

The harness makes everything a script would fetch from the hub: a tiny word-level tokenizer (built with
`tokenizers`, saved with PreTrainedTokenizerFast.save_pretrained), tiny randomly initialised models
saved from configs (GPT-2, BERT, T5), data files, and local `evaluate` metric modules (accuracy, mse,
sacrebleu: our own small implementations) that `evaluate.load(name)` finds in the working directory, so
the scripts' metric code runs unchanged. Each script is copied to a temporary folder (never into this
repository), its transformers Trainer-API imports are rewritten to xtrainer's, and the changes are
listed in a comment at its top.

Usage (in a lane venv, from the repository root):
    python tools/conformance/run_examples.py --transformers /path/to/transformers --backend torch \
        --out /tmp/conformance/examples [--scripts run_clm run_mlm run_glue run_translation] [--control]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
EXTRA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "xtrainer-conformance", "extra")
SCRIPTS = {
    "run_clm": "examples/pytorch/language-modeling/run_clm.py",
    "run_mlm": "examples/pytorch/language-modeling/run_mlm.py",
    "run_glue": "examples/pytorch/text-classification/run_glue.py",
    "run_classification": "examples/pytorch/text-classification/run_classification.py",
    "run_translation": "examples/pytorch/translation/run_translation.py",
}
# transformers modules whose Trainer-API names a script imports; a name moves when xtrainer exports it.
API_MODULES = (
    "transformers", "transformers.trainer_utils", "transformers.trainer", "transformers.training_args",
    "transformers.trainer_callback", "transformers.trainer_seq2seq", "transformers.training_args_seq2seq",
)
WORDS = "the a cat dog bird sees eats runs big small red blue house tree river stone fast slow".split()
ROMANIAN = "un o pisica caine pasare vede mananca alearga mare mic rosu albastru casa copac rau piatra repede incet".split()


# ---------------------------------------------------------------------------------------------- assets
def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def build_tokenizer(directory: str, style: str):
    """A word-level fast tokenizer over WORDS (+ ROMANIAN), saved to `directory`. style: gpt2|bert|t5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"gpt2": ["<|endoftext|>", "<unk>"], "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                "t5": ["<pad>", "</s>", "<unk>"]}[style]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ROMANIAN + [".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[-1] if style == "gpt2" else specials[1 if style == "bert" else 2]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        kwargs = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        kwargs = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    else:
        kwargs = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **kwargs)
    fast.save_pretrained(directory)
    return fast


def build_model(directory: str, style: str) -> None:
    """A tiny randomly initialised model of the given style, with its tokenizer, saved to `directory`."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tokenizer = build_tokenizer(directory, style)
    vocab = len(tokenizer)
    if style == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                                 bos_token_id=0, eos_token_id=0))
    elif style == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    else:
        model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                          num_heads=2, pad_token_id=0, eos_token_id=1,
                                                          decoder_start_token_id=0))
    model.save_pretrained(directory)


METRIC_TEMPLATE = '''"""Offline stand-in for the hub metric `{name}` (conformance harness)."""
import datasets
import evaluate
import numpy as np


class Metric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="{name}", citation="", inputs_description="", features={features})

    def _compute(self, predictions, references, **kwargs):
{body}
'''
METRICS = {
    "accuracy": ("datasets.Features({'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')})",
                 "        return {'accuracy': float(np.mean(np.asarray(predictions) == np.asarray(references)))}"),
    "mse": ("datasets.Features({'predictions': datasets.Value('float'), 'references': datasets.Value('float')})",
            "        return {'mse': float(np.mean((np.asarray(predictions) - np.asarray(references)) ** 2))}"),
    # Corpus BLEU over whitespace tokens (1-4 grams, brevity penalty), scaled 0-100 like sacrebleu's "score".
    "sacrebleu": (
        "datasets.Features({'predictions': datasets.Value('string'), "
        "'references': datasets.Sequence(datasets.Value('string'))})",
        "        import collections, math\n"
        "        match, total, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0\n"
        "        for hyp, refs in zip(predictions, references):\n"
        "            h, r = hyp.split(), refs[0].split()\n"
        "            hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)\n"
        "            for n in range(1, 5):\n"
        "                hc = collections.Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))\n"
        "                rc = collections.Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))\n"
        "                match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())\n"
        "                total[n - 1] += max(len(h) - n + 1, 0)\n"
        "        if min(match) == 0:\n"
        "            return {'score': 0.0}\n"
        "        log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4\n"
        "        bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))\n"
        "        return {'score': 100 * bp * math.exp(log_p)}",
    ),
}


def prepare(work: str) -> dict[str, str]:
    """Models, tokenizers, data files and metric modules under `work`. Returns their paths."""
    paths = {}
    for style in ("gpt2", "bert", "t5"):
        paths[style] = os.path.join(work, "models", style)
        build_model(paths[style], style)
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    for split, n, seed in (("train", 64, 0), ("validation", 16, 1)):
        text = sentences(n, seed)
        with open(os.path.join(data, f"{split}.txt"), "w") as f:
            f.write("\n".join(text) + "\n")
        with open(os.path.join(data, f"{split}.csv"), "w") as f:
            f.write("sentence,label\n")
            for s in text:  # label: does the sentence mention an animal
                f.write(f"{s},{int(any(w in s.split() for w in ('cat', 'dog', 'bird')))}\n")
        with open(os.path.join(data, f"{split}.json"), "w") as f:
            for s in text:
                ro = " ".join(ROMANIAN[WORDS.index(w)] for w in s.split())
                f.write(json.dumps({"translation": {"en": s, "ro": ro}}) + "\n")
        paths[f"{split}_dir"] = data
    metrics = os.path.join(work, "run")
    for name, (features, body) in METRICS.items():
        os.makedirs(os.path.join(metrics, name), exist_ok=True)
        with open(os.path.join(metrics, name, f"{name}.py"), "w") as f:
            f.write(METRIC_TEMPLATE.format(name=name, features=features, body=body))
    paths["run"] = metrics
    return paths


# ---------------------------------------------------------------------------------------------- scripts
def rewrite_imports(source: str) -> tuple[str, list[str]]:
    """`source` with transformers' Trainer-API imports taken from xtrainer instead. Returns (text, changes)."""
    sys.path.insert(0, REPO)
    import xtrainer

    lines = source.splitlines(keepends=True)
    edits, changes = [], []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.ImportFrom) and node.module in API_MODULES and node.level == 0):
            continue
        moved = [a for a in node.names if hasattr(xtrainer, a.name)]
        if not moved:
            continue
        kept = [a for a in node.names if a not in moved]
        indent = lines[node.lineno - 1][: node.col_offset]
        fmt = lambda a: a.name + (f" as {a.asname}" if a.asname else "")  # noqa: E731
        new = ""
        if kept:
            new += f"{indent}from {node.module} import ({', '.join(fmt(a) for a in kept)})\n"
        new += f"{indent}from xtrainer import {', '.join(fmt(a) for a in moved)}\n"
        edits.append((node.lineno - 1, node.end_lineno, new))
        changes.append(f"from {node.module}: {', '.join(a.name for a in moved)} -> xtrainer")
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = [new]
    return "".join(lines), changes


# Diagnostic only (--probe): stand-ins for TrainingArguments attributes xtrainer lacks today, so a run
# shows the failure after them. A probe run is never a conformance pass.
PROBE = """
# PROBE (diagnostic, not a conformance pass): stand-ins for TrainingArguments attributes xtrainer lacks.
import contextlib as _probe_contextlib
import xtrainer.training_args as _probe_args
for _name, _value in {"device": property(lambda self: __import__("torch").device("cpu")), "n_gpu": 0,
                      "local_process_index": 0, "process_index": 0, "world_size": 1,
                      "parallel_mode": __import__("transformers").training_args.ParallelMode.NOT_PARALLEL, "should_log": True,
                      "main_process_first": lambda self, local=True, desc="": _probe_contextlib.nullcontext()}.items():
    if not hasattr(_probe_args.TrainingArguments, _name):
        print(f"PROBE: stand-in for TrainingArguments.{_name}")
        setattr(_probe_args.TrainingArguments, _name, _value)
"""


def add_probe(source: str) -> str:
    """`source` with PROBE inserted after its last top-level import."""
    tree = ast.parse(source)
    last = max(n.end_lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
    lines = source.splitlines(keepends=True)
    return "".join(lines[:last]) + PROBE + "".join(lines[last:])


def script_args(name: str, paths: dict, out_dir: str) -> list[str]:
    data = paths["train_dir"]
    common = ["--output_dir", out_dir, "--do_train", "--do_eval", "--per_device_train_batch_size", "4",
              "--per_device_eval_batch_size", "4", "--max_steps", "8", "--logging_steps", "2", "--save_steps", "4",
              "--report_to", "none", "--seed", "0"]
    if name == "run_clm":
        return common + ["--model_name_or_path", paths["gpt2"], "--train_file", f"{data}/train.txt",
                         "--validation_file", f"{data}/validation.txt", "--block_size", "16"]
    if name == "run_mlm":
        return common + ["--model_name_or_path", paths["bert"], "--train_file", f"{data}/train.txt",
                         "--validation_file", f"{data}/validation.txt", "--max_seq_length", "16", "--line_by_line"]
    if name in ("run_glue", "run_classification"):
        extra = ["--text_column_names", "sentence", "--label_column_name", "label", "--metric_name", "accuracy"] \
            if name == "run_classification" else []
        return common + extra + ["--model_name_or_path", paths["bert"], "--train_file", f"{data}/train.csv",
                                 "--validation_file", f"{data}/validation.csv", "--max_seq_length", "16"]
    if name == "run_translation":
        return common + ["--model_name_or_path", paths["t5"], "--train_file", f"{data}/train.json",
                         "--validation_file", f"{data}/validation.json", "--source_lang", "en", "--target_lang", "ro",
                         "--max_source_length", "16", "--max_target_length", "16", "--predict_with_generate",
                         "--generation_max_length", "16"]
    raise ValueError(name)


def read_script(transformers: str, rel: str) -> str:
    if os.path.isfile(os.path.join(transformers, rel)):
        with open(os.path.join(transformers, rel)) as f:
            return f.read()
    return subprocess.run(["git", "-C", transformers, "show", f"HEAD:{rel}"], capture_output=True, text=True,
                          check=True).stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers", required=True, help="transformers checkout or bare git directory")
    parser.add_argument("--backend", default="torch", help="xtrainer backend (--backend of the scripts)")
    parser.add_argument("--control", action="store_true", help="run the scripts unchanged on transformers")
    parser.add_argument("--scripts", nargs="*", default=["run_clm", "run_mlm", "run_glue", "run_translation"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--probe", action="store_true",
                        help="diagnostic: stand in for TrainingArguments attributes xtrainer lacks (see PROBE)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (scripts, models, data)")
    args = parser.parse_args(argv)

    label = "control" if args.control else f"xtrainer-{args.backend}" + ("-probe" if args.probe else "")
    out = os.path.abspath(os.path.join(args.out, label))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="xtrainer-examples-")
    results = {}
    try:
        paths = prepare(work)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([REPO, EXTRA_DIR, os.environ.get("PYTHONPATH", "")]))
        for name in args.scripts:
            source = read_script(args.transformers, SCRIPTS[name])
            changes = []
            if not args.control:
                source, changes = rewrite_imports(source)
                if args.probe:
                    source = add_probe(source)
                    changes.append("PROBE stand-ins for missing TrainingArguments attributes (diagnostic run)")
            header = "# Conformance copy. Changes from transformers' script:\n" + "".join(
                f"#  - {c}\n" for c in changes or ["none (control run)"])
            script = os.path.join(work, f"{name}.py")
            with open(script, "w") as f:
                f.write(header + source)
            cmd = [sys.executable, script, *script_args(name, paths, os.path.join(work, "out", name))]
            if not args.control:
                cmd += ["--backend", args.backend]
            start = time.monotonic()
            with open(os.path.join(out, f"{name}.log"), "w") as log:
                log.write(header + "# command: " + " ".join(cmd) + "\n")
                log.flush()
                try:
                    rc = subprocess.run(cmd, cwd=paths["run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=args.timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            results[name] = {"exit_code": rc, "seconds": round(time.monotonic() - start, 1), "changes": changes}
            print(f"[{label}] {name}: exit {rc} in {results[name]['seconds']} s", flush=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

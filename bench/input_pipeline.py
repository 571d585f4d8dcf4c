"""The input pipeline, side by side in one run (main lane, CPU): throughput, training behind a slow
collator, and resume cost.

A. Loader throughput (tokens/s) with 0, 1 and 2 workers: xtrainer's loader (what the Trainer builds)
   against torch's DataLoader set up as transformers' Trainer sets it up (RandomSampler, batch 32,
   the collator as collate_fn), on the same dataset and collator:
     mlm  - a datasets.Dataset of 512-token rows, transformers' DataCollatorForLanguageModeling;
     text - raw text, tokenized on the fly by the collator (a fast tokenizer built in code), then MLM.
   With --alternatives (default: when installed) Grain (MapDataset + mp_prefetch) and torchdata's
   StatefulDataLoader run the same batches. Each window takes a fresh iterator and times the batches
   after its first (time to first batch is reported apart); the contenders' windows are adjacent,
   their order alternating, and the ratio to torch is taken per repeat (paired), then the median.

B. Training behind a collator that costs ~1.5x the step: the tiny Llama on `jax` and HF GPT-2 on
   `torch`. Per model: the step time fed pre-collated batches, then with the slow collator and 0
   and 2 workers (median seconds per step after warm-up; ratio to pre-collated). The collator's cost
   is either CPU work (`cpu`: a spin, like tokenization or augmentation) or waiting (`wait`: a
   sleep, like reading from remote storage). The step runs on one thread (torch.set_num_threads(1),
   XLA's CPU client single-threaded) so one core is left to the workers; on 2 cores, two CPU-bound
   workers still compete with the step.

C. Resume cost at batch 10 and at batch 10,000 of a 400,000-example epoch: time from loading a
   saved position to the first batch, for a map-style dataset, a datasets IterableDataset (resumed
   from its own state) and a plain generator (which can only be resumed by reading and dropping).

    PYTHONPATH=. $(scripts/ensure_venv.sh main)/bin/python bench/input_pipeline.py [--parts A,B,C]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Part B's JAX step on one CPU thread (set before JAX starts); parts A and C do not use JAX.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

ROWS, SEQ, BATCH, VOCAB = 2048, 512, 32, 1000


# ---------------------------------------------------------------------------------------------
# Data and collators shared by the contenders (module level: picklable for spawned workers)
# ---------------------------------------------------------------------------------------------


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, "[CLS]": 3, "[SEP]": 4}
    for i in range(VOCAB):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]")


class TextMLMCollator:
    """Tokenizes raw text (padded/truncated to SEQ), then masks it like DataCollatorForLanguageModeling."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer = tokenizer
        self.mlm = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    def __call__(self, examples):
        encoded = self.tokenizer([e["text"] for e in examples], truncation=True, max_length=SEQ, padding="max_length")
        return self.mlm([{"input_ids": ids} for ids in encoded["input_ids"]])


def datasets_for_a():
    import datasets

    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB + 5, size=(ROWS, SEQ))
    tokens = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    words = np.array([f"w{i}" for i in range(VOCAB)])
    text = datasets.Dataset.from_dict({"text": [" ".join(words[row - 5]) for row in ids]})
    return {"mlm": tokens, "text": text}


# ---------------------------------------------------------------------------------------------
# A. Loader throughput
# ---------------------------------------------------------------------------------------------


def _order(seed=0):
    return np.random.default_rng(seed).permutation(ROWS)


def xtrainer_iter(dataset, collate, workers):
    from xtrainer import data
    from xtrainer.data_workers import WorkerOptions
    from xtrainer.loaders import DatasetLoader

    loader = DatasetLoader(dataset, data.BatchPlan(BATCH), collate, order_fn=lambda epoch: _order(),
                           workers=WorkerOptions(num_workers=workers), seed=0)
    return loader.epoch(0), loader.close


def torch_iter(dataset, collate, workers):
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=collate, num_workers=workers,
                                         sampler=torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    return iter(loader), lambda: None


def stateful_iter(dataset, collate, workers):
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(dataset, batch_size=BATCH, collate_fn=collate, num_workers=workers,
                                sampler=torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    return iter(loader), lambda: None


class _GrainBatch:
    def __init__(self, dataset, collate):
        self.dataset, self.collate = dataset, collate

    def __call__(self, indices):
        batch = self.collate(self.dataset.__getitems__([int(i) for i in indices]))
        return {k: np.asarray(v) for k, v in batch.items()}


def grain_iter(dataset, collate, workers):
    import grain

    order = _order()
    batches = [order[i:i + BATCH] for i in range(0, ROWS, BATCH)]
    pipeline = grain.MapDataset.source(batches).map(_GrainBatch(dataset, collate)).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers:
        pipeline = pipeline.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    iterator = iter(pipeline)
    return iterator, getattr(iterator, "close", lambda: None)


def measure_loader(make, dataset, collate, workers, batches):
    iterator, close = make(dataset, collate, workers)
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches - 1):
        next(iterator)
    tps = (batches - 1) * BATCH * SEQ / (time.perf_counter() - start)
    close()
    del iterator
    return first, tps


def part_a(repeats, batches, alternatives, alt_repeats):
    datasets_ = datasets_for_a()
    tokenizer = make_tokenizer()
    from transformers import DataCollatorForLanguageModeling

    collators = {"mlm": DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15), "text": TextMLMCollator(tokenizer)}
    contenders = {"xtrainer": xtrainer_iter, "torch DataLoader": torch_iter}
    if alternatives:
        for name, module, fn in (("torchdata StatefulDataLoader", "torchdata", stateful_iter), ("grain", "grain", grain_iter)):
            try:
                __import__(module)
                contenders[name] = fn
            except ImportError:
                print(f"A: {name} not installed, left out")
        if "grain" in contenders:
            from absl import flags

            flags.FLAGS.mark_as_parsed()
    for name, make in contenders.items():  # imports and first-call costs, untimed
        measure_loader(make, datasets_["mlm"], collators["mlm"], 0, 2)
    results: dict = {}
    # Adjacent windows of the contenders, order alternating, so each repeat's ratio compares runs made
    # under the same load (the machine is shared); the alternatives only in the first alt_repeats.
    for task in ("mlm", "text"):
        for workers in (0, 1, 2):
            for rep in range(repeats):
                names = [n for n in contenders if rep < alt_repeats or n in ("xtrainer", "torch DataLoader")]
                for name in (names if rep % 2 == 0 else names[::-1]):
                    first, tps = measure_loader(contenders[name], datasets_[task], collators[task], workers, batches)
                    results.setdefault((task, workers, name), []).append((rep, first, tps))
                    print(f"A {task} w{workers} rep {rep} {name}: {tps / 1e6:.2f} M tokens/s, first batch {first:.2f} s", flush=True)
    table = []
    for task in ("mlm", "text"):
        for workers in (0, 1, 2):
            torch_by_rep = {rep: t for rep, _, t in results[(task, workers, "torch DataLoader")]}
            for name in contenders:
                runs = results[(task, workers, name)]
                ratios = [t / torch_by_rep[rep] for rep, _, t in runs]
                table.append({"data": task, "workers": workers, "loader": name, "repeats": len(runs),
                              "Mtokens_per_s_median": round(statistics.median(t for _, _, t in runs) / 1e6, 3),
                              "paired_ratio_to_torch_median": round(statistics.median(ratios), 3),
                              "paired_ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
                              "first_batch_s_median": round(statistics.median(f for _, f, _ in runs), 3)})
    return table


# ---------------------------------------------------------------------------------------------
# B. Training behind a slow collator
# ---------------------------------------------------------------------------------------------


class SlowCollator:
    """The default collator plus `cost_s` of CPU work (spin) or waiting (sleep)."""

    def __init__(self, cost_s: float, mode: str):
        self.cost_s, self.mode = cost_s, mode

    def __call__(self, features):
        from xtrainer.data import default_data_collator

        end = time.perf_counter() + self.cost_s
        if self.mode == "wait":
            time.sleep(self.cost_s)
        else:
            while time.perf_counter() < end:
                pass
        return default_data_collator(features)


B_CFG = dict(vocab=512, hidden=128, inter=256, layers=2, heads=4, seq=128, batch=8)


def b_rows(n):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, B_CFG["vocab"], size=(n, B_CFG["seq"]))
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def b_model(backend):
    if backend == "jax":
        from flax import nnx

        from xtrainer.models import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=B_CFG["vocab"], hidden_size=B_CFG["hidden"], intermediate_size=B_CFG["inter"],
                          num_hidden_layers=B_CFG["layers"], num_attention_heads=B_CFG["heads"],
                          num_key_value_heads=B_CFG["heads"], max_position_embeddings=B_CFG["seq"])
        return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=B_CFG["layers"], n_embd=B_CFG["hidden"], n_head=B_CFG["heads"], vocab_size=B_CFG["vocab"],
        n_positions=B_CFG["seq"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def step_time(backend, collator, workers, steps, warmup=5):
    """Median seconds per optimizer step after warm-up. A log every `warmup` steps reads the loss back
    (a device sync), so the time between two logs covers the steps' compute, also on asynchronous JAX."""
    import xtrainer

    marks = []

    class Clock(xtrainer.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}):
                marks.append((state.global_step, time.perf_counter()))

    steps = max(warmup, steps - steps % warmup)
    args = xtrainer.TrainingArguments(
        tempfile.mkdtemp(), backend=backend, per_device_train_batch_size=B_CFG["batch"], max_steps=steps + warmup,
        logging_steps=warmup, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=workers, train_sampling_strategy="sequential", use_cpu=backend == "torch")
    trainer = xtrainer.Trainer(model=b_model(backend), args=args, train_dataset=b_rows(B_CFG["batch"] * (steps + warmup)),
                               data_collator=collator, callbacks=[Clock()])
    trainer.train()
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks, marks[1:])]
    return float(np.median(per_step))


def part_b(steps, modes):
    import torch

    torch.set_num_threads(1)
    table = []
    for backend in ("jax", "torch"):
        base = step_time(backend, None, 0, steps)
        cost = 1.5 * base
        row = {"backend": backend, "model": "tiny Llama (xtrainer.models)" if backend == "jax" else "HF GPT-2",
               "precollated_step_ms": round(base * 1e3, 2), "collator_cost_ms": round(cost * 1e3, 2)}
        for mode in modes:
            for workers in (0, 2):
                t = step_time(backend, SlowCollator(cost, mode), workers, steps)
                row[f"{mode}_w{workers}_step_ms"] = round(t * 1e3, 2)
                row[f"{mode}_w{workers}_ratio"] = round(t / base, 3)
                print(f"B {backend} {mode} w{workers}: {t * 1e3:.1f} ms/step ({t / base:.2f}x pre-collated {base * 1e3:.1f} ms)", flush=True)
        table.append(row)
    return table


# ---------------------------------------------------------------------------------------------
# C. Resume cost
# ---------------------------------------------------------------------------------------------


def part_c():
    import datasets

    from xtrainer import data
    from xtrainer.loaders import DatasetLoader

    n, seq, batch = 400_000, 16, 32
    table = datasets.Dataset.from_dict({"input_ids": np.random.default_rng(0).integers(0, 1000, size=(n, seq)).tolist()})

    def generator():
        for i in range(n):
            yield {"input_ids": [i % 1000] * seq}

    makers = {
        "map-style (datasets.Dataset)": lambda: DatasetLoader(table, data.BatchPlan(batch), data.default_data_collator,
                                                              order_fn=lambda e: data.epoch_order(n, "random", seed=0, epoch=e)),
        "stream with state (IterableDataset)": lambda: DatasetLoader(table.to_iterable_dataset(num_shards=64),
                                                                     data.BatchPlan(batch), data.default_data_collator),
        "plain generator (read and drop)": lambda: DatasetLoader(generator(), data.BatchPlan(batch), data.default_data_collator),
    }
    out = []
    for name, make in makers.items():
        row = {"dataset": name}
        for position in (10, 10_000):
            loader = make()
            batches = loader.epoch(0)
            for _ in range(position + 2):
                next(batches)
            state = loader.state_dict(0, position)
            state = json.loads(json.dumps(state))  # as written to and read from the checkpoint
            resumed = make()
            start = time.perf_counter()
            first = next(resumed.epoch(*resumed.load_state_dict(state)))
            row[f"resume_at_{position}_s"] = round(time.perf_counter() - start, 4)
            assert first["input_ids"].shape == (batch, seq)
        print(f"C {name}: {row}", flush=True)
        out.append(row)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="A,B,C")
    parser.add_argument("--repeats", type=int, default=6, help="part A windows per contender")
    parser.add_argument("--alt-repeats", type=int, default=2, help="part A windows of Grain / StatefulDataLoader")
    parser.add_argument("--batches", type=int, default=16, help="batches per window in part A")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run in part B")
    parser.add_argument("--modes", default="cpu,wait", help="part B collator costs: cpu, wait")
    parser.add_argument("--alternatives", choices=["auto", "no"], default="auto")
    parser.add_argument("--json", help="write the figures here")
    opts = parser.parse_args()
    parts = opts.parts.split(",")
    results = {"command": " ".join(sys.argv), "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    if "A" in parts:
        results["A"] = part_a(opts.repeats, opts.batches, opts.alternatives == "auto", opts.alt_repeats)
    if "B" in parts:
        results["B"] = part_b(opts.steps, opts.modes.split(","))
    if "C" in parts:
        results["C"] = part_c()
    results["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

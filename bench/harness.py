"""Side-by-side training benchmark: xtrainer against transformers' Trainer and bare loops (CPU).

    make bench                                   # main-lane venv; XLA-lane contenders as subprocesses
    PYTHONPATH=. <main-lane python> bench/harness.py [--repeats 2] [--configs tiny,small] [--only a,d,g]

Contenders, on the same Llama config, data, seed and batch, each run in its own subprocess,
alternating (a, b, c, ... then again), median over repeats:

  a  transformers.Trainer on transformers' LlamaForCausalLM (use_cpu, sequential sampling)
  b  xtrainer backend="torch" on the same HF model
  c  a bare torch loop (fused AdamW as in a and b, same lr, same batches, grad clip 1.0)
  d  xtrainer backend="jax" on xtrainer.models.LlamaForCausalLM with the HF weights (load_hf_llama)
  e  xtrainer backend="jax" on the HF torch model via torchax            (XLA lane venv)
  f  xtrainer backend="torch_xla", PJRT_DEVICE=CPU CPU_NUM_DEVICES=1       (XLA lane venv; information only)
  g  a bare loop over the JAX backend's own compiled step (same state, same windows, pre-sharded):
     front overhead of xtrainer's loop = time(d) / time(g) - 1
  h  (tiny only, once) d and g again, inside one process in the order d g g d: the front overhead
     without the process-to-process noise of this VM; the overhead target is judged on it

Steady state: after W warm-up steps, two consecutive windows of S steps are timed (asynchronous
backends drained at each boundary; the last window ends after a final host read of the loss) and
the faster window is the run's figure (f, information only, runs in the first repeat only). Time
to first step = from the call to train() (or the loop start) to the end of step 1 (for async
backends: its dispatch, after compile).
Peak RSS is the child's ru_maxrss. MFU = model FLOP/s / this CPU's float32 matmul peak measured in
the same run, with FLOPs/token = 6*N + 12*layers*hidden*seq (MaxText convention, N = all params).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = {
    "tiny": dict(layers=2, hidden=128, heads=4, inter=256, vocab=1024, batch=8, seq=64, warmup=3, steps=40),
    "small": dict(layers=4, hidden=256, heads=4, inter=512, vocab=2048, batch=8, seq=128, warmup=2, steps=6),
}
LR = 5e-5
# Each run times WINDOWS consecutive windows of cfg["steps"] steps and keeps the fastest: load from
# other tenants of this shared machine only ever adds time, and a second window costs far less than
# another process (imports, model build, compile).
WINDOWS = 2
ONCE = {"f"}  # information-only contenders: one run per config keeps the whole bench under 10 minutes
# h is not a contender: it measures the front's overhead (d vs g) inside one process, on the configs
# the issue sets that target for.
IN_PROCESS_OVERHEAD_CONFIGS = {"tiny"}
SEED = 0

CONTENDERS = {
    "a": ("HF Trainer (torch)", "main"),
    "b": ("xtrainer torch", "main"),
    "c": ("bare torch loop", "main"),
    "d": ("xtrainer jax (Flax ref)", "main"),
    "g": ("bare jit of xtrainer step", "main"),
    "e": ("xtrainer jax via torchax", "xla"),
    "f": ("xtrainer torch_xla (info)", "xla"),
}

TARGETS = [  # (label, contender, config, minimum ratio vs a)
    ("JAX reference >= 2.0x HF Trainer (tiny)", "d", "tiny", 2.0),
    ("JAX reference >= 1.3x HF Trainer (small)", "d", "small", 1.3),
    ("torchax >= 1.8x HF Trainer (tiny)", "e", "tiny", 1.8),
    ("torch backend >= 1.0x HF Trainer (tiny)", "b", "tiny", 1.0),
    ("torch backend >= 1.0x HF Trainer (small)", "b", "small", 1.0),
]
OVERHEAD_TARGET = 0.05


# ----------------------------------------------------------------------------------------- child


def total_steps(cfg):
    return cfg["warmup"] + WINDOWS * cfg["steps"]


def is_window_start(step, cfg):
    """After optimizer step `step`, does a timed window begin? (the last warm-up step, then every cfg["steps"])"""
    return step >= cfg["warmup"] and (step - cfg["warmup"]) % cfg["steps"] == 0 and step < total_steps(cfg)


def hf_config(cfg):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        max_position_embeddings=cfg["seq"], tie_word_embeddings=False,
    )


def hf_model(cfg):
    import torch
    import transformers

    torch.manual_seed(SEED)
    return transformers.LlamaForCausalLM(hf_config(cfg))


def rows(cfg):
    import numpy as np

    n = cfg["batch"] * total_steps(cfg)
    rng = np.random.default_rng(SEED)
    out = []
    for start in rng.integers(0, cfg["vocab"], size=n):
        ids = [int(x) for x in (start + np.arange(cfg["seq"])) % cfg["vocab"]]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def run_trainer(kind, cfg):
    """a, b, d, e, f: a Trainer with a clock callback. Returns (t_train_start, marks)."""
    total = total_steps(cfg)
    marks = {"bounds": []}
    common = dict(per_device_train_batch_size=cfg["batch"], max_steps=total, logging_steps=total, learning_rate=LR,
                  save_strategy="no", report_to=[], disable_tqdm=True, train_sampling_strategy="sequential",
                  seed=SEED)
    if kind == "a":
        import transformers as lib

        model = hf_model(cfg)
        args = lib.TrainingArguments(tempfile.mkdtemp(), use_cpu=True, **common)
    else:
        import xtrainer as lib

        backend = {"b": "torch", "d": "jax", "e": "jax", "f": "torch_xla"}[kind]
        model = hf_model(cfg)
        if kind == "d":
            from xtrainer.models import load_hf_llama

            model = load_hf_llama(model.state_dict(), model.config)
        args = lib.TrainingArguments(tempfile.mkdtemp(), backend=backend, **common)

    def drain():  # async backends: let the dispatched step finish before a mark is taken
        if kind in ("d", "e"):
            import jax

            jax.block_until_ready(jax.live_arrays())
        elif kind == "f":
            try:
                import torch_xla.core.xla_model as xm

                xm.wait_device_ops()
            except Exception:  # noqa: BLE001 - information-only contender
                pass

    class Clock(lib.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                drain()
                marks["first"] = time.perf_counter()
            if is_window_start(state.global_step, cfg):
                drain()
                marks["bounds"].append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            marks["end"] = time.perf_counter()

    trainer = lib.Trainer(model=model, args=args, train_dataset=rows(cfg), callbacks=[Clock()])
    t0 = time.perf_counter()
    out = trainer.train()  # the final log reads the loss back: `end` follows the last step's completion
    marks["end"] = min(marks.get("end", time.perf_counter()), time.perf_counter())
    return t0, marks, float(out.training_loss)


def run_bare_torch(cfg):
    import torch

    model = hf_model(cfg)
    model.train()
    # fused: the AdamW implementation transformers' Trainer (adamw_torch_fused) and xtrainer's torch backend use
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    data = rows(cfg)
    b = cfg["batch"]
    batches = [{k: torch.tensor([r[k] for r in data[i:i + b]]) for k in ("input_ids", "labels")}
               for i in range(0, len(data), b)]
    marks = {"bounds": []}
    t0 = time.perf_counter()
    for step, batch in enumerate(batches, 1):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1:
            marks["first"] = time.perf_counter()
        if is_window_start(step, cfg):
            marks["bounds"].append(time.perf_counter())
    last = float(loss.item())
    marks["end"] = time.perf_counter()
    return t0, marks, last


def run_bare_jit(cfg):
    """g: xtrainer's own compiled JAX step, looped bare over pre-sharded windows."""
    import jax
    import numpy as np

    import xtrainer
    from xtrainer.models import load_hf_llama

    total = total_steps(cfg)
    torch_model = hf_model(cfg)
    model = load_hf_llama(torch_model.state_dict(), torch_model.config)
    args = xtrainer.TrainingArguments(tempfile.mkdtemp(), backend="jax", per_device_train_batch_size=cfg["batch"],
                                      max_steps=total, logging_steps=total, learning_rate=LR, save_strategy="no",
                                      report_to=[], disable_tqdm=True, train_sampling_strategy="sequential", seed=SEED)
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=rows(cfg))
    backend = trainer.backend
    inputs = placed_step_inputs(backend, rows(cfg), cfg["batch"])
    jax.block_until_ready([window[0] for window, _ in inputs])
    marks = {"bounds": []}
    t0 = time.perf_counter()
    state = fresh_train_state(backend, total)
    compiled = compile_bare_step(backend, state, inputs)
    for step, ((arrays, mask, _), num_items) in enumerate(inputs, 1):
        state, metrics = compiled(state, arrays, mask, num_items)
        if step == 1:
            jax.block_until_ready(metrics["loss"])
            marks["first"] = time.perf_counter()
        if is_window_start(step, cfg):
            jax.block_until_ready(metrics["loss"])
            marks["bounds"].append(time.perf_counter())
    last = float(np.asarray(jax.device_get(metrics["loss"])).mean())  # final host read
    marks["end"] = time.perf_counter()
    return t0, marks, last


def placed_step_inputs(backend, data, batch):
    """Each step's (window, label-token count), placed on the device ahead of time the way the JAX
    backend's train_step places them: the inputs of a bare loop over its compiled step."""
    import numpy as np

    from xtrainer.data import count_label_items

    _, shifts = backend.counts_label_items()
    host = [{k: np.asarray([r[k] for r in data[i:i + batch]], dtype=np.int64) for k in ("input_ids", "labels")}
            for i in range(0, len(data), batch)]
    return [(backend.shard_window([b]), backend._replicate(np.float32(count_label_items([b], shifts)))) for b in host]


def fresh_train_state(backend, num_steps):
    """The backend's train state for a run of num_steps with the default optimizer and schedule (what
    Trainer.train() builds through create_optimizer / create_scheduler)."""
    optimizer = backend.create_optimizer(backend.optimizer_target())
    return backend.init_state(num_steps, optimizer, backend.create_scheduler(num_steps, optimizer))


def compile_bare_step(backend, state, inputs):
    """The JAX backend's compiled train step for these inputs, as backend.train_step compiles it."""
    (arrays, mask, _), num_items = inputs[0]
    return backend._compile_train_step(state, arrays, mask, num_items, True)


def steady_seconds(marks):
    bounds = marks["bounds"] + [marks["end"]]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def front_overhead_in_process(cfg):
    """h: the Trainer (d) and the bare loop over its compiled step (g) in one process, order d g g d.

    Separate processes on this VM differ by more than the front costs; in one process both loops
    share the runtime, the memory state and the time, and the ABBA order cancels a linear drift.
    """
    import jax

    # The four loops compile the same step: a compilation cache makes the last three cheap.
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    seconds = {"d": [], "g": []}
    for kind in ("d", "g", "g", "d"):
        _, marks, _ = run_trainer("d", cfg) if kind == "d" else run_bare_jit(cfg)
        seconds[kind].append(min(steady_seconds(marks)))
    return [d / g - 1 for d, g in zip(seconds["d"], seconds["g"])]


def child(kind, cfg_name):
    cfg = CONFIGS[cfg_name]
    if kind == "h":
        print("RESULT", json.dumps({"overheads": front_overhead_in_process(cfg)}))
        return
    if kind == "c":
        t0, marks, loss = run_bare_torch(cfg)
    elif kind == "g":
        t0, marks, loss = run_bare_jit(cfg)
    else:
        t0, marks, loss = run_trainer(kind, cfg)
    windows = steady_seconds(marks)
    steady = min(windows)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    print("RESULT", json.dumps({"steady_s": steady, "windows_s": windows, "steps": cfg["steps"], "first_s": marks["first"] - t0,
                                "rss_mb": rss_mb, "loss": loss}))


# ---------------------------------------------------------------------------------------- parent


def param_count(cfg):
    h, i, v, L = cfg["hidden"], cfg["inter"], cfg["vocab"], cfg["layers"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q,k,v,o (no GQA here), gate/up/down, two RMSNorms
    return 2 * v * h + L * per_layer + h  # embeddings + untied lm_head + final norm


def flops_per_token(cfg):
    return 6 * param_count(cfg) + 12 * cfg["layers"] * cfg["hidden"] * cfg["seq"]


def matmul_peak(seconds=2.0, n=2048):
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def lane_python(lane):
    if lane == "main":
        return sys.executable
    env_py = os.environ.get("XTRAINER_XLA_PYTHON")
    if env_py:
        return env_py
    out = subprocess.run([os.path.join(ROOT, "scripts", "ensure_venv.sh"), lane], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1000:])
    return os.path.join(out.stdout.strip().splitlines()[-1], "bin", "python")


def run_child(python, kind, cfg_name, timeout):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)  # one CPU device for JAX
    if kind == "f":
        env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1")
    try:
        out = subprocess.run([python, os.path.abspath(__file__), "--child", kind, "--configs", cfg_name],
                             capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout}s"
    if out.returncode != 0 or "RESULT" not in out.stdout:
        return None, (out.stderr or out.stdout)[-1500:]
    return json.loads(out.stdout.split("RESULT", 1)[1].strip().splitlines()[0]), None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


NOTES_HEADING = "## Notes"


def kept_notes(path):
    """The hand-written "## Notes" section of an earlier results file (analysis that outlives one run)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return []
    start = text.find("\n" + NOTES_HEADING)
    return ["", text[start + 1:].rstrip()] if start >= 0 else []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="contender letters, e.g. a,d,g")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per child run")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        child(cli.child, cli.configs)
        return

    wall0 = time.perf_counter()
    kinds = [k for k in CONTENDERS if k in cli.only.split(",")]
    cfg_names = cli.configs.split(",")
    pythons = {}
    for lane in sorted({CONTENDERS[k][1] for k in kinds}):
        try:
            pythons[lane] = lane_python(lane)
        except Exception as exc:  # noqa: BLE001 - report and go on without that lane
            print(f"[bench] no {lane} lane: {exc}")
    peak = matmul_peak()
    print(f"[bench] float32 matmul peak (numpy 2048x2048, this CPU): {peak / 1e9:.1f} GFLOP/s")

    runs = {(c, k): [] for c in cfg_names for k in kinds}
    errors = {}
    in_process = {}
    for cfg_name in cfg_names:
        for rep in range(cli.repeats):
            # Alternating, each repeat in the opposite order to the last, so no contender always
            # follows the same neighbour.
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                if kind in ONCE and rep > 0:
                    continue
                lane = CONTENDERS[kind][1]
                if lane not in pythons:
                    errors[(cfg_name, kind)] = f"{lane} lane unavailable"
                    continue
                t = time.perf_counter()
                res, err = run_child(pythons[lane], kind, cfg_name, cli.timeout)
                took = time.perf_counter() - t
                if err:
                    errors[(cfg_name, kind)] = err
                    print(f"[bench] {cfg_name} {kind} ({CONTENDERS[kind][0]}) run {rep + 1} FAILED ({took:.0f}s):\n{err}")
                else:
                    runs[(cfg_name, kind)].append(res)
                    print(f"[bench] {cfg_name} {kind} run {rep + 1}: {res['steady_s'] / res['steps'] * 1e3:.1f} ms/step "
                          f"(process {took:.0f}s)")
        if cfg_name in IN_PROCESS_OVERHEAD_CONFIGS and {"d", "g"} <= set(kinds):
            res, err = run_child(pythons["main"], "h", cfg_name, cli.timeout)
            if err:
                errors[(cfg_name, "h")] = err
                print(f"[bench] {cfg_name} front overhead in one process FAILED:\n{err}")
            else:
                in_process[cfg_name] = res["overheads"]
                print(f"[bench] {cfg_name} front overhead in one process (d g g d): "
                      f"{', '.join(f'{x * 100:+.1f}%' for x in res['overheads'])}")

    table = {}
    for cfg_name in cfg_names:
        cfg = CONFIGS[cfg_name]
        tokens = cfg["batch"] * cfg["seq"]
        for kind in kinds:
            rs = runs[(cfg_name, kind)]
            if not rs:
                continue
            step_s = statistics.median(r["steady_s"] / r["steps"] for r in rs)
            table[(cfg_name, kind)] = dict(
                step_ms=step_s * 1e3, steps_s=1 / step_s, tok_s=tokens / step_s,
                first_s=statistics.median(r["first_s"] for r in rs), rss=max(r["rss_mb"] for r in rs),
                mfu=flops_per_token(cfg) * tokens / step_s / peak, n=len(rs), loss=rs[-1]["loss"])
        base = table.get((cfg_name, "a"))
        for kind in kinds:
            row = table.get((cfg_name, kind))
            if row:
                row["ratio"] = base["step_ms"] / row["step_ms"] if base else None

    lines = []
    for cfg_name in cfg_names:
        cfg = CONFIGS[cfg_name]
        lines.append(f"\n### {cfg_name}: {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, "
                     f"intermediate {cfg['inter']}, vocab {cfg['vocab']}, batch {cfg['batch']} x seq {cfg['seq']}; "
                     f"{cfg['warmup']} warm-up steps, then the faster of {WINDOWS} timed windows of {cfg['steps']} steps; N = {param_count(cfg):,} params, "
                     f"{flops_per_token(cfg) / 1e6:.2f} MFLOP/token\n")
        lines.append("| contender | lane | ms/step | steps/s | tokens/s | vs HF Trainer | first step (s) | peak RSS (MB) | MFU | runs |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind in kinds:
            name, lane = CONTENDERS[kind]
            row = table.get((cfg_name, kind))
            if row is None:
                err = errors.get((cfg_name, kind), "not run").strip().splitlines()
                lines.append(f"| ({kind}) {name} | {lane} | failed: {err[-1][:80] if err else '?'} | | | | | | | 0 |")
                continue
            lines.append(f"| ({kind}) {name} | {lane} | {row['step_ms']:.1f} | {row['steps_s']:.2f} | {row['tok_s']:.0f} | "
                         f"{fmt(row['ratio'], '.2f')}x | {row['first_s']:.1f} | {row['rss']:.0f} | "
                         f"{row['mfu'] * 100:.1f}% | {row['n']} |")
        d, g = table.get((cfg_name, "d")), table.get((cfg_name, "g"))
        if d and g:
            # d and g of one repeat ran back to back, so their paired ratios show the noise of the figure.
            paired = [rd["steady_s"] / rg["steady_s"] - 1 for rd, rg in zip(runs[(cfg_name, "d")], runs[(cfg_name, "g")])]
            lines.append(f"\nFront overhead (d vs g), {cfg_name}: {(d['step_ms'] / g['step_ms'] - 1) * 100:+.1f}% "
                         f"(ratio of medians; per repeat: {', '.join(f'{x * 100:+.1f}%' for x in paired)})")
        if cfg_name in in_process:
            pairs = in_process[cfg_name]
            lines.append(f"\nFront overhead measured in one process (d g g d, each the faster of two windows), {cfg_name}: "
                         f"{statistics.mean(pairs) * 100:+.1f}% (pairs: {', '.join(f'{x * 100:+.1f}%' for x in pairs)})")

    verdicts = []
    for label, kind, cfg_name, minimum in TARGETS:
        row = table.get((cfg_name, kind))
        if cfg_name not in cfg_names or kind not in kinds:
            continue
        if row is None or row.get("ratio") is None:
            verdicts.append(f"| {label} | - | not measured |")
        else:
            verdicts.append(f"| {label} | {row['ratio']:.2f}x | {'met' if row['ratio'] >= minimum else 'NOT met'} |")
    for cfg_name in cfg_names:
        d, g = table.get((cfg_name, "d")), table.get((cfg_name, "g"))
        if cfg_name in in_process:  # the same-process figure: the cross-process one is mostly VM noise
            over, how = statistics.mean(in_process[cfg_name]), "in one process"
        elif d and g:
            over, how = d["step_ms"] / g["step_ms"] - 1, "across processes"
        else:
            continue
        verdicts.append(f"| front overhead <= 5% ({cfg_name}, {how}) | {over * 100:+.1f}% | "
                        f"{'met' if over <= OVERHEAD_TARGET else 'NOT met'} |")

    body = "\n".join(lines)
    print(body)
    print("\n| target | measured | verdict |\n|---|---|---|\n" + "\n".join(verdicts))

    if cli.results:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
        cmd = "make bench" if os.environ.get("XTRAINER_BENCH_VIA_MAKE") else "PYTHONPATH=. python " + " ".join(
            [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
        versions = {lane: subprocess.run([py, "-c", "import torch, jax, transformers as t; "
                                          "print(f'torch {torch.__version__}, jax {jax.__version__}, transformers {t.__version__}')"],
                                         capture_output=True, text=True).stdout.strip() for lane, py in pythons.items()}
        md = [
            "# Benchmark results (`bench/harness.py`)",
            "",
            f"- Date: {date}",
            f"- Command: `{cmd}` (repeats {cli.repeats}, configs {cli.configs}, contenders {','.join(kinds)})",
            f"- Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), shared and noisy; "
            f"{platform.platform()}",
            *[f"- Lane `{lane}`: `{py}` ({versions.get(lane, '?')})" for lane, py in pythons.items()],
            f"- float32 matmul peak measured in this run (numpy 2048x2048, ~2 s): {peak / 1e9:.1f} GFLOP/s",
            f"- Whole run: {time.perf_counter() - wall0:.0f} s",
            "",
            "Each contender runs in its own process, alternating within each repeat; figures are medians "
            "over the repeats (peak RSS: the maximum). Steady state is the faster of two consecutive timed "
            "windows after warm-up (asynchronous backends drained at each boundary, the last window ending "
            "after a final host read of the loss). (f) runs in the first repeat only. \"vs HF Trainer\" is "
            "(a)'s step time divided by the contender's (higher is faster). MFU uses FLOPs/token = 6N + "
            "12 x layers x hidden x seq (MaxText convention). (e) and (f) run on the XLA lane's older torch "
            "and transformers, so their HF model is seeded identically but built by another transformers "
            "version; (f) is information only. (g) loops xtrainer's own compiled JAX step with no Trainer, "
            "so (d)/(g) - 1 is the front's overhead; the same pair run inside one process (d g g d) gives the "
            "figure the overhead target is judged on. Only ratios carry meaning on this shared CPU.",
            body,
            "",
            "## Targets (from the issue)",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
            *verdicts,
        ]
        if errors:
            md += ["", "## Failures", ""]
            for (cfg_name, kind), err in errors.items():
                tail = err.strip().splitlines()[-3:] if err.strip() else ["?"]
                md.append(f"- {cfg_name} ({kind}) {CONTENDERS.get(kind, ('front overhead in one process',))[0]}: `{' / '.join(t.strip() for t in tail)[:300]}`")
        md += kept_notes(cli.results)
        with open(cli.results, "w") as f:
            f.write("\n".join(md) + "\n")
        print(f"[bench] wrote {cli.results} ({time.perf_counter() - wall0:.0f}s total)")


if __name__ == "__main__":
    main()

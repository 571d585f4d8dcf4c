"""Plans every TPU preset with its reference Llama and writes the table in tpu_configs/README.md.

Usage:
    PYTHONPATH=. python scripts/plan_presets.py                 # plan all presets (one process each), write the table
    PYTHONPATH=. python scripts/plan_presets.py --only v5e-1    # plan some; keep the others' saved results
    PYTHONPATH=. python scripts/plan_presets.py --render        # only rewrite the table from saved results

Which model each preset is planned with, and why, is `xtrainer.planning.reference.PRESET_PLANS`.
Each preset is planned in its own process, with the preset's LIBTPU_INIT_ARGS exported first
(libtpu reads them once per process). Results are kept as JSON in tpu_configs/plans/<preset>.json
(the report without its per-tensor list), so the table can be rewritten without compiling again.
Needs libtpu (`pip install 'xtrainer[plan]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xtrainer.planning.reference import PRESET_PLANS  # noqa: E402

RESULTS = os.path.join(ROOT, "tpu_configs", "plans")
README = os.path.join(ROOT, "tpu_configs", "README.md")
BEGIN, END = "<!-- plan-table:begin (scripts/plan_presets.py) -->", "<!-- plan-table:end -->"
GIB = 1024**3


def plan_one(name: str) -> dict:
    """Plans preset `name` with its reference model in this process; returns the report without tensors."""
    from xtrainer import TrainingArguments
    from xtrainer.planning import plan
    from xtrainer.planning.reference import abstract_llama

    choice = PRESET_PLANS[name]
    overrides = {"remat": False} if choice.remat_policy == "none" else {"remat_policy": choice.remat_policy}
    model = abstract_llama(choice.model, **overrides)
    args = TrainingArguments(os.path.join("/tmp", "xtrainer_plan_presets"), backend="jax", report_to="none", bf16=True,
                             per_device_train_batch_size=choice.per_device_batch, mesh=choice.mesh)
    report = plan(model, args, name, seq_len=choice.seq_len, output_dir="", raise_if_too_big=False)
    out = report.to_dict()
    out.pop("tensors")
    out.update(reference_model=choice.model, why=choice.why, remat_policy=choice.remat_policy)
    return out


def run_in_subprocess(name: str) -> dict:
    """plan_one(name) in a fresh process with the preset's LIBTPU_INIT_ARGS exported."""
    from xtrainer.tpu_presets import load_preset

    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    init_args = load_preset(name).env.get("LIBTPU_INIT_ARGS")
    if init_args:
        env["LIBTPU_INIT_ARGS"] = init_args
    code = f"import json, sys; sys.path.insert(0, {ROOT!r}); from scripts.plan_presets import plan_one; " \
           f"print('PLAN-JSON' + json.dumps(plan_one({name!r}), default=str))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("PLAN-JSON"):
            return json.loads(line[len("PLAN-JSON"):])
    tail = "\n".join((done.stderr or "").splitlines()[-15:])
    raise RuntimeError(f"planning {name} failed (exit {done.returncode}):\n{tail}")


def _row(name: str, r: dict) -> str:
    m = r["memory"]
    roof = r.get("roofline") or {}
    ratio = r["flops_per_device"] / max(r["model_flops_per_device"], 1)
    return (f"| {name} | {r['reference_model']} ({r['parameters'] / 1e9:.2f}B) | {r['per_device_batch']} x "
            f"{r['sequence_length']} | {r['remat_policy']} | {m['total'] / GIB:.2f} / {r['hbm_bytes'] / GIB:.0f} GiB "
            f"{'fits' if r['fits'] else '**does not fit**'} | {r['param_bytes_per_device'] / GIB:.2f} / "
            f"{r['optimizer_bytes_per_device'] / GIB:.2f} / {m['temporaries'] / GIB:.2f} | "
            f"{r['flops_per_device']:.3g} ({ratio:.2f}x model) | "
            f"{roof.get('step_s', 0) * 1e3:.0f} ms, {roof.get('bound', '?')} | {100 * roof.get('mfu', 0):.0f}% | "
            f"{r['compile_seconds']:.0f} s |")


def render(results: dict[str, dict]) -> str:
    versions = next(iter(results.values()), {}).get("versions", {})
    lines = [
        BEGIN,
        "",
        "Each preset compiled with `xtrainer plan` on a CPU-only machine (no TPU): xtrainer's reference Llama "
        "(`xtrainer/planning/reference.py`: fp32 master weights, bf16 compute, AdamW, per-layer remat) with "
        "the preset's own mesh. Figures are per device, from the compiled program. The step time and MFU "
        "are a roofline from the chip figures in each preset file (`chip:`), not a measurement: the step "
        "time is a lower bound (every operation at the chip's peak compute, HBM or ICI bandwidth, the HBM "
        "traffic being the bytes each compiled operation reads and writes), so the MFU is an upper bound. "
        f"Compiled with jax {versions.get('jax', '?')} and libtpu {versions.get('libtpu', '?')}; written by "
        "`scripts/plan_presets.py`.",
        "",
        "| preset | model | batch x seq per device | remat | memory used / HBM | params / optimizer / temporaries "
        "(GiB) | FLOPs per device per step | est. step | est. MFU | compile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, results[name]) for name in PRESET_PLANS if name in results]
    missing = [name for name in PRESET_PLANS if name not in results]
    if missing:
        lines += ["", "No saved plan (not planned yet, or the plan failed; a step the TPU compiler finds too big for "
                  "the chip is listed in tests/unit/test_plan.py's known gaps): " + ", ".join(missing) + "."]
    lines += ["", "Why each model:", ""]
    lines += [f"- {name}: {results[name]['why']}." for name in PRESET_PLANS if name in results]
    lines += ["", END]
    return "\n".join(lines)


def write_readme(table: str) -> None:
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    if BEGIN in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + table + after
    else:
        anchor = "## Schema (schema_version 1)"
        text = text.replace(anchor, "## Planned reference models\n\n" + table + "\n\n" + anchor, 1)
    with open(README, "w", encoding="utf-8") as handle:
        handle.write(text)


def load_results() -> dict[str, dict]:
    out = {}
    for name in PRESET_PLANS:
        path = os.path.join(RESULTS, f"{name}.json")
        if os.path.exists(path):
            with open(path) as handle:
                out[name] = json.load(handle)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", metavar="PRESET", help="plan these presets only")
    parser.add_argument("--render", action="store_true", help="rewrite the table from saved results only")
    cli = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    failed = []
    if not cli.render:
        for name in cli.only or list(PRESET_PLANS):
            start = time.perf_counter()
            print(f"planning {name} ({PRESET_PLANS[name].model}) ...", flush=True)
            try:
                result = run_in_subprocess(name)
            except RuntimeError as exc:
                print(exc, flush=True)
                failed.append(name)
                continue
            with open(os.path.join(RESULTS, f"{name}.json"), "w") as handle:
                json.dump(result, handle, indent=1, sort_keys=True)
            print(f"  {result['memory']['total'] / GIB:.2f} GiB of {result['hbm_bytes'] / GIB:.0f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    write_readme(render(load_results()))
    print(f"wrote {README}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

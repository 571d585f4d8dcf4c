"""`xtrainer plan`: compile a model's train step for a TPU preset on this machine and print the plan.

    xtrainer plan --tpu-config v5p-128 --model llama2-7b --per-device-train-batch-size 4 --seq-len 4096
    xtrainer plan --tpu-config v6e-256 --model path/to/config.json --find-batch-size
    xtrainer plan --tpu-config v5p-128 --model llama2-7b --torch        # transformers' LlamaForCausalLM via torchax

Models: a reference size (see --help), or a transformers Llama config.json (planned as xtrainer's
reference Flax Llama, or with --torch as transformers' PyTorch model on the meta device through
torchax). Nothing is materialised. TrainingArguments come from --args (a JSON file of fields, such
as a run's training_args.json) and the flags below, which win.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .reference import REFERENCE_LLAMAS


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "plan", help="compile the train step for a TPU preset here; report memory, FLOPs, collectives, shardings",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--tpu-config", required=True, metavar="PRESET",
                        help="a preset name (xtrainer info lists them) or a preset .yaml path")
    parser.add_argument("--model", required=True, metavar="NAME|CONFIG",
                        help=f"reference size ({', '.join(REFERENCE_LLAMAS)}) or a Llama config.json")
    parser.add_argument("--torch", action="store_true",
                        help="plan transformers' PyTorch LlamaForCausalLM (meta device, through torchax)")
    parser.add_argument("--args", metavar="JSON", help="TrainingArguments fields as a JSON file")
    parser.add_argument("--per-device-train-batch-size", type=int, metavar="N")
    parser.add_argument("--gradient-accumulation-steps", type=int, metavar="N")
    parser.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per row (default 2048)")
    parser.add_argument("--mesh", metavar="JSON", help='mesh axis sizes, e.g. \'{"fsdp": 16, "tensor": 4}\'')
    parser.add_argument("--remat-policy", choices=["none", "full", "minimal"], default=None,
                        help="reference Llama: recompute layers in the backward pass (default full)")
    parser.add_argument("--no-bf16", action="store_true", help="compute in float32 (default bf16)")
    parser.add_argument("--find-batch-size", action="store_true",
                        help="search the largest per-device batch whose step fits (several compiles)")
    parser.add_argument("--output-dir", metavar="DIR", help="where plan.json and the HLO go (default plan_output/)")
    parser.add_argument("--json", action="store_true", help="print plan.json instead of the table")
    parser.set_defaults(func=run)


def _training_args(cli):
    from ..training_args import TrainingArguments

    fields = {}
    if cli.args:
        with open(cli.args) as handle:
            fields = {k: v for k, v in json.load(handle).items() if not k.startswith("_")}
    known = {f for f in TrainingArguments.__dataclass_fields__}
    fields = {k: v for k, v in fields.items() if k in known}
    fields.setdefault("output_dir", cli.output_dir or "plan_output")
    if cli.output_dir:
        fields["output_dir"] = cli.output_dir
    fields.update(backend="jax", report_to="none", tpu_config=cli.tpu_config)
    if cli.per_device_train_batch_size:
        fields["per_device_train_batch_size"] = cli.per_device_train_batch_size
    if cli.gradient_accumulation_steps:
        fields["gradient_accumulation_steps"] = cli.gradient_accumulation_steps
    if cli.mesh:
        fields["mesh"] = json.loads(cli.mesh)
    if not cli.no_bf16 and not fields.get("fp16"):
        fields["bf16"] = True
    return TrainingArguments(**fields)


def _model(cli):
    from .reference import abstract_llama, hf_llama_on_meta, llama_config

    remat = {} if cli.remat_policy is None else (
        {"remat": False} if cli.remat_policy == "none" else {"remat": True, "remat_policy": cli.remat_policy})
    if cli.model in REFERENCE_LLAMAS:
        if cli.torch:
            return hf_llama_on_meta(cli.model)
        return abstract_llama(cli.model, **remat)
    if not os.path.isfile(cli.model):
        raise ValueError(f"--model {cli.model!r} is neither a reference size ({', '.join(REFERENCE_LLAMAS)}) "
                         "nor a config.json file.")
    with open(cli.model) as handle:
        config = json.load(handle)
    if cli.torch:
        import torch
        import transformers

        with torch.device("meta"):
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    from ..models.llama import LlamaConfig

    base = llama_config("llama-tiny")  # the reference dtypes and remat, with the file's shapes
    hf = LlamaConfig.from_hf(config, dtype=base.dtype, param_dtype=base.param_dtype, remat=True, **remat)
    return abstract_llama(hf)


def run(cli) -> int:
    from ..extras import MissingExtraError, require

    try:  # one line naming the extra when the jax stack is missing (xtrainer/extras.py)
        for module in ("jax", "flax", "optax"):
            require(module, "plan", "xtrainer plan")
    except MissingExtraError as exc:
        print(exc, file=sys.stderr)
        return 2
    from . import PlanDependencyError, StepDoesNotFit, largest_fitting_batch, plan, require_libtpu
    from .topology import INSTALL_HINT

    try:
        require_libtpu()
    except PlanDependencyError:
        print(f"xtrainer plan: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        args = _training_args(cli)
        model = _model(cli)
        output_dir = os.path.join(args.output_dir, "plan", os.path.basename(cli.tpu_config).removesuffix(".yaml"))
        if cli.find_batch_size:
            import copy

            def make(batch):
                trial = copy.copy(args)
                trial.per_device_train_batch_size = batch
                print(f"  trying per_device_train_batch_size={batch} ...", file=sys.stderr, flush=True)
                return plan(model, trial, seq_len=cli.seq_len, output_dir="")

            batch, _ = largest_fitting_batch(make, args.per_device_train_batch_size)
            if batch == 0:
                print("xtrainer plan: not even per_device_train_batch_size=1 fits:", file=sys.stderr)
                plan(model, _with_batch(args, 1), seq_len=cli.seq_len, output_dir="")  # raises with the knobs
                return 1
            args = _with_batch(args, batch)
            print(f"largest per_device_train_batch_size that fits: {batch}", file=sys.stderr)
        report = plan(model, args, seq_len=cli.seq_len, output_dir=output_dir)
    except PlanDependencyError as exc:
        print(f"xtrainer plan: {exc}", file=sys.stderr)
        return 2
    except StepDoesNotFit as exc:
        print(f"xtrainer plan: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ImportError) as exc:
        print(f"xtrainer plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2, default=str) if cli.json else report.format_table())
    return 0


def _with_batch(args, batch: int):
    import copy

    out = copy.copy(args)
    out.per_device_train_batch_size = batch
    return out

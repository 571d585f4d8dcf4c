"""A script written for transformers' Trainer runs with only its import line changed."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A typical HF script (shaped after the project's baseline probe), with one import line to swap.
SCRIPT = '''
import json, sys, tempfile, torch
from transformers import GPT2Config, GPT2LMHeadModel
{import_line}
torch.manual_seed(0)
cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0)
model = GPT2LMHeadModel(cfg)
class DS(torch.utils.data.Dataset):
    def __init__(s, n=64):
        g = torch.Generator().manual_seed(1)
        s.x = torch.randint(0, 128, (n, 32), generator=g)
    def __len__(s): return len(s.x)
    def __getitem__(s, i): return {{"input_ids": s.x[i], "labels": s.x[i]}}
out = tempfile.mkdtemp()
args = TrainingArguments(out, per_device_train_batch_size=8, max_steps=6, logging_steps=2, report_to=[],
                         save_strategy="no", use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
                         eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=8)
t = Trainer(model=model, args=args, train_dataset=DS(), eval_dataset=DS(16))
result = t.train()
metrics = t.evaluate()
t.save_model(out + "/final")
reloaded = GPT2LMHeadModel.from_pretrained(out + "/final")
print("RESULT=" + json.dumps({{"loss": result.training_loss, "eval_loss": metrics["eval_loss"], "step": result.global_step,
                              "logged": [h["loss"] for h in t.state.log_history if "loss" in h]}}))
'''


def _run(import_line: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, USE_TORCH_XLA="0")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(import_line=import_line)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("RESULT=", 1)[1])


def test_hf_script_runs_unchanged_but_for_the_import():
    hf = _run("from transformers import Trainer, TrainingArguments")
    xt = _run("from xtrainer import Trainer, TrainingArguments")
    assert xt["step"] == hf["step"] == 6
    assert abs(xt["loss"] - hf["loss"]) < 1e-5 and abs(xt["eval_loss"] - hf["eval_loss"]) < 1e-5
    assert len(xt["logged"]) == len(hf["logged"]) == 3

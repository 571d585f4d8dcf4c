"""Seq2SeqTrainingArguments and Seq2SeqTrainer: generation settings, training with generated metrics,
and (XLA lane) static-shape decoding that compiles no new graph once warm."""

import dataclasses
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
import transformers

import xtrainer

PAD, EOS, START, VOCAB = 0, 1, 0, 16
needs_xla = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is only in the XLA lane")


def tiny_t5(seed: int = 0):
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS, dropout_rate=0.0,
        relative_attention_num_buckets=8, initializer_factor=5.0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(config)


def copy_task(n: int, seed: int = 0) -> list[dict]:
    """Copy 3 tokens: learnable in a few dozen steps by a tiny T5."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ids = rng.integers(2, VOCAB, size=3)
        rows.append({
            "input_ids": np.append(ids, EOS).astype(np.int64),
            "attention_mask": np.ones(4, dtype=np.int64),
            "labels": np.append(ids, EOS).astype(np.int64),
        })
    return rows


def exact_match(pred):
    preds, labels = np.asarray(pred.predictions), np.asarray(pred.label_ids)
    hits = []
    for p, l in zip(preds, labels):
        p = [t for t in p[1:] if t not in (PAD, -100)]
        hits.append(p == [t for t in l if t not in (PAD, -100)])
    return {"exact_match": float(np.mean(hits)), "width": preds.shape[1]}


# ---------------------------------------------------------------------------------------------- arguments


def test_seq2seq_args_defaults_match_transformers(tmp_path):
    ours = {f.name: f.default for f in dataclasses.fields(xtrainer.Seq2SeqTrainingArguments)}
    theirs = {f.name: f.default for f in dataclasses.fields(transformers.Seq2SeqTrainingArguments)}
    for name in ("sortish_sampler", "predict_with_generate", "generation_max_length", "generation_num_beams", "generation_config"):
        assert ours[name] == theirs[name], name


def test_to_dict_turns_a_generation_config_into_a_dict(tmp_path):
    config = transformers.GenerationConfig(max_length=7, num_beams=2)
    args = xtrainer.Seq2SeqTrainingArguments(str(tmp_path), generation_config=config, report_to="none")
    as_dict = args.to_dict()
    assert as_dict["generation_config"]["max_length"] == 7 and as_dict["generation_config"]["num_beams"] == 2
    assert json.loads(args.to_json_string())["generation_config"]["num_beams"] == 2
    hf = transformers.Seq2SeqTrainingArguments(str(tmp_path), generation_config=config, report_to="none").to_dict()
    assert as_dict["generation_config"] == hf["generation_config"]


def test_hf_argument_parser_reads_the_generation_flags(tmp_path):
    parser = transformers.HfArgumentParser(xtrainer.Seq2SeqTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--predict_with_generate", "--generation_max_length", "12",
         "--generation_num_beams", "3", "--report_to", "none"]
    )
    assert args.predict_with_generate is True
    assert (args.generation_max_length, args.generation_num_beams) == (12, 3)


def test_sortish_sampler_groups_by_length_or_warns(tmp_path):
    args = xtrainer.Seq2SeqTrainingArguments(str(tmp_path), sortish_sampler=True, report_to="none")
    assert str(getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy)) == "group_by_length"
    with pytest.warns(UserWarning, match="sortish_sampler=True is ignored"):
        xtrainer.Seq2SeqTrainingArguments(
            str(tmp_path), sortish_sampler=True, train_sampling_strategy="sequential", report_to="none"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plain = xtrainer.Seq2SeqTrainingArguments(str(tmp_path), report_to="none")
    assert str(getattr(plain.train_sampling_strategy, "value", plain.train_sampling_strategy)) == "random"


# ---------------------------------------------------------------------------------------------- the trainer


def _trainer(tmp_path, model=None, compute_metrics=exact_match, **overrides):
    kwargs = dict(
        per_device_train_batch_size=8, per_device_eval_batch_size=8, predict_with_generate=True, report_to="none",
        disable_tqdm=True, save_strategy="no", backend="torch",
    )
    kwargs.update(overrides)
    return xtrainer.Seq2SeqTrainer(
        model=model if model is not None else tiny_t5(),
        args=xtrainer.Seq2SeqTrainingArguments(str(tmp_path), **kwargs),
        train_dataset=copy_task(256), eval_dataset=copy_task(16, seed=1), compute_metrics=compute_metrics,
    )


def test_gen_kwargs_resolution_order(tmp_path):
    trainer = _trainer(tmp_path, generation_max_length=9, generation_num_beams=2)
    assert trainer._resolve_gen_kwargs({}) == {"max_length": 9, "num_beams": 2}
    assert trainer._resolve_gen_kwargs({"max_new_tokens": 3}) == {"max_new_tokens": 3, "num_beams": 2}
    assert trainer._resolve_gen_kwargs({"max_length": 4, "num_beams": 1}) == {"max_length": 4, "num_beams": 1}


def test_generation_config_argument_sets_the_model_config_and_padding(tmp_path):
    config = transformers.GenerationConfig(max_length=7, decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD)
    trainer = _trainer(tmp_path, generation_config=config)
    assert trainer.model.generation_config.max_length == 7
    out = trainer.predict(copy_task(6, seed=2))
    # Generation stops at 7 tokens and pads to the config's max_length (not to transformers' default 20).
    assert out.predictions.shape == (6, 7) and out.label_ids.shape == (6, 7)
    assert (out.predictions[:, 0] == START).all()


def test_training_with_generated_metrics(tmp_path):
    model = tiny_t5()
    model.config.initializer_factor = 1.0
    model.init_weights()  # trainable scale (the factor-5 init only makes varied random outputs)
    trainer = _trainer(tmp_path, model=model, max_steps=16, learning_rate=1e-2, eval_strategy="steps", eval_steps=16,
                       logging_steps=8, generation_max_length=6)
    before = trainer.evaluate()
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_exact_match" in log]
    assert [log["step"] for log in evals] == [16]  # train() starts a new log history
    # Generated predictions are padded to transformers' default max_length (20) with the pad id.
    assert evals[-1]["eval_width"] == 20
    assert 0.0 <= evals[-1]["eval_exact_match"] <= 1.0
    assert evals[-1]["eval_loss"] < before["eval_loss"]


def test_predict_with_generate_off_gives_logits(tmp_path):
    trainer = _trainer(tmp_path, compute_metrics=None, predict_with_generate=False)
    out = trainer.predict(copy_task(4))
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    assert logits.shape == (4, 4, VOCAB)


# ---------------------------------------------------------------------------------------------- torch_xla


@needs_xla
def test_torch_xla_decoding_compiles_once(tmp_path):
    from xtrainer.backends.torch_xla import spmd

    trainer = _trainer(tmp_path, backend="torch_xla", per_device_eval_batch_size=2)
    data = copy_task(8, seed=3)
    counts = []
    calls = (
        {"max_length": 9}, {"max_length": 13}, {"max_new_tokens": 10},
        {"max_length": 9, "num_beams": 2}, {"max_length": 14, "num_beams": 2},
    )
    for gen_kwargs in calls:
        before = spmd.compile_count()
        out = trainer.predict(data, **gen_kwargs)
        counts.append(spmd.compile_count() - before)
        assert out.predictions.shape[0] == 8
    # The first greedy (and beam) call compiles the encoder, the decoding step and the eval graphs; calls
    # with other lengths in the same buffer bucket (9..16) compile nothing, whatever step they stop at.
    assert counts[0] > 0 and counts[3] > 0, counts
    assert counts[1:3] == [0, 0] and counts[4] == 0, counts


@needs_xla
def test_torch_xla_rejects_unsupported_generate_arguments(tmp_path):
    trainer = _trainer(tmp_path, backend="torch_xla", per_device_eval_batch_size=2)
    with pytest.raises(ValueError, match="repetition_penalty"):
        trainer.predict(copy_task(4), repetition_penalty=1.3)
    with pytest.raises(ValueError, match="output_foo"):
        trainer.predict(copy_task(4), output_foo=True)

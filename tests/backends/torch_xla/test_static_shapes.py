"""Host-side static-shape padding for the torch_xla backend (numpy only: runs in every lane)."""

import numpy as np
import pytest

from xtrainer.backends.torch_xla.static_shapes import (
    PadPolicy,
    batch_signature,
    can_pad_rows,
    describe_change,
    pad_batch,
    seq_bucket,
)


def _lm_batch(rows, seq, mask=True):
    batch = {"input_ids": np.arange(rows * seq, dtype=np.int64).reshape(rows, seq) % 50 + 1,
             "labels": np.ones((rows, seq), dtype=np.int64)}
    if mask:
        batch["attention_mask"] = np.ones((rows, seq), dtype=np.int64)
    return batch


def test_short_batch_gets_ignored_rows_and_bucketed_length():
    padded = pad_batch(_lm_batch(3, 11), rows=8, policy=PadPolicy(), label_names=["labels"])
    b = padded.batch
    assert (padded.rows, padded.seq, padded.padded_rows, padded.padded_seq) == (3, 11, 8, 16)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (8, 16)
    assert (b["labels"][3:] == -100).all() and (b["labels"][:3, 11:] == -100).all()
    assert (b["attention_mask"][3:] == 0).all() and (b["attention_mask"][:3, 11:] == 0).all()
    assert (b["input_ids"][:3, :11] == _lm_batch(3, 11)["input_ids"]).all()
    assert b["input_ids"].dtype == np.int64


def test_full_batch_is_left_alone():
    batch = _lm_batch(8, 16)
    padded = pad_batch(batch, rows=8, policy=PadPolicy(), label_names=["labels"])
    assert not padded.changed and padded.batch["input_ids"] is batch["input_ids"]


def test_unsafe_padding_is_skipped():
    # float targets (regression) would count padded rows in the loss: rows stay short
    regression = {"x": np.zeros((3, 4), np.float32), "labels": np.zeros(3, np.float32)}
    assert not pad_batch(regression, 8, PadPolicy()).changed
    assert not can_pad_rows(regression)
    # QA positions are clamped, not ignored, by HF's loss: no padding either
    qa = {"input_ids": np.ones((3, 8), np.int64), "start_positions": np.zeros(3, np.int64)}
    assert not can_pad_rows(qa, ["start_positions"])
    # a bidirectional model without an attention_mask: the sequence is not padded, rows are
    padded = pad_batch(_lm_batch(3, 11, mask=False), 8, PadPolicy(causal=False), ["labels"])
    assert padded.batch["input_ids"].shape == (8, 11)
    # ... but a causal LM never sees right padding from earlier positions
    assert pad_batch(_lm_batch(3, 11, mask=False), 8, PadPolicy(causal=True), ["labels"]).batch["input_ids"].shape == (8, 16)
    # padding switched off
    assert not pad_batch(_lm_batch(3, 11), 8, PadPolicy(rows=False, seq_bucket=None), ["labels"]).changed


def test_evaluation_pads_rows_without_labels():
    batch = {"input_ids": np.ones((3, 8), np.int64)}
    assert not pad_batch(batch, 8, PadPolicy(), need_labels=True).changed
    assert pad_batch(batch, 8, PadPolicy(), need_labels=False).batch["input_ids"].shape == (8, 8)


@pytest.mark.parametrize(("length", "policy", "expected"), [
    (11, PadPolicy(), 16), (16, PadPolicy(), 16), (17, PadPolicy(), 32), (17, PadPolicy(max_positions=20), 20),
    (30, PadPolicy(max_positions=20), 30), (11, PadPolicy(seq_bucket=8), 16), (11, PadPolicy(seq_bucket=None), 11),
])
def test_seq_bucket(length, policy, expected):
    assert seq_bucket(length, policy) == expected


def test_describe_change_names_the_array_and_shapes():
    full = (batch_signature(_lm_batch(8, 16)),)
    short = (batch_signature(_lm_batch(4, 16)),)
    assert describe_change(None, (full, True, False)) == "first compilation"
    message = describe_change((full, True, True), (short, True, True))
    assert "'input_ids' (8, 16) int64 -> (4, 16) int64" in message
    assert "accumulation window of 1 micro-batches instead of 2" in describe_change((full * 2, True, True), (full, True, True))
    assert "optimizer state exists now" in describe_change((full, True, False), (full, True, True))
    assert "num_items_in_batch appeared" in describe_change((full, False, True), (full, True, True))
    assert "although the input shapes did not" in describe_change((full, True, True), (full, True, True))

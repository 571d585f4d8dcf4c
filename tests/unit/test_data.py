"""The backend-neutral host pipeline: sampling order, batch plans, collation, token counts."""

import numpy as np
import pytest

from xtrainer import data


def test_sequential_and_random_orders():
    assert data.epoch_order(5, "sequential", seed=1, epoch=0).tolist() == [0, 1, 2, 3, 4]
    a = data.epoch_order(50, "random", seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    np.testing.assert_array_equal(a, data.epoch_order(50, "random", seed=3, epoch=0))
    assert not np.array_equal(a, data.epoch_order(50, "random", seed=3, epoch=1))
    assert not np.array_equal(a, data.epoch_order(50, "random", seed=4, epoch=0))


def test_group_by_length_sorts_inside_windows():
    lengths = np.random.default_rng(0).integers(1, 100, size=40)
    order = data.epoch_order(40, "group_by_length", seed=0, epoch=0, lengths=lengths, group_size=4)
    assert sorted(order.tolist()) == list(range(40))
    # A single window (40 < 4*50) is sorted longest first.
    assert list(lengths[order]) == sorted(lengths, reverse=True)
    with pytest.raises(ValueError, match="one length per example"):
        data.epoch_order(4, "group_by_length", seed=0, epoch=0)


def test_batch_plan_splits_global_batches_over_processes():
    order = np.arange(10)
    one = data.BatchPlan(batch_size=4)
    two = [data.BatchPlan(batch_size=2, num_processes=2, process_index=p) for p in (0, 1)]
    assert one.num_batches(10) == two[0].num_batches(10) == 3
    for b in range(3):
        joined = np.concatenate([p.local_indices(order, b) for p in two])
        if b < 2:
            np.testing.assert_array_equal(joined, one.local_indices(order, b))
    # The last global batch wraps around so both processes get full batches.
    np.testing.assert_array_equal(np.concatenate([p.local_indices(order, 2) for p in two]), [8, 9, 0, 1])
    assert data.BatchPlan(4, drop_last=True).num_batches(10) == 2


def test_default_collator_matches_hf_conventions():
    batch = data.default_data_collator([{"x": 1.5, "label": 1, "ids": [1, 2], "s": "text"}, {"x": 2.0, "label": 0, "ids": [3, 4], "s": "t"}])
    assert set(batch) == {"x", "labels", "ids"}
    assert batch["x"].dtype == np.float32 and batch["labels"].dtype == np.int64
    np.testing.assert_array_equal(batch["ids"], [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="different shapes.*DataCollatorWithPadding"):
        data.default_data_collator([{"ids": [1, 2]}, {"ids": [1]}])
    with pytest.raises(TypeError, match="dicts of features"):
        data.default_data_collator([[1, 2]])


def test_collator_output_to_numpy():
    import torch

    out = data.batch_to_numpy({"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": np.zeros(2), "c": None})
    assert out["a"].dtype == np.float32 and set(out) == {"a", "b"}


def test_count_label_items_shifts_for_causal_lm():
    labels = np.array([[1, 2, -100, -100], [5, 6, 7, -100]])
    assert data.count_label_items([{"labels": labels}], shift_labels=False) == 5
    assert data.count_label_items([{"labels": labels}], shift_labels=True) == 3
    assert data.count_label_items([{"x": labels}], shift_labels=False) is None


def test_pad_and_concat_pads_with_minus_100():
    out = data.nested_concat([(np.ones((2, 3)),), (np.zeros((1, 5)),)])
    assert out[0].shape == (3, 5)
    assert (out[0][:2, 3:] == -100).all() and (out[0][2] == 0).all()


def test_stream_batches_skip_and_split():
    plan = data.BatchPlan(batch_size=2, num_processes=2, process_index=1)
    stream = ({"x": i} for i in range(9))
    batches = list(data.iterate_stream_batches(stream, plan, data.default_data_collator, skip_batches=1))
    assert [b["x"].tolist() for b in batches] == [[6, 7]]  # the partial [8] would leave process 1 without a batch
    single = data.iterate_stream_batches(({"x": i} for i in range(5)), data.BatchPlan(2), data.default_data_collator)
    assert [b["x"].tolist() for b in single] == [[0, 1], [2, 3], [4]]

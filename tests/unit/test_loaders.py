"""The loader with worker processes: same batches for any worker count, exact positions, clear failures."""

import os
import random
import signal
import warnings

import numpy as np
import pytest

from xtrainer import data
from xtrainer.data_workers import WorkerOptions
from xtrainer.loaders import DatasetLoader

torch = pytest.importorskip("torch")

N = 37


class Rows:
    """A map-style dataset of variable-length rows (no __getitems__: one lookup per index)."""

    def __init__(self, n=N, fail_at=None, kill_at=None):
        self.n, self.fail_at, self.kill_at = n, fail_at, kill_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyError(f"row {i} is broken")
        if i == self.kill_at and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
        return {"input_ids": list(range(i, i + 3 + i % 4)), "labels": i}


def random_collator(examples):
    """Pads, then masks at random with all three global generators, as augmentation and MLM collators do."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = np.array([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples])
    noise = np.random.random(ids.shape) + torch.rand(ids.shape).numpy() + random.random()
    return {"input_ids": ids, "noise": noise.astype(np.float32), "labels": np.array([e["labels"] for e in examples])}


def order_fn(epoch):
    return data.epoch_order(N, "random", seed=3, epoch=epoch)


def make_loader(dataset=None, workers=0, batch_size=4, collate=random_collator, **options):
    dataset = Rows() if dataset is None else dataset
    order = order_fn if data.has_length(dataset) else None
    return DatasetLoader(dataset, data.BatchPlan(batch_size), collate, order_fn=order,
                         workers=WorkerOptions(num_workers=workers, **options), seed=11)


def take(loader, epoch=0, start=0):
    return [{k: v.copy() for k, v in b.items()} for b in loader.epoch(epoch, start)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.timeout(120)
def test_batches_are_identical_for_0_1_2_4_workers_with_a_random_collator():
    reference = [take(make_loader(), epoch) for epoch in (0, 1)]
    assert reference[0][0]["noise"].std() > 0
    assert not np.array_equal(reference[0][0]["noise"][:1], reference[0][1]["noise"][:1])  # a seed per batch
    assert [b["labels"].tolist() for b in reference[0]] != [b["labels"].tolist() for b in reference[1]]
    for workers in (1, 2, 4):
        loader = make_loader(workers=workers, persistent_workers=workers == 2)
        for epoch in (0, 1):
            assert_same(take(loader, epoch), reference[epoch])
        loader.close()


def test_making_batches_in_process_leaves_the_training_rng_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = (torch.rand(3), np.random.random(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    take(make_loader())
    got = (torch.rand(3), np.random.random(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_group_by_length_and_streams_are_identical_with_workers():
    lengths = [3 + i % 4 for i in range(N)]
    grouped = lambda epoch: data.epoch_order(N, "group_by_length", seed=1, epoch=epoch, lengths=lengths, group_size=4)  # noqa: E731
    plans = [DatasetLoader(Rows(), data.BatchPlan(4), random_collator, order_fn=grouped,
                           workers=WorkerOptions(num_workers=w), seed=2) for w in (0, 2)]
    assert_same(take(plans[0]), take(plans[1]))

    def stream():
        return (Rows()[i] for i in range(N))

    assert_same(take(make_loader(stream())), take(make_loader(stream(), workers=2)))
    assert [b["labels"].tolist() for b in take(make_loader(stream()))][0] == [0, 1, 2, 3]  # the stream's own order


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_saved_position_resumes_with_the_batches_an_uninterrupted_pass_gives(workers):
    full = take(make_loader(), epoch=1)
    loader = make_loader(workers=workers)
    batches = loader.epoch(1)
    seen = [next(batches) for _ in range(6)]  # handed out; only 4 of them trained on (device prefetch)
    state = loader.state_dict(1, 4)
    assert state["epoch"] == 1 and state["next_batch"] == 4 and not state["epoch_complete"]
    del batches, seen
    loader.close()
    resumed = make_loader(workers=workers)
    epoch, start = resumed.load_state_dict(state)
    assert (epoch, start) == (1, 4)
    assert_same(take(resumed, epoch, start), full[4:])
    # The end of an epoch resumes at the start of the next one.
    assert make_loader().load_state_dict({"epoch": 1, "batches_done": len(full), "next_batch": len(full)}) == (2, 0)


def test_a_stream_with_state_resumes_from_its_state_without_reading_what_came_before():
    datasets = pytest.importorskip("datasets")
    rows = [Rows()[i] for i in range(N)]
    table = datasets.Dataset.from_list([{"input_ids": r["input_ids"] + [0] * (6 - len(r["input_ids"])), "labels": r["labels"]} for r in rows])

    def stream():
        return table.to_iterable_dataset(num_shards=3)

    full = take(make_loader(stream(), collate=data.default_data_collator))
    loader = make_loader(stream(), collate=data.default_data_collator)
    batches = loader.epoch(0)
    for _ in range(5):
        next(batches)
    state = loader.state_dict(0, 3)
    assert state["stream_state"]["examples_iterable"]  # the stream's own position, not a count to replay
    resumed = make_loader(stream(), collate=data.default_data_collator)
    assert_same(take(resumed, *resumed.load_state_dict(state)), full[3:])


@pytest.mark.timeout(120)
def test_out_of_order_batches_resume_without_repeating_or_losing_any():
    loader = make_loader(workers=2, in_order=False)
    batches = loader.epoch(0)
    first = [next(batches)["labels"].tolist() for _ in range(5)]
    state = loader.state_dict(0, 5)
    del batches
    loader.close()
    resumed = make_loader(workers=2, in_order=False)
    rest = [b["labels"].tolist() for b in resumed.epoch(*resumed.load_state_dict(state))]
    everything = sorted(sum(first + rest, []))
    assert everything == sorted(sum((b["labels"].tolist() for b in take(make_loader())), []))
    resumed.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_the_dataset_names_the_example_and_keeps_its_traceback(workers):
    loader = make_loader(Rows(fail_at=13), workers=workers)
    with pytest.raises(KeyError) as info:
        take(loader)
    text = "".join(__import__("traceback").format_exception(info.value))
    assert "example index 13 fails on its own" in text
    assert "row 13 is broken" in text and "__getitem__" in text  # the worker's original traceback
    loader.close()


@pytest.mark.timeout(60)
def test_a_worker_killed_by_the_os_gives_a_clear_error():
    loader = make_loader(Rows(kill_at=9), workers=2)
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly") as info:
        take(loader)
    assert "out-of-memory killer" in "".join(__import__("traceback").format_exception(info.value))
    loader.close()


def test_a_collator_with_inconsistent_shapes_names_the_batch_and_the_key():
    def bad(examples):
        batch = random_collator(examples)
        if examples[0]["labels"] == order_fn(0)[8]:  # the first example of batch 2
            batch["labels"] = batch["labels"][:-1]
        return batch

    with pytest.raises(ValueError, match="'labels' has 3 rows but 'input_ids' has 4") as info:
        take(make_loader(collate=bad))
    assert "In batch 2 of epoch 0" in "".join(__import__("traceback").format_exception(info.value))


def test_loader_exposes_what_transformers_scripts_read():
    loader = make_loader(workers=0, batch_size=5)
    assert len(loader) == 8 and loader.batch_size == 5 and loader.num_workers == 0 and not loader.drop_last
    assert isinstance(loader.dataset, Rows) and loader.collate_fn is random_collator
    assert len(loader.sampler) == N and list(loader.sampler) == order_fn(0).tolist()


def test_dataloader_fields_reach_the_worker_processes():
    """Every dataloader_* field of TrainingArguments reaches the loader and the worker processes behind it."""
    from xtrainer import TrainingArguments
    from xtrainer.data_workers import options_from_args

    args = TrainingArguments("unused", dataloader_num_workers=2, dataloader_prefetch_factor=3, dataloader_in_order=False,
                             dataloader_persistent_workers=True, dataloader_multiprocessing_context="fork",
                             dataloader_pin_memory=True)
    assert options_from_args(args, pins_host_memory=False).pin_memory is False  # jax, torch_xla, torch on CPU
    options = options_from_args(args, pins_host_memory=True)  # torch on CUDA
    loader = DatasetLoader(Rows(), data.BatchPlan(4), random_collator, workers=options, seed=11)
    assert (loader.num_workers, loader.prefetch_factor, loader.in_order, loader.persistent_workers) == (2, 3, False, True)
    assert loader.multiprocessing_context._name == "fork" and loader.pin_memory and loader.total_batch_size == 4
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")  # on a machine without CUDA to pin for
            assert len(take(loader)) == len(loader)
        workers = loader._pool._loader  # the torch DataLoader that runs the worker processes
        assert (workers.num_workers, workers.prefetch_factor, workers.in_order, workers.persistent_workers) == (2, 3, False, True)
        assert workers.multiprocessing_context._name == "fork"
        # without CUDA, torch 2.13 keeps pin_memory=True (and warns); torch 2.9 turns it off
        assert workers.pin_memory == torch.utils.data.DataLoader([0], pin_memory=True).pin_memory
    finally:
        loader.close()
    plain = DatasetLoader(Rows(), data.BatchPlan(4, 2, 0), random_collator)
    assert plain.prefetch_factor is None and plain.multiprocessing_context is None and plain.total_batch_size == 8


@pytest.mark.slow  # spawned interpreters import torch and numpy afresh: ~5-20 s here
@pytest.mark.timeout(120)
def test_spawned_workers_give_the_same_batches():
    """dataloader_multiprocessing_context='spawn': fresh interpreters unpickle the dataset and the collator."""
    loader = make_loader(workers=1, multiprocessing_context="spawn")
    assert_same(take(loader), take(make_loader()))


def test_each_process_reads_only_its_own_shards_of_a_sharded_stream():
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"input_ids": [[i, i] for i in range(40)], "labels": list(range(40))})
    stream = table.to_iterable_dataset(num_shards=4)
    seen = []
    for process in (0, 1):
        loader = DatasetLoader(stream, data.BatchPlan(3, num_processes=2, process_index=process), data.default_data_collator)
        assert loader.reads_own_shards
        labels = [b["labels"].tolist() for b in loader.epoch(0)]
        assert all(len(b) == 3 for b in labels)  # a partial last batch is dropped on several processes
        seen.append(sum(labels, []))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 18
    # Its shards are all this process reads: shards 0 and 2 (examples 0-9, 20-29) on process 0.
    assert set(seen[0]) <= set(range(0, 10)) | set(range(20, 30))
    # A stream that cannot be split is read whole by each process, which keeps its slice.
    single = DatasetLoader(table.to_iterable_dataset(num_shards=3), data.BatchPlan(3, 2, 1), data.default_data_collator)
    assert not single.reads_own_shards
    assert [b["labels"].tolist() for b in single.epoch(0)][0] == [3, 4, 5]


def test_data_state_files_round_trip_and_process_0_speaks_for_map_style(tmp_path):
    from xtrainer import data_state

    loader = make_loader()
    batches = loader.epoch(2)
    for _ in range(3):
        next(batches)
    data_state.save(str(tmp_path), loader, (2, 3), 0, {"examples": N})
    record = data_state.read(str(tmp_path), 0)
    assert record["loader"]["next_batch"] == 3 and record["run"] == {"examples": N}
    assert data_state.read(str(tmp_path), 1)["loader"] == record["loader"]  # the same position on process 1
    assert data_state.resume_position(str(tmp_path), make_loader(), 1, {"examples": N}, (0, 0)) == (2, 3)
    assert data_state.resume_position(str(tmp_path / "none"), make_loader(), 0, {}, (1, 7)) == (1, 7)  # no file
    tagged = {"b": b"\x00\x01", "t": (1, 2), "a": np.arange(3, dtype=np.int16), "g": torch.tensor([5], dtype=torch.uint8)}
    back = data_state._decode(__import__("json").loads(__import__("json").dumps(data_state._encode(tagged))))
    assert back["b"] == b"\x00\x01" and back["t"] == (1, 2) and back["a"].dtype == np.int16
    assert torch.equal(back["g"], tagged["g"])

"""Loaders the user returns from an overridden `get_train_dataloader` / `get_eval_dataloader` /
`get_test_dataloader`: a torch `DataLoader`, torchdata's `StatefulDataLoader`, a Grain `DataLoader`
or dataset, or any iterable of batches.

`as_loader` gives them the interface the loop uses (`epoch`, `has_length`, `len`, `num_examples`,
`state_dict`/`load_state_dict`, `close`); the user's object itself stays what scripts and callbacks
see. Each epoch iterates the object anew (calling `set_epoch` on its sampler and dataset, as
transformers does); batches (dicts of tensors or arrays) become numpy batches. Its length, when it
has one, sets the steps per epoch.

Position in checkpoints: a loader with `state_dict()`/`load_state_dict()` (torchdata's
StatefulDataLoader) or an iterator with `get_state()`/`set_state()` (Grain) is saved after each
trained batch and restored on resume. Any other iterable resumes by reading and dropping the
batches before the resume point (transformers' `skip_first_batches`), which costs time in
proportion to the position; a message says so.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import data

logger = logging.getLogger(__name__)

_STATES_KEPT = 4096


def as_loader(obj: Any, what: str = "train"):
    """The loop's view of what a get_*_dataloader returned (xtrainer's own loaders pass through)."""
    if hasattr(obj, "epoch") and hasattr(obj, "has_length") and hasattr(obj, "num_examples"):
        return obj
    if isinstance(obj, (str, bytes)) or not hasattr(obj, "__iter__"):
        raise TypeError(
            f"get_{what}_dataloader() returned a {type(obj).__name__}; it must return an iterable of batches "
            "(dicts of arrays or tensors), e.g. a torch DataLoader."
        )
    return UserLoader(obj, what)


class UserLoader:
    """Adapts a user's iterable of batches to the loop (see the module docstring)."""

    def __init__(self, loader: Any, what: str):
        self.loader, self.what = loader, what
        self._states: OrderedDict[int, Any] = OrderedDict()
        self._epoch = None
        self._resume: dict | None = None

    # ------------------------------------------------------------------ size

    def has_length(self) -> bool:
        try:
            len(self.loader)
        except (TypeError, NotImplementedError):
            return False
        return True

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_examples(self) -> int | None:
        dataset = getattr(self.loader, "dataset", None)
        if dataset is not None and data.has_length(dataset):
            return len(dataset)
        if self.has_length():
            batch_size = getattr(self.loader, "batch_size", None)
            return len(self.loader) * batch_size if isinstance(batch_size, int) else None
        return None

    def __getattr__(self, name):  # batch_size, dataset, sampler... of the user's object
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    # ------------------------------------------------------------------ batches

    def _set_epoch(self, epoch: int) -> None:
        for owner in (getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None),
                      getattr(getattr(self.loader, "batch_sampler", None), "sampler", None),
                      getattr(self.loader, "dataset", None), self.loader):
            set_epoch = getattr(owner, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def _stateful(self) -> str | None:
        if callable(getattr(self.loader, "state_dict", None)) and callable(getattr(self.loader, "load_state_dict", None)):
            return "state_dict"
        return None

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        resume, self._resume = self._resume, None
        if resume is not None and (resume["epoch"], resume["batches_done"]) != (epoch, start_batch):
            resume = None
        self._set_epoch(epoch)
        self._epoch, self._states = epoch, OrderedDict()
        return self._batches(epoch, start_batch, resume.get("loader_state") if resume else None)

    def _batches(self, epoch: int, start: int, saved: Any):
        kind = self._stateful()
        skip = start
        if saved is not None and kind == "state_dict":
            self.loader.load_state_dict(saved)
            skip = 0
        iterator = iter(self.loader)
        if saved is not None and kind is None and callable(getattr(iterator, "set_state", None)):
            iterator.set_state(saved)  # a Grain iterator
            skip = 0
        if skip:
            logger.info("Resuming the %s dataloader by reading and dropping its first %d batches (it has no "
                        "state_dict/load_state_dict or get_state/set_state to resume from).", self.what, skip)
        number = start - skip
        if kind is None and callable(getattr(iterator, "get_state", None)):
            self._keep(start, iterator.get_state())
        for batch in iterator:
            number += 1
            if number <= start:
                continue
            if kind == "state_dict":
                self._keep(number, self.loader.state_dict())
            elif callable(getattr(iterator, "get_state", None)):
                self._keep(number, iterator.get_state())
            yield self._to_numpy(batch, number - 1)

    def _keep(self, batches_done: int, state: Any) -> None:
        self._states[batches_done] = state
        while len(self._states) > _STATES_KEPT:
            self._states.popitem(last=False)

    def _to_numpy(self, batch: Any, number: int) -> dict[str, np.ndarray]:
        if not hasattr(batch, "items"):
            raise TypeError(
                f"Batch {number} of the {self.what} dataloader is a {type(batch).__name__}; the loop takes dicts "
                "of arrays or tensors keyed by the model's argument names (e.g. {'input_ids': ..., 'labels': ...})."
            )
        try:
            return data.batch_to_numpy(batch)
        except (TypeError, ValueError) as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(f"In batch {number} of the {self.what} dataloader returned by get_{self.what}_dataloader().")
            raise

    # ------------------------------------------------------------------ position

    def state_dict(self, epoch: int, batches_done: int) -> dict:
        state = {"epoch": epoch, "batches_done": batches_done, "done_beyond": []}
        if epoch == self._epoch and batches_done in self._states:
            state["loader_state"] = self._states[batches_done]
        if self.has_length():
            state["epoch_complete"] = batches_done >= len(self)
        return state

    def load_state_dict(self, state: dict) -> tuple[int, int]:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if state.get("epoch_complete"):
            return epoch + 1, 0
        self._resume = dict(state)
        return epoch, done

    def close(self) -> None:
        pass

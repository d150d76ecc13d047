"""The training loader: torchdata's StatefulDataLoader over a StreamDataset, with the
positions of every rank in its state.

StatefulDataLoader does the per-worker bookkeeping: after each batch it takes the
worker's `dataset.state_dict()` in the worker and applies it in the main process when
that batch is yielded, so its `state_dict()` is the position after the batches the
training loop consumed, prefetching notwithstanding; `load_state_dict()` hands each
worker its own back. Lightning (2.3+) saves a stateful train loader's `state_dict()` in
the fit loop's checkpoint entry and loads it before the first batch of a resumed run.
The workers must be persistent: a non-persistent StatefulDataLoader starts every epoch
from fresh copies of the dataset, i.e. from the start of the streams.

What this subclass adds, each because the library or Lightning does not do it:
- ranks: Lightning writes rank 0's loader state only, so `state_dict()` gathers every
  rank's (one all_gather_object; every rank takes part in checkpointing) and
  `load_state_dict()` picks this rank's. A state saved with another world size, worker
  count or seed cannot be handed to these workers: the streams then restart from fresh
  positions reseeded by the samples already consumed (not a replay of a fresh start),
  with a warning.
- epoch ends: Lightning stops drawing after `len(loader)` batches, so the iterator never
  raises StopIteration and a state saved at the last batch of an epoch says "unfinished";
  restored as is, the next epoch would begin with an empty iterator (data unchanged,
  Lightning's epoch counter one ahead). A state whose workers have all drawn their epoch
  quota is restored as finished.
- early epoch ends: where Lightning calls `iter()` before the epoch's quota is drawn
  (`limit_train_batches`, its bookkeeping after resuming from a checkpoint written after
  `fit`), StatefulDataLoader's persistent workers would drop the batches they had
  prefetched, i.e. skip data; the unfinished iterator is returned instead, so the next
  epoch first finishes the stream's epoch (shorter for Lightning, same data in order).
- a dead worker: torch's error names only its pid; `worker_death()` says which worker of
  which rank it was and the shard and key it was reading (streams/worker_notes.py).
- teardown: after `fit` Lightning shuts the workers down and drops the iterator
  (`_iterator = None`), after which `StatefulDataLoader.state_dict()` would describe a
  fresh start (train.py saves last.ckpt after `fit`); the last iterator is kept, and its
  state serves `state_dict()` and the next `iter()`.
"""

from __future__ import annotations

import logging

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from segany.data.streams.dataset import StreamDataset
from segany.data.streams.worker_notes import WorkerNotes, worker_death

log = logging.getLogger("segany.data")

VERSION = 2  # 1: positions carried in the samples (segany before torchdata)


def worker_states(loader_state: dict) -> dict:
    """{worker id: StreamDataset.state_dict()} inside one rank's StatefulDataLoader state
    (the layouts of torchdata 0.11: single-process and multi-worker)."""
    if "_snapshot" in loader_state:
        snaps = loader_state["_snapshot"]["_worker_snapshots"]
        return {int(k.rsplit("_", 1)[1]): v["dataset_state"] or {} for k, v in snaps.items()}
    return {0: loader_state.get("dataset_state") or {}}


class StreamLoader(StatefulDataLoader):
    """StatefulDataLoader over a training StreamDataset; same arguments."""

    _last_iter = None  # the latest iterator, kept through Lightning's teardown

    def __init__(self, dataset: StreamDataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.notes = WorkerNotes()
        dataset.notes = self.notes  # before the workers start: they get it with the dataset

    def worker_death(self, exc: BaseException):
        """The message naming the shard and key each dead worker was at, when `exc` is torch's
        error about dead workers of this loader; else None."""
        return worker_death(exc, self.notes, self.dataset.rank)

    def _epoch_drawn(self, local: dict) -> bool:
        """Whether every worker has drawn its whole epoch quota in this rank's loader state."""
        ds: StreamDataset = self.dataset
        workers = max(1, self.num_workers)
        states = worker_states(local)
        return all(states.get(w, {}).get("epoch_samples", 0) >= ds._quota(w, workers) for w in range(workers))

    def _restore(self, local: dict) -> None:
        if self._epoch_drawn(local):
            local = dict(local, _iterator_finished=True)
        super().load_state_dict(local)

    def __iter__(self):
        it = self._iterator
        if it is not None and not it._finished and not self._epoch_drawn(it.state_dict()):
            self._initial_iter_for_state_dict = False
            return it  # Lightning ended its epoch early: finish the stream's epoch first
        if it is None and self.next_iter_state is None and self._last_iter is not None:
            self._restore(self._last_iter.state_dict())  # Lightning's teardown dropped the iterator
        self._last_iter = super().__iter__()
        return self._last_iter

    def _local_state(self) -> dict:
        if self._iterator is None and self.next_iter_state is not None:
            return self.next_iter_state  # loaded, not iterated yet
        if self._iterator is None and self._last_iter is not None:
            return self._last_iter.state_dict()
        return super().state_dict()

    def state_dict(self) -> dict:
        ds: StreamDataset = self.dataset
        mine = {
            "rank": ds.rank,
            "world_size": ds.world_size,
            "num_workers": self.num_workers,
            "loader": self._local_state(),
        }
        everyone = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and ds.world_size > 1:
            everyone = [None] * ds.world_size
            torch.distributed.all_gather_object(everyone, mine)
        return {"version": VERSION, "seed": ds.seed, "ranks": everyone}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("version") != VERSION:
            raise ValueError(
                f"training loader state: unknown version {state_dict.get('version')!r} (expected {VERSION})"
            )
        ds: StreamDataset = self.dataset
        self._last_iter = None
        entry = next((r for r in state_dict["ranks"] if r["rank"] == ds.rank), None)
        if (
            entry is not None
            and entry["world_size"] == ds.world_size
            and entry["num_workers"] == self.num_workers
            and state_dict["seed"] == ds.seed
        ):
            self._restore(entry["loader"])
            return
        super().load_state_dict({})
        self.next_iter_state = None
        ds.load_state_dict({})
        first = state_dict["ranks"][0]
        done = sum(s.get("samples", 0) for r in state_dict["ranks"] for s in worker_states(r["loader"]).values())
        log.warning(
            "the saved data position (world size %s, %s workers, seed %s) does not fit this run "
            "(world size %s, %s workers, seed %s); streams restart from fresh positions seeded by the "
            "%d samples already consumed, so data is neither replayed nor resumed exactly",
            first["world_size"],
            first["num_workers"],
            state_dict["seed"],
            ds.world_size,
            self.num_workers,
            ds.seed,
            done,
        )
        ds.restart_salt = done

"""Per-worker sample streams: split by rank x worker, an epoch quota, resumable position,
fault counts attached to the samples.

Every DataLoader worker of every rank owns a slot (slot = rank * workers + worker) and
runs an endless, deterministic stream of records drawn by its own RNG (seeded from
seed, rank, worker). A training epoch is a quota cut from that stream: `epoch_length`
batches per rank, shared out between the workers. The worker's position (its source
position, RNG state, samples done in this epoch and in all; a few hundred bytes) is the
dataset's `state_dict()`, which torchdata's StatefulDataLoader (streams/loader.py) takes
in the worker after each batch and hands back through `load_state_dict()` after a
resume. Validation streams are finite, in a fixed order, and carry no state.

Epochs: each `iter()` starts a new epoch quota from where the stream stands, except the
first one after `load_state_dict()`, which finishes the epoch the saved state was in.
The decision is taken when `iter()` is called (not when the first sample is drawn):
StatefulDataLoader may build an iterator it never draws from.

Each worker notes what it is reading in a file outside itself (streams/worker_notes.py), so
that its death (the OOM killer, a crash in a decoder) is reported with the shard and key.
"""

from __future__ import annotations

import copy
import logging
import zlib
from typing import Iterator, Optional

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from segany.data.faults import FaultCounter, SampleFault
from segany.data.sample import Record, SampleConfig, make_sample

log = logging.getLogger("segany.data")

MAX_CONSECUTIVE_FAULTS = 1000


class StreamDataset(IterableDataset):
    """Base class. Subclasses provide the records:
    _fresh_position(rng, slot, n_slots) -> dict     initial source position (may use rng)
    _train_records(pos, rng, faults, slot, n_slots)  endless records; updates `pos` in place
                                                     before yielding each record
    _val_records(faults, slot, n_slots)              finite records of this slot
    """

    def __init__(
        self,
        cfg: SampleConfig,
        *,
        train: bool,
        batch_size: int = 1,
        epoch_length: Optional[int] = None,
        seed: int = 0,
        max_fault_warnings: int = 20,
    ):
        self.cfg = cfg
        self.train = train
        self.batch_size = int(batch_size)
        self.epoch_length = None if epoch_length is None else int(epoch_length)
        self.seed = int(seed)
        self.max_fault_warnings = max_fault_warnings
        self.rank, self.world_size = 0, 1
        self.restart_salt = 0  # != 0: saved positions did not fit this topology, reseed
        self._state: Optional[dict] = None  # this worker's position; None: not started
        self._finish_epoch = False  # the next iter() finishes the saved epoch
        self.notes = None  # WorkerNotes: what each worker reads (set by StreamLoader; streams/worker_notes.py)

    # -- position (torchdata Stateful protocol; called in the worker process) -------------
    def state_dict(self) -> dict:
        """{"worker", "num_workers", "samples", "epoch_samples", "rng", "position"} of this
        worker after its latest sample; {} before the first (not None: a None dataset state
        makes StatefulDataLoader fast-forward by re-reading the data)."""
        return copy.deepcopy(self._state) if self._state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._state = copy.deepcopy(state) if state else None
        self._finish_epoch = self._state is not None

    def set_topology(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in a world of {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        if not self.train or self.epoch_length is None:
            raise TypeError("only training streams with an epoch_length have a length")
        return self.epoch_length * self.batch_size

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, n_slots = self.rank * workers + worker, self.world_size * workers
        faults = FaultCounter(self.max_fault_warnings, where=f"rank {self.rank} worker {worker}")
        if not self.train:
            return self._val_iter(slot, n_slots, faults)
        if self._state is not None and self._state["worker"] != worker:
            raise ValueError(f"the saved position of worker {self._state['worker']} was handed to worker {worker}")
        if not self._finish_epoch and self._state is not None:
            self._state["epoch_samples"] = 0  # a new epoch quota from where the stream stands
        self._finish_epoch = False
        return self._train_iter(worker, workers, slot, n_slots, faults)

    def _sample(self, rec: Record, rng: np.random.Generator, faults: FaultCounter) -> Optional[dict]:
        try:
            return make_sample(rec, self.cfg, rng)
        except SampleFault as f:
            faults.add(f.kind, rec.source, rec.key, f.message)
        except Exception as exc:  # noqa: BLE001 - never let one sample end the run
            log.debug("sample %s of %s failed", rec.key, rec.source, exc_info=True)
            faults.add("sample_error", rec.source, rec.key, repr(exc))
        return None

    def _val_iter(self, slot, n_slots, faults) -> Iterator[dict]:
        held = None  # yielded one sample late, so that faults after the last one still ride along
        for rec in self._val_records(faults, slot, n_slots):
            rng = np.random.default_rng([self.seed, zlib.crc32(rec.key.encode())])
            sample = self._sample(rec, rng, faults)
            if sample is not None:
                if held is not None:
                    held["faults"] = faults.pop()
                    yield held
                held = sample
        if held is not None:
            held["faults"] = faults.pop()
            yield held

    def _quota(self, worker: int, workers: int) -> int:
        if self.epoch_length is None:
            raise ValueError("a training stream needs epoch_length (batches per rank per epoch)")
        batches = self.epoch_length // workers + (worker < self.epoch_length % workers)
        return batches * self.batch_size

    def _start(self, worker, slot, n_slots):
        """(position, rng, samples done, done in this epoch) of this worker: the current ones, else fresh."""
        saved = self._state
        if saved is not None:
            rng = np.random.Generator(np.random.PCG64(0))
            rng.bit_generator.state = saved["rng"]
            return copy.deepcopy(saved["position"]), rng, saved["samples"], saved["epoch_samples"]
        rng = np.random.default_rng([self.seed, self.rank, worker, self.restart_salt])
        return self._fresh_position(rng, slot, n_slots), rng, 0, 0

    def _note(self, worker: int, text: str) -> None:
        if self.notes is not None:
            self.notes.note(worker, text)

    def _train_iter(self, worker, workers, slot, n_slots, faults) -> Iterator[dict]:
        quota = self._quota(worker, workers)
        position, rng, done, produced = self._start(worker, slot, n_slots)
        records = self._train_records(position, rng, faults, slot, n_slots)
        failed, rec = 0, None
        while produced < quota:
            after = f"the record after shard {rec.source} key {rec.key}" if rec else "its first record"
            self._note(worker, f"while reading {after}")
            rec = next(records)
            self._note(worker, f"while decoding shard {rec.source} key {rec.key} (epoch sample {produced + 1})")
            sample = self._sample(rec, np.random.default_rng(int(rng.integers(2**63))), faults)
            if sample is None:
                failed += 1
                if failed >= MAX_CONSECUTIVE_FAULTS:
                    raise RuntimeError(
                        f"{failed} consecutive samples were skipped as faulty (rank {self.rank}, "
                        f"worker {worker}, last {rec.source} {rec.key}); see the warnings"
                    )
                continue
            failed = 0
            produced += 1
            done += 1
            sample["faults"] = faults.pop()
            self._state = {
                "worker": worker,
                "num_workers": workers,
                "samples": done,
                "epoch_samples": produced,
                "rng": rng.bit_generator.state,
                "position": copy.deepcopy(position),
            }
            self._note(worker, f"after decoding shard {rec.source} key {rec.key} (batching it, or waiting)")
            yield sample

    # -- subclass interface --------------------------------------------------------------
    def _fresh_position(self, rng, slot, n_slots) -> dict:
        raise NotImplementedError

    def _train_records(self, position, rng, faults, slot, n_slots) -> Iterator[Record]:
        raise NotImplementedError

    def _val_records(self, faults, slot, n_slots) -> Iterator[Record]:
        raise NotImplementedError

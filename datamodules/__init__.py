"""Data for segany: SA-1B shards (webdataset-style tars), COCO / LVIS, synthetic scenes.

Every datamodule yields the batch format of docs/contracts.md (see sample.py)."""
from .coco import CocoDataModule
from .constants import PIXEL_MEAN, PIXEL_STD
from .faults import FAULT_KINDS, FaultCounter, SampleFault
from .mixture import SA1BMixtureDataModule
from .sa1b import SA1BDataModule
from .sample import Record, SampleConfig, collate, make_sample
from .synthetic import SyntheticDataModule

__all__ = ["CocoDataModule", "SA1BDataModule", "SA1BMixtureDataModule", "SyntheticDataModule", "SampleConfig",
           "Record", "make_sample", "collate", "FAULT_KINDS", "FaultCounter", "SampleFault", "PIXEL_MEAN", "PIXEL_STD"]

"""Data for segany: SA-1B shards (webdataset-style tars), COCO / LVIS, image folders with mask PNGs
or labelme json, synthetic scenes, the interactive-segmentation benchmarks in RITM's layout.

Every datamodule yields the batch format of docs/contracts.md (see sample.py)."""

from segany.data.datamodules.coco import CocoDataModule
from segany.data.datamodules.folder import FolderDataModule
from segany.data.datamodules.mixed import MixedDataModule
from segany.data.datamodules.mixture import SA1BMixtureDataModule
from segany.data.datamodules.ritm import RitmDataModule
from segany.data.datamodules.sa1b import SA1BDataModule
from segany.data.datamodules.synthetic import SyntheticDataModule
from segany.data.faults import FAULT_KINDS, FaultCounter, SampleFault
from segany.data.sample import Record, SampleConfig, collate, make_sample
from segany.modeling.constants import PIXEL_MEAN, PIXEL_STD

__all__ = [
    "CocoDataModule",
    "FolderDataModule",
    "MixedDataModule",
    "RitmDataModule",
    "SA1BDataModule",
    "SA1BMixtureDataModule",
    "SyntheticDataModule",
    "SampleConfig",
    "Record",
    "make_sample",
    "collate",
    "FAULT_KINDS",
    "FaultCounter",
    "SampleFault",
    "PIXEL_MEAN",
    "PIXEL_STD",
]

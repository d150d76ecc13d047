"""One precision vocabulary (fp32 | bf16 | auto): auto follows the device's bf16 units, with the
capability checks mocked both ways; the old spellings are refused with the word to use."""

import logging

import pytest
import torch
from helpers import compose

from segany.inference.predictor import SamPredictor, autocast_context
from segany.training.config import check_train_config
from segany.training.embedding_cache import EmbeddingCache
from segany.utils import precision as P


@pytest.fixture
def cpu_units(monkeypatch):
    """cpu_units(avx512_bf16, amx): the CPU capability checks answer as given."""

    def set_units(avx512_bf16: bool, amx: bool = False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        P._said.clear()

    return set_units


@pytest.mark.parametrize("avx, amx, picked", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_auto_on_the_cpu_follows_its_bf16_units(cpu_units, caplog, avx, amx, picked):
    cpu_units(avx, amx)
    with caplog.at_level(logging.INFO, logger="segany"):
        assert P.resolve_precision("auto", "cpu") == picked
    said = caplog.text
    assert f"precision=auto: {picked}" in said
    has = said.split("CPU has ")[1].split(")")[0]
    words = {(True, False): "AVX512-BF16", (False, True): "AMX", (False, False): "neither AVX512-BF16 nor AMX"}
    assert has == words[avx, amx]
    assert P.trainer_precision("auto", "cpu") == {"bf16": "bf16-mixed", "fp32": "32-true"}[picked]
    # the explicit words never look at the device
    assert P.resolve_precision("fp32", "cpu") == "fp32" and P.resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_a_gpu_asks_cuda(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mock GPU")
    assert P.resolve_precision("auto", "cuda") == ("bf16" if supported else "fp32")
    # Lightning's accelerator=auto runs on the GPU when there is one
    assert P.trainer_precision("auto", "auto") == ("bf16-mixed" if supported else "32-true")


@pytest.mark.parametrize("old, new", [("bf16-mixed", "bf16"), ("32-true", "fp32"), ("bfloat16", "bf16")])
def test_old_spellings_name_the_new_word(old, new):
    with pytest.raises(ValueError, match=f"use precision={new}"):
        P.check_precision(old)
    with pytest.raises(ValueError, match=f"use precision={new}"):
        SamPredictor.__init__(object.__new__(SamPredictor), None, precision=old)
    with pytest.raises(ValueError, match="module.embedding_cache.dtype"):
        EmbeddingCache(dtype=old)


@pytest.mark.parametrize("avx", [True, False])
def test_the_train_config_follows_precision(cpu_units, avx):
    cpu_units(avx)
    cfg = compose("precision=auto", "optim.fused=false")  # the demo: trainer=cpu
    assert cfg.trainer.precision == ("bf16-mixed" if avx else "32-true")
    check_train_config(cfg)
    assert compose("precision=fp32").trainer.precision == "32-true"
    assert compose("precision=bf16", "optim.fused=false").trainer.precision == "bf16-mixed"
    assert compose().precision == "fp32"  # the demo's own choice (its fused AdamW)
    # FSDP's parameter dtype follows
    fsdp = compose("experiment=vit_h_sa1b", "precision=bf16", "trainer.strategy.data_parallel_size=1")
    assert fsdp.module.sharding.param_dtype == "bf16"
    fsdp = compose("experiment=vit_h_sa1b", "precision=fp32", "trainer.strategy.data_parallel_size=1")
    assert fsdp.module.sharding.param_dtype is None
    with pytest.raises(ValueError, match="use precision=bf16"):
        check_train_config(compose("precision=bf16-mixed", "trainer.precision=32-true"))


@pytest.mark.parametrize("avx", [True, False])
def test_inference_autocast_follows_precision(cpu_units, avx):
    cpu_units(avx)
    x = torch.randn(4, 8)
    with autocast_context("auto", torch.device("cpu")):
        y = x @ x.T
    assert y.dtype == (torch.bfloat16 if avx else torch.float32)
    with autocast_context("fp32", torch.device("cpu")):
        assert (x @ x.T).dtype == torch.float32

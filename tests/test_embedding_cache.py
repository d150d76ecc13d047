"""The embedding cache (segany/training/embedding_cache.py): cached training equals uncached
training, stale entries are never used, augmentations are refused, writes are atomic."""

import copy
import glob
import os
import subprocess
import sys

import pytest
import torch

import segany
from segany.testing.toy import toy_batch
from segany.training import EmbeddingCache, PromptConfig, SamLoss, SamModule, simulate


@pytest.fixture(scope="module")
def tiny():
    # the vit_tiny geometry (256 px) with 2 blocks and a narrow decoder, as tests/test_training.py
    torch.manual_seed(0)
    return segany.build_sam("vit_tiny", depth=2, global_attn_indexes=(1,), prompt_embed_dim=64, decoder_mlp_dim=128)


def _module(model, cache=None):
    return SamModule(copy.deepcopy(model), freeze_image_encoder=True, embedding_cache=cache).train()


def _step(module, batch, emb=None, seed=0):
    """One training step's loss and gradients (what SamModule.training_step computes before
    the cross-rank normalisation), prompts drawn from `seed`."""
    module.zero_grad(set_to_none=True)
    if emb is None:
        emb = module.embed(batch["image"], batch["image_id"])
    torch.manual_seed(seed)
    out = simulate(module.model, emb, batch, PromptConfig(point_rounds=1, mask_rounds=1, resolution="low"), SamLoss())
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


def _entries(root):
    return sorted(glob.glob(os.path.join(str(root), "*", "*", "*.pt")))


def test_cached_training_gives_the_same_loss_and_gradients(tiny, tmp_path):
    """float32 storage: the cached path (first step: computed and stored; second: read back
    from disk) gives bit-identical loss and gradients to the plain frozen-encoder path."""
    batch = toy_batch(2, 2, 256, generator=torch.Generator().manual_seed(1))
    plain = _module(tiny)
    cached = _module(tiny, EmbeddingCache(enabled=True, dir=str(tmp_path), dtype="fp32"))
    loss0, g0 = _step(plain, batch)
    assert set(g0) and not any(n.startswith("image_encoder.") for n in g0)
    for expected_hits in (0, 2):
        loss, g = _step(cached, batch)
        assert cached.embedding_cache.hits == expected_hits
        assert torch.equal(loss, loss0)
        assert g.keys() == g0.keys()
        for n in g0:
            assert torch.equal(g[n], g0[n]), n
    assert len(_entries(tmp_path)) == 2


def test_bf16_cache_equals_the_uncached_path_on_bf16_rounded_embeddings(tiny, tmp_path):
    """bf16 storage (the default): the decoder sees the encoder's output rounded to bf16, on the
    step that computes it and on every later one; so the loss and gradients equal (exactly) the
    uncached path fed with emb.bfloat16().float(). Against the unrounded embeddings they differ
    by bf16's rounding (8-bit mantissa: relative 2^-9 per value), checked at 1e-2 on the loss."""
    batch = toy_batch(2, 2, 256, generator=torch.Generator().manual_seed(2))
    plain = _module(tiny)
    with torch.no_grad():
        emb = plain.model.image_encoder(batch["image"])
    loss_r, g_r = _step(plain, batch, emb=emb.bfloat16().float())
    loss_f, _ = _step(plain, batch, emb=emb)
    cached = _module(tiny, EmbeddingCache(enabled=True, dir=str(tmp_path)))
    for _ in range(2):  # miss, then hit
        loss, g = _step(cached, batch)
        assert torch.equal(loss, loss_r)
        for n in g_r:
            assert torch.equal(g[n], g_r[n]), n
    assert cached.embedding_cache.hits == 2
    assert not torch.equal(loss_r, loss_f) and abs(loss_r - loss_f) < 1e-2 * abs(loss_f)
    stored = torch.load(_entries(tmp_path)[0], weights_only=True)
    assert stored["embedding"].dtype == torch.bfloat16 and stored["embedding"].shape == (64, 16, 16)


def test_a_changed_encoder_weight_or_img_size_misses_the_cache(tiny, tmp_path):
    batch = toy_batch(2, 2, 256, generator=torch.Generator().manual_seed(3))
    first = EmbeddingCache(enabled=True, dir=str(tmp_path))
    first.embed(tiny.image_encoder, batch["image"], batch["image_id"])
    # the same weights in another model object (a new run): hits
    again = EmbeddingCache(enabled=True, dir=str(tmp_path))
    again.embed(copy.deepcopy(tiny.image_encoder), batch["image"], batch["image_id"])
    assert (again.hits, again.misses) == (2, 0)
    # one weight changed by 1e-3: another namespace, misses, and its own embeddings
    changed = copy.deepcopy(tiny.image_encoder)
    with torch.no_grad():
        changed.neck[0].weight[0, 0, 0, 0] += 1e-3
    other = EmbeddingCache(enabled=True, dir=str(tmp_path))
    emb = other.embed(changed, batch["image"], batch["image_id"])
    assert (other.hits, other.misses) == (0, 2)
    with torch.no_grad():
        assert torch.equal(emb, changed(batch["image"]).bfloat16().float())
    assert len(_entries(tmp_path)) == 4
    # img_size, storage dtype and the data's JPEG decoding each give another namespace
    names = {first.namespace(tiny.image_encoder, 256), first.namespace(tiny.image_encoder, 512)}
    f32 = EmbeddingCache(enabled=True, dir=str(tmp_path), dtype="fp32")
    names.add(f32.namespace(tiny.image_encoder, 256))
    full_jpeg = EmbeddingCache(enabled=True, dir=str(tmp_path))
    full_jpeg.data_settings = {"fast_jpeg": False}
    names.add(full_jpeg.namespace(tiny.image_encoder, 256))
    assert len(names) == 4


def test_an_image_that_is_not_the_cached_one_fails_naming_its_key(tiny, tmp_path):
    batch = toy_batch(1, 2, 256, generator=torch.Generator().manual_seed(4))
    cache = EmbeddingCache(enabled=True, dir=str(tmp_path))
    cache.embed(tiny.image_encoder, batch["image"], ["img_7"])
    cache.embed(tiny.image_encoder, batch["image"].clone(), ["img_7"])  # the same image: a hit
    assert cache.hits == 1
    with pytest.raises(ValueError, match="'img_7' is not the image cached"):
        cache.embed(tiny.image_encoder, batch["image"].flip(-1), ["img_7"])  # a horizontal flip
    # one image twice in a batch: computed once; two images under one key: refused
    twice = torch.cat([batch["image"], batch["image"]])
    emb = cache.embed(tiny.image_encoder, twice, ["img_8", "img_8"])
    assert cache.misses == 2 and torch.equal(emb[0], emb[1]) and len(_entries(tmp_path)) == 2
    with pytest.raises(ValueError, match="'img_9' is not the image cached under that key in row 0"):
        cache.embed(tiny.image_encoder, torch.cat([batch["image"], batch["image"].flip(-1)]), ["img_9"] * 2)


def test_flip_or_jitter_with_the_cache_on_fails_naming_the_key(tmp_path):
    from segany.data import SyntheticDataModule

    cache = EmbeddingCache(enabled=True, dir=str(tmp_path))
    cache.check_augmentations(SyntheticDataModule(root=str(tmp_path / "syn")))  # no augmentation: fine
    assert cache.data_settings == {"fast_jpeg": True}
    with pytest.raises(ValueError, match=r"data\.flip=0\.5"):
        cache.check_augmentations(SyntheticDataModule(root=str(tmp_path / "syn"), flip=True))
    with pytest.raises(ValueError, match=r"data\.jitter=true"):
        cache.check_augmentations(SyntheticDataModule(root=str(tmp_path / "syn"), jitter=True))


def test_the_cache_needs_a_frozen_encoder(tiny, tmp_path):
    with pytest.raises(ValueError, match="module.freeze_image_encoder=true"):
        SamModule(copy.deepcopy(tiny), embedding_cache=EmbeddingCache(enabled=True, dir=str(tmp_path)))
    with pytest.raises(ValueError, match="module.embedding_cache.dir"):
        EmbeddingCache(enabled=True)
    off = SamModule(copy.deepcopy(tiny), embedding_cache=EmbeddingCache())  # the default: off
    assert off.embedding_cache is None


# EmbeddingCache.store's write (segany.utils.io.atomic_torch_save), killed half-way through torch.save
KILLED_WRITER = """
import os, signal, sys, torch
from segany.utils.io import atomic_torch_save
def half_then_die(obj, f):
    f.write(b"PK" + bytes(4000)); f.flush(); os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
atomic_torch_save({"key": "img_0", "embedding": torch.ones(64, 16, 16, dtype=torch.bfloat16)}, sys.argv[1])
"""


def test_a_killed_write_leaves_no_corrupt_entry(tiny, tmp_path):
    batch = toy_batch(1, 2, 256, generator=torch.Generator().manual_seed(5))
    cache = EmbeddingCache(enabled=True, dir=str(tmp_path))
    ns = cache.namespace(tiny.image_encoder, 256)
    path = cache.entry_path(ns, "img_0")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, path], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not os.path.exists(path) and glob.glob(path + ".tmp-*")  # only the writer's temporary file
    assert cache.load(ns, "img_0") is None
    emb = cache.embed(tiny.image_encoder, batch["image"], ["img_0"])  # a miss: computed and stored
    assert cache.misses == 1 and torch.equal(cache.load(ns, "img_0")["embedding"].float(), emb[0])


def test_a_damaged_entry_is_recomputed(tiny, tmp_path, caplog):
    batch = toy_batch(1, 2, 256, generator=torch.Generator().manual_seed(6))
    cache = EmbeddingCache(enabled=True, dir=str(tmp_path))
    emb = cache.embed(tiny.image_encoder, batch["image"], ["img_0"])
    path = _entries(tmp_path)[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    again = EmbeddingCache(enabled=True, dir=str(tmp_path))
    assert torch.equal(again.embed(tiny.image_encoder, batch["image"], ["img_0"]), emb)
    assert again.misses == 1 and "unreadable" in caplog.text
    assert torch.equal(again.load(again.namespace(tiny.image_encoder, 256), "img_0")["embedding"].float(), emb[0])


def _demo_cfg(tmp_path, *overrides):
    from helpers import compose

    return compose(
        "~logger",
        f"paths.root_dir={tmp_path}",
        f"data.root={tmp_path}/synthetic",
        "data.num_workers=0",
        "data.num_train=4",
        "data.num_val=2",
        "data.shard_size=2",
        "data.max_masks=2",
        "data.batch_size=2",
        "trainer.max_steps=6",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "~callbacks.time_budget",
        "prompting.point_rounds=1",
        "module.freeze_image_encoder=true",
        "module.embedding_cache.enabled=true",
        *overrides,
    )


def test_train_py_fills_and_reuses_the_cache(tmp_path):
    """train.py with module.embedding_cache.enabled=true: training_step looks up the batch's
    image_id; 6 steps x 2 images (drawn with replacement) over 4 training images embed each
    image once; validation caches under val/<image_id>."""
    import train

    # validation: the sanity check and after epoch 2, on the 2 validation images (sa_4, sa_5)
    cfg = _demo_cfg(tmp_path, "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=2")
    module, datamodule, trainer = train.build(cfg)
    trainer.fit(module, datamodule=datamodule)
    cache = module.embedding_cache
    entries = _entries(tmp_path / "embedding_cache")
    keys = {torch.load(p, weights_only=True)["key"] for p in entries}
    assert len(entries) == cache.misses <= 6
    assert {k for k in keys if k.startswith("val/")} == {"val/sa_4", "val/sa_5"}  # validation: its own keys
    assert keys - {"val/sa_4", "val/sa_5"} <= {f"sa_{i}" for i in range(4)}
    assert cache.hits >= 2 + 2  # training: >= 6 distinct-per-step lookups, <= 4 misses; validation: 2


def test_train_py_refuses_flip_with_the_cache_naming_the_key(tmp_path):
    import train

    module, datamodule, trainer = train.build(_demo_cfg(tmp_path, "data.flip=true"))
    with pytest.raises(ValueError, match=r"data\.flip=0\.5 would make every cached embedding stale"):
        trainer.fit(module, datamodule=datamodule)
    assert not _entries(tmp_path / "embedding_cache")

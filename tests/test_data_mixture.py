"""SA1BMixtureDataModule: sources drawn in the stated proportions (checked statistically on
hand-made shard sets), per-source filters, fixed subsets, exact resume; SA1BDataModule's
train_num_shards subset; errors naming the key."""

import zlib

import numpy as np
import pytest
from scipy import stats

from segany.data import SA1BDataModule, SA1BMixtureDataModule
from segany.testing.data import jpeg, sa1b_json, write_tar

SIDE = 32


def masks_of(i):
    """two masks per image: the left half and the top-right quarter."""
    a = np.zeros((SIDE, SIDE), bool)
    a[:, : SIDE // 2] = True
    b = np.zeros((SIDE, SIDE), bool)
    b[: SIDE // 2, SIDE // 2 :] = True
    return [a, b]


def write_source(root, prefix, n_shards, per_shard):
    """n_shards tars <prefix>_<s>.tar of images <prefix><id>; mask 0 has predicted_iou 0.5,
    mask 1 0.95. Returns the brace spec and the keys of each shard."""
    img = np.full((SIDE, SIDE, 3), 128, np.uint8)
    keys = []
    for s in range(n_shards):
        members, shard_keys = [], []
        for j in range(per_shard):
            i = s * per_shard + j
            key = f"{prefix}{i}"
            meta = sa1b_json(i, masks_of(i), predicted_iou=[0.5, 0.95])
            members += [(f"{key}.jpg", jpeg(img)), (f"{key}.json", meta)]
            shard_keys.append(key)
        write_tar(str(root / f"{prefix}_{s}.tar"), members)
        keys.append(shard_keys)
    return str(root / f"{prefix}_{{0..{n_shards - 1}}}.tar"), keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return {name: write_source(root, name, 3, 4) for name in ("manual", "semi", "auto")}


def mixture(shards, sources, epoch_length=100, batch_size=10, **kw):
    spec = {name: dict({"shards": shards[name][0]}, **src) for name, src in sources.items()}
    dm = SA1BMixtureDataModule(
        sources=spec,
        img_size=SIDE,
        batch_size=batch_size,
        num_workers=0,
        epoch_length=epoch_length,
        seed=3,
        interleave=2,
        **kw,
    )
    return dm


def drawn(dm):
    """(source prefix, key, mask_ids) of every training sample of one epoch."""
    out = []
    for batch in dm.train_dataloader():
        for key, ids, valid in zip(batch["image_id"], batch["mask_ids"], batch["valid"]):
            out.append((key.rstrip("0123456789"), key, set(ids[valid].tolist())))
    return out


def test_sources_are_drawn_in_the_stated_proportions(shards):
    # the paper's data-engine mixture in miniature: manual and semi-automatic images
    # oversampled 10x relative to automatic ones (weighting: per_image)
    sources = {
        "manual": {"weight": 10, "num_images": 12},
        "semi": {"weight": 10, "num_images": 18},
        "auto": {"weight": 1, "num_images": 1100},
    }
    dm = mixture(shards, sources, weighting="per_image", epoch_length=300)
    expect = {"manual": 120 / 1400, "semi": 180 / 1400, "auto": 1100 / 1400}  # by hand
    assert dm.probabilities == pytest.approx(expect)
    samples = drawn(dm)
    n = len(samples)
    assert n == 3000
    counts = {s: sum(1 for src, _, _ in samples if src == s) for s in expect}
    # chi-square goodness of fit at the 0.1% level, and each count within 4.5 sigma
    chi2 = stats.chisquare([counts[s] for s in expect], [n * p for p in expect.values()])
    assert chi2.pvalue > 1e-3, (counts, chi2)
    for s, p in expect.items():
        assert abs(counts[s] - n * p) < 4.5 * np.sqrt(n * p * (1 - p)), (s, counts)


def test_use_selects_sources_and_proportion_weighting(shards):
    sources = {"manual": {"weight": 1.0}, "semi": {"weight": 3.0}, "auto": {"weight": 100.0}}
    dm = mixture(shards, sources, use=["manual", "semi"], epoch_length=100)
    assert dm.probabilities == pytest.approx({"manual": 0.25, "semi": 0.75})
    samples = drawn(dm)
    counts = {s: sum(1 for src, _, _ in samples if src == s) for s in ("manual", "semi", "auto")}
    assert counts["auto"] == 0
    assert stats.binomtest(counts["manual"], len(samples), 0.25).pvalue > 1e-3, counts
    # weight 0 switches a source off
    dm = mixture(shards, {"manual": {"weight": 0.0}, "semi": {"weight": 1.0}}, epoch_length=5)
    assert set(dm.probabilities) == {"semi"} and {s for s, _, _ in drawn(dm)} == {"semi"}


def test_per_source_filters_and_subsets(shards):
    frac = 0.5
    sources = {
        "manual": {"weight": 1, "min_predicted_iou": 0.9, "num_shards": 1},  # mask filter + first shard only
        "semi": {"weight": 1, "image_fraction": frac},  # fixed half of the images
        "auto": {"weight": 1},  # no filter
    }
    samples = drawn(mixture(shards, sources, epoch_length=60))
    seen = {s: {k for src, k, _ in samples if src == s} for s in sources}
    ids = {s: set().union(*[i for src, _, i in samples if src == s]) for s in sources}
    # manual: only shard 0's images, and only the masks with predicted_iou >= 0.9 (index 1)
    assert seen["manual"] == set(shards["manual"][1][0])
    assert ids["manual"] == {int(k[len("manual") :]) * 1000 + 1 for k in seen["manual"]}
    # semi: exactly the images whose key hashes below the fraction (computed here from the key)
    all_semi = [k for shard in shards["semi"][1] for k in shard]
    keep = {k for k in all_semi if zlib.crc32(k.encode()) / 2**32 < frac}
    assert 0 < len(keep) < len(all_semi) and seen["semi"] == keep
    # auto: every image of every shard, both masks
    assert seen["auto"] == {k for shard in shards["auto"][1] for k in shard}
    assert ids["auto"] == {int(k[len("auto") :]) * 1000 + j for k in seen["auto"] for j in (0, 1)}


def test_mixture_position_resumes_exactly(shards):
    sources = {"manual": {"weight": 1}, "semi": {"weight": 2}, "auto": {"weight": 1, "max_masks": 1}}
    dm = mixture(shards, sources, epoch_length=6, batch_size=4)
    dm.setup("fit")
    ds = dm.train_dataset
    ds.epoch_length = 6
    full = []
    for s in iter(ds):
        full.append(s)
        if len(full) == 10:
            state = ds.state_dict()  # the position after 10 of the epoch's 6 x 4 samples
    keys = [s["image_id"] for s in full]
    ds.load_state_dict(state)
    rest = [s["image_id"] for s in iter(ds)]
    assert len(keys) == 24 and rest == keys[10:]  # the rest of that epoch, none replayed or skipped
    # per-source max_masks applied to that source only
    n_masks = {s["image_id"].rstrip("0123456789"): s["masks"].shape[0] for s in full}
    assert n_masks.get("auto", 1) == 1 and 2 in (n_masks.get("manual"), n_masks.get("semi"))


def test_sa1b_train_num_shards_is_a_fixed_prefix(shards):
    spec, keys = shards["auto"]
    dm = SA1BDataModule(
        train_shards=spec,
        train_num_shards=2,
        img_size=SIDE,
        batch_size=8,
        num_workers=0,
        epoch_length=10,
        seed=0,
        interleave=2,
    )
    seen = {k for b in dm.train_dataloader() for k in b["image_id"]}
    assert seen == set(keys[0] + keys[1])
    with pytest.raises(ValueError, match="data.train_num_shards=5: the shard list has only 3"):
        SA1BDataModule(train_shards=spec, train_num_shards=5, img_size=SIDE, epoch_length=1).setup("fit")
    with pytest.raises(ValueError, match="data.train_num_shards"):
        SA1BDataModule(train_shards=spec, train_num_shards=0, img_size=SIDE)


@pytest.mark.parametrize(
    "sources,kw,match",
    [
        ({"a": {"weight": 1}}, {}, r"data.sources.a.shards is not set"),
        ({"a": {"shards": "x.tar", "wieght": 1}}, {}, r"data.sources.a: unknown key\(s\) \['wieght'\]"),
        ({"a": {"shards": "x.tar", "weight": -1}}, {}, r"data.sources.a.weight=-1"),
        ({"a": {"shards": "x.tar", "image_fraction": 1.5}}, {}, r"data.sources.a.image_fraction=1.5"),
        ({"a": {"shards": "x.tar"}}, {"weighting": "per_image"}, r"num_images; missing for \['a'\]"),
        ({"a": {"shards": "x.tar"}}, {"weighting": "by_mask"}, r"data.weighting='by_mask'"),
        ({"a": {"shards": "x.tar"}}, {"use": ["b"]}, r"data.use=\['b'\]"),
        ({"a": {"shards": "x.tar", "weight": 0}}, {}, r"every selected source has weight 0"),
        ({"a": {"shards": "x.tar"}}, {"train_shards": "y.tar"}, r"data.train_shards"),
    ],
)
def test_bad_mixture_config_names_the_key(sources, kw, match):
    with pytest.raises(ValueError, match=match):
        SA1BMixtureDataModule(sources=sources, img_size=SIDE, **kw)


def test_bad_per_source_sample_key_names_the_source(shards):
    dm = mixture(shards, {"manual": {"max_masks": 0}})
    with pytest.raises(ValueError, match="data.sources.manual: max_masks must be >= 1"):
        dm.setup("fit")


def test_mixture_delivers_each_sources_clip_embeddings(tmp_path):
    """data.clip_sidecar reaches every source: hand-made sidecars whose rows encode the annotation
    id beside source 'a''s shards; source 'b' has none (its masks get no text prompt)."""
    import glob
    import json

    from segany.data.faults import FaultCounter
    from segany.data.formats import clip_sidecar
    from segany.data.streams.reader import read_pairs

    shards = {name: write_source(tmp_path, name, 2, 3) for name in ("a", "b")}
    for shard in sorted(glob.glob(str(tmp_path / "a_*.tar"))):
        anns = [x for p in read_pairs(shard, 0, FaultCounter(5)) for x in json.loads(p.json)["annotations"]]
        ids = np.array([x["id"] for x in anns], np.int64)
        clip_sidecar.write(clip_sidecar.sidecar_path(shard), ids, np.stack([ids % 1000, ids // 1000], 1), {})
    dm = mixture(shards, {"a": {}, "b": {}}, epoch_length=6, batch_size=4, clip_sidecar=".clip.npz")
    dm.setup("fit")
    seen = {"a": 0, "b": 0}
    for batch in dm.train_dataloader():
        for key, ids, valid, has, emb in zip(
            batch["image_id"], batch["mask_ids"], batch["valid"], batch["has_clip"], batch["clip"]
        ):
            src = key.rstrip("0123456789")
            seen[src] += 1
            assert has[valid].all() if src == "a" else not has.any()
            for i, e in zip(ids[valid], emb[valid]):
                want = (int(i) % 1000, int(i) // 1000) if src == "a" else (0, 0)
                assert (int(e[0]), int(e[1])) == want
    assert seen["a"] > 0 and seen["b"] > 0

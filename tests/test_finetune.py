"""experiment=finetune: the architecture comes from the checkpoint (an official-format .pth of a
non-standard size, written here with the official `segment_anything` package, needs no model
overrides); the before/after table of a tiny run equals evaluate.py on the checkpoints it
started from and ended with; validation loaders keep their workers; general data mixes into
COCO fine-tuning batches."""

import json
import sys
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import compose

import segany
from segany.modeling.build import VARIANTS
from segany.modeling.checkpoint import load_model
from segany.modeling.checkpoint.infer import infer_architecture

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = dict(img_size=128, embed_dim=64, depth=3, num_heads=2, global_attn_indexes=(1,), window_size=4)
CUSTOM_DECODER = dict(prompt_embed_dim=64, decoder_heads=2, decoder_mlp_dim=256, iou_head_hidden_dim=64)


def _official_custom_sam(seed=0):
    """segment_anything's Sam of the CUSTOM size: 128 px, 64-wide 3-block encoder (block 1
    global, windows of 4), 64-wide decoder with 2 heads."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    c, grid = CUSTOM, CUSTOM["img_size"] // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=c["img_size"],
            patch_size=16,
            embed_dim=c["embed_dim"],
            depth=c["depth"],
            num_heads=c["num_heads"],
            mlp_ratio=4.0,
            out_chans=64,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=c["global_attn_indexes"],
            window_size=c["window_size"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=64, image_embedding_size=(grid, grid), input_image_size=(128, 128), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=256, num_heads=2),
            transformer_dim=64,
            iou_head_depth=3,
            iou_head_hidden_dim=64,
        ),
    )
    with torch.no_grad():  # the zero-initialised position tables too, so that loading them counts
        for name, p in sam.named_parameters():
            if "pos" in name:
                p.normal_(0, 0.02)
    return sam.eval()


def test_released_sizes_are_recognised_from_their_shapes():
    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            sd = segany.build_sam(name).state_dict()
        arch = infer_architecture(sd)
        v = VARIANTS[name]
        assert arch["variant"] == name
        assert (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["img_size"]) == (
            v.embed_dim,
            v.depth,
            v.num_heads,
            1024,
        )
        assert arch["global_attn_indexes"] == list(v.global_attn_indexes) and arch["window_size"] == 14


def test_official_pth_of_a_custom_size_builds_with_no_model_overrides(tmp_path):
    import train

    official = _official_custom_sam()
    path = tmp_path / "sam_custom.pth"
    torch.save(official.state_dict(), path)
    cfg = compose(
        "experiment=finetune",
        f"model.checkpoint={path}",
        "data=synthetic",
        "data.img_size=null",
        f"paths.root_dir={tmp_path}/runs",
        "~logger",
        "~callbacks.forgetting",
    )
    module, datamodule, _ = train.build(cfg)
    model = module.model.eval()
    got = {k: getattr(model.config, k) for k in {**CUSTOM, **CUSTOM_DECODER}}
    assert got == {**CUSTOM, **CUSTOM_DECODER}
    assert cfg.data.img_size == 128 and datamodule.cfg.img_size == 128  # the data follows the model
    assert module.freeze["image_encoder"] and not any(p.requires_grad for p in model.image_encoder.parameters())
    stored = module.run_config["model"]  # what the fine-tuned checkpoints will say they are
    assert stored["img_size"] == 128 and stored["embed_dim"] == 64 and stored["global_attn_indexes"] == [1]

    # the loaded model computes what the official one does (independent truth: segment_anything)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        emb_official = official.image_encoder(x)
        emb = model.image_encoder(x)
        torch.testing.assert_close(emb, emb_official, atol=1e-4, rtol=1e-4)
        pts = (torch.tensor([[[40.0, 60.0]]]), torch.tensor([[1]]))
        sparse, dense = official.prompt_encoder(points=pts, boxes=None, masks=None)
        want = official.mask_decoder(emb_official, official.prompt_encoder.get_dense_pe(), sparse, dense, True)
        sparse, dense = model.prompt_encoder(points=pts, boxes=None, masks=None)
        out = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
        for a, b in zip(out, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    # a size key that contradicts the checkpoint is refused, naming it
    bad = compose("experiment=finetune", f"model.checkpoint={path}", "+model.embed_dim=96", "data=synthetic")
    with pytest.raises(Exception, match="contradicts it: embed_dim=96"):
        train.build(bad)


SYN = ["data.num_train=4", "data.num_val=2", "data.shard_size=4", "data.min_side=64", "data.max_side=96"]


def _tiny_run_checkpoint(tmp_path) -> Path:
    """A train.py-style .ckpt of a non-standard tiny model (64 px, 2 blocks, 64-wide decoder)."""
    arch = dict(img_size=64, depth=2, global_attn_indexes=[1], window_size=2, prompt_embed_dim=64)
    arch.update(decoder_heads=2, decoder_mlp_dim=256)
    torch.manual_seed(0)
    model = segany.build_sam("vit_tiny", **arch)
    path = tmp_path / "start" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    node = {"_target_": "segany.build_sam", "variant": "vit_tiny", **arch}
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": 5, "segany_config": {"model": node}}, path)
    return path


def _direct(tmp_path, ckpt, root, seed, out):
    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    cfg = compose(
        f"checkpoint={ckpt}",
        f"output_dir={out}",
        f"data.root={root}",
        f"data.data_seed={seed}",
        *SYN,
        "data.num_workers=0",
        "data.batch_size=2",
        "max_batches=1",
        "points.clicks=[1,3]",
        name="evaluate",
    )
    return evaluate_script.evaluate(cfg)["points"]["datasets"]["synthetic"]


@pytest.mark.slow  # a 2-step run and 6 evaluations: ~25 s on 2 CPU cores
def test_forgetting_table_equals_direct_evaluation(tmp_path):
    """A 2-step fine-tuning run from a non-standard .ckpt: the before/after table (target and
    general side by side) holds evaluate.py's figures on the start and the final checkpoint."""
    import train

    # one thread: multi-threaded CPU kernels may sum in a different order from call to call
    # (thread scheduling), and a logit flipping sign at a mask border moves the next click
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _forgetting_run(tmp_path, train)
    finally:
        torch.set_num_threads(threads)


def _forgetting_run(tmp_path, train):
    start = _tiny_run_checkpoint(tmp_path)
    target, general = tmp_path / "target", tmp_path / "general"
    cfg = compose(
        "experiment=finetune",
        f"model.checkpoint={start}",
        "data=synthetic",
        "data.img_size=null",
        f"data.root={target}",
        *SYN,
        "data.num_workers=0",
        "data.batch_size=2",
        "data.max_masks=2",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "optim.warmup_iters=0",
        "optim.lr=1e-3",
        "prompting.point_rounds=1",
        "prompting.mask_rounds=0",
        f"paths.root_dir={tmp_path}/runs",
        "logger=csv",
        f"callbacks.forgetting.datasets.general.root={general}",
        "callbacks.forgetting.datasets.general.data_seed=1",
        *[f"callbacks.forgetting.datasets.general.{o.split('.', 1)[1]}" for o in SYN],
        "callbacks.forgetting.datasets.general.batch_size=2",
        "callbacks.forgetting.max_batches=1",
        "callbacks.forgetting.settings={points: {clicks: [1, 3]}}",
        "callbacks.forgetting.metrics=[points/miou@1,points/miou@3]",
    )
    train.train(cfg)
    run = Path(cfg.paths.run_dir)
    table = json.loads((run / "forgetting.json").read_text())
    assert table["steps"] == {"before": 0, "after": 2} and table["datasets"] == ["target", "general"]
    md = (run / "forgetting.md").read_text()
    assert "target before (step 0)" in md and "general after (step 2)" in md
    last = run / "checkpoints" / "last.ckpt"
    model, _ = load_model(str(last))  # the fine-tuned checkpoint carries the non-standard architecture
    assert model.config.img_size == 64 and model.config.depth == 2 and model.config.prompt_embed_dim == 64
    before_sd, after_sd = (torch.load(p, weights_only=True)["state_dict"] for p in (start, last))
    key = "model.mask_decoder.iou_token.weight"
    assert not torch.equal(before_sd[key], after_sd[key])  # before and after are different models
    enc = [k for k in before_sd if k.startswith("model.image_encoder.")]
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in enc)  # the encoder was frozen
    rows = {(r["dataset"], r["metric"], w): r[w] for r in table["rows"] for w in ("before", "after")}
    for dname, root, seed in (("target", target, 0), ("general", general, 1)):
        for when, ckpt in (("before", start), ("after", last)):
            got = _direct(tmp_path, ckpt, root, seed, tmp_path / f"direct-{dname}-{when}")
            # click 1 is the GT mask's centre: exact. Click 3 follows the model's earlier errors, and a
            # border logit within rounding of 0 (summation order of CPU kernels varies between calls,
            # even on one thread) can move it: seen as 0.03383 vs 0.03407 on the shared machine
            for m, tol in (("miou@1", 1e-6), ("miou@3", 5e-3)):
                assert rows[(dname, f"points/{m}", when)] == pytest.approx(got[m], abs=tol), (dname, when, m)


def test_validation_loader_keeps_its_workers(tmp_path):
    from segany.data import CocoDataModule

    ann, images = _coco(tmp_path)
    kw = dict(val_annotations=str(ann), val_images=str(images), img_size=64, num_workers=1)
    dm = CocoDataModule(**kw)  # persistent_workers: true is the default
    loader = dm.val_dataloader()
    assert loader.persistent_workers
    first = [b["image_id"] for b in loader]
    it = loader._iterator
    pids = [w.pid for w in it._workers]
    second = [b["image_id"] for b in loader]
    assert loader._iterator is it and [w.pid for w in it._workers] == pids and all(w.is_alive() for w in it._workers)
    assert first == second == [["1"]]  # the same batches from the same worker processes
    off = CocoDataModule(**kw, persistent_workers=False).val_dataloader()
    assert not off.persistent_workers
    assert [b["image_id"] for b in off] == [["1"]]
    assert off._iterator is None  # nothing kept: workers start again on the next pass


def _coco(root: Path):
    """A one-image COCO split (id 1): a 96x128 JPEG with two rectangles (polygons)."""
    (root / "val").mkdir(parents=True)
    image = np.full((96, 128, 3), 40, np.uint8)
    image[10:40, 10:60] = (200, 60, 60)
    image[50:90, 70:120] = (60, 200, 60)
    cv2.imwrite(str(root / "val" / "a.jpg"), image[..., ::-1])
    anns = [
        {
            "id": i + 1,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            "area": float((x1 - x0) * (y1 - y0)),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
        }
        for i, (x0, y0, x1, y1) in enumerate([(10, 10, 60, 40), (70, 50, 120, 90)])
    ]
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "height": 96, "width": 128}], "annotations": anns}
    path = root / "val.json"
    path.write_text(json.dumps(doc))
    return path, root / "val"


def test_general_data_mixes_into_coco_batches(tmp_path):
    """+mix=synthetic over a COCO data config: about `share` of the training samples are synthetic
    scenes, made at the COCO config's input size; validation stays COCO's."""
    from hydra.utils import instantiate

    ann, images = _coco(tmp_path)
    cfg = compose(
        "experiment=finetune",
        "model.checkpoint=null",
        f"data.train_annotations={ann}",
        f"data.train_images={images}",
        f"data.val_annotations={ann}",
        f"data.val_images={images}",
        "data.img_size=64",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.epoch_length=20",
        "+mix=synthetic",
        "mix.share=0.25",
        f"mix.general.root={tmp_path}/syn",
        *[f"mix.general.{o.split('.', 1)[1]}" for o in SYN],
    )
    dm = instantiate(cfg.mix, target=instantiate(cfg.data))
    dm.prepare_data()
    ids = []
    for batch in dm.train_dataloader():
        assert batch["image"].shape[-2:] == (64, 64)
        ids += batch["image_id"]
    assert len(ids) == 40
    n_general = sum(i != "1" for i in ids)
    assert 4 <= n_general <= 18  # binomial(40, 0.25): mean 10, this range holds with p > 0.995
    assert all(i == "1" or i.startswith("sa_") for i in ids)
    assert [b["image_id"] for b in dm.val_dataloader()] == [["1"]]
    with pytest.raises(Exception, match="mix.share=1.0"):
        instantiate(cfg.mix, target=instantiate(cfg.data), share=1.0)

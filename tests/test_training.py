"""Optimiser groups, schedule, and the prompting simulation on the tiny model."""

import pytest
import torch

import segany
from segany.testing.toy import toy_batch
from segany.training import PromptConfig, SamLoss, SamOptim, WarmupStepDecay, param_groups, simulate


@pytest.fixture(scope="module")
def tiny():
    # the vit_tiny geometry (256 px, 16x16 tokens, 64x64 masks) with a narrow decoder and 2
    # blocks: the logic under test is the same, the CPU time a fraction
    torch.manual_seed(0)
    return segany.build_sam("vit_tiny", depth=2, global_attn_indexes=(1,), prompt_embed_dim=64, decoder_mlp_dim=128)


# ---------------------------------------------------------------- optimiser
def _lr_of(opt, param):
    for g in opt.param_groups:
        if any(p is param for p in g["params"]):
            return g["lr"], g["weight_decay"]
    raise KeyError


def test_layer_decay_groups_get_the_stated_lrs(tiny):
    base, decay, depth = 1e-3, 0.5, 2
    opt, sched = SamOptim(lr=base, layer_decay=decay, weight_decay=0.1, warmup_iters=0)(tiny)
    enc = tiny.image_encoder
    for i, blk in enumerate(enc.blocks):
        lr, wd = _lr_of(opt, blk.attn.qkv.weight)
        assert lr == pytest.approx(base * decay ** (depth - i)) and wd == 0.1
        lr, wd = _lr_of(opt, blk.attn.qkv.bias)
        assert lr == pytest.approx(base * decay ** (depth - i)) and wd == 0.0
        assert _lr_of(opt, blk.attn.rel_pos_h)[1] == 0.0
        assert _lr_of(opt, blk.norm1.weight)[1] == 0.0
    assert _lr_of(opt, enc.patch_embed.proj.weight) == (pytest.approx(base * decay**3), 0.1)
    assert _lr_of(opt, enc.pos_embed) == (pytest.approx(base * decay**3), 0.0)
    assert _lr_of(opt, enc.neck[0].weight) == (pytest.approx(base), 0.1)
    assert _lr_of(opt, tiny.mask_decoder.iou_token.weight) == (pytest.approx(base), 0.1)
    assert _lr_of(opt, tiny.prompt_encoder.mask_downscaling[0].bias) == (pytest.approx(base), 0.0)
    # every trainable parameter exactly once
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(tiny.parameters()))


def test_every_parameter_gets_its_hand_computed_layer_scale_and_decay(tiny):
    # the rule, written out: embeddings 0, block i -> i + 1, the rest depth + 1; scale
    # decay^(depth + 1 - id); no weight decay on 1-d tensors and names containing a key
    base, decay, depth, keys = 1e-3, 0.7, 2, ("pos_embed", "rel_pos", "iou_token")
    groups = param_groups(tiny, base, 0.05, decay, no_decay_keys=keys)
    got = {n: (g["lr"], g["lr_scale"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert len(got) == len(list(tiny.parameters()))
    for name, p in tiny.named_parameters():
        if name.startswith(("image_encoder.patch_embed.", "image_encoder.pos_embed")):
            lid = 0
        elif name.startswith("image_encoder.blocks."):
            lid = int(name.split(".")[2]) + 1
        else:
            lid = depth + 1
        scale = decay ** (depth + 1 - lid)
        wd = 0.0 if p.ndim <= 1 or any(k in name for k in keys) else 0.05
        assert got[name] == (pytest.approx(base * scale), pytest.approx(scale), wd), name
    for g in groups:  # one group per (layer, decay?), named after it
        scales = {got[n][1] for n in g["names"]}
        assert len(scales) == 1 and g["name"].endswith("_decay" if g["weight_decay"] else "_no_decay")
    assert tiny.mask_decoder.iou_token.weight.ndim == 2 and got["mask_decoder.iou_token.weight"][2] == 0.0


def test_scheduler_scales_each_groups_own_lr(tiny):
    opt, sched = SamOptim(
        lr=1.0, layer_decay=0.5, warmup_iters=4, warmup_start_factor=0.0, milestones=[0.6, 0.8], gamma=0.1
    )(tiny, max_steps=10)
    initial = [g["initial_lr"] for g in opt.param_groups]
    assert initial == pytest.approx(sorted(initial, key=lambda _: 0)) and max(initial) == 1.0
    factors = []
    for step in range(10):
        factors.append([g["lr"] / i for g, i in zip(opt.param_groups, initial)])
        opt.step()
        sched.step()
    expected = [0, 0.25, 0.5, 0.75, 1, 1, 0.1, 0.1, 0.01, 0.01]
    for f, e in zip(factors, expected):
        assert f == pytest.approx([e] * len(initial))


def test_schedule_per_milestone_factors_and_errors():
    s = WarmupStepDecay(warmup_iters=0, milestones=[0.1, 0.2], gamma=[0.5, 0.2], max_steps=100)
    assert s.milestones == [10, 20] and [s(0), s(9), s(10), s(19), s(25)] == pytest.approx([1, 1, 0.5, 0.5, 0.1])
    s.set_max_steps(50)  # fractions of the run: a shorter run moves them
    assert s.milestones == [5, 10] and [s(4), s(5), s(10)] == pytest.approx([1, 0.5, 0.1])
    with pytest.raises(ValueError, match="optim.gamma"):
        WarmupStepDecay(milestones=[0.1, 0.2], gamma=[0.1])
    for bad in ([0.5, 0.2], [0.5, 1.5], [0.0], [60000]):
        with pytest.raises(ValueError, match="optim.milestones"):
            WarmupStepDecay(milestones=bad)
    with pytest.raises(ValueError, match="trainer.max_steps"):  # fractions of an unset run length
        WarmupStepDecay(milestones=[0.5]).set_max_steps(-1)
    assert WarmupStepDecay(warmup_iters=2, start_factor=0.0)(1) == 0.5  # no fractions: no run length needed


def test_warmup_starts_above_zero_by_default():
    """The first update is not wasted: factor(0) = 1 / warmup_iters, linear to 1 at warmup_iters."""
    s = WarmupStepDecay(warmup_iters=250)
    assert s(0) == pytest.approx(1 / 250) and s(125) == pytest.approx(1 / 250 + (1 - 1 / 250) / 2) and s(250) == 1
    assert SamOptim().schedule(0) > 0  # the config default (optim.warmup_start_factor: null)
    with pytest.raises(ValueError, match="optim.warmup_start_factor"):
        WarmupStepDecay(start_factor=1.5)


def test_schedule_linear_cooldown():
    # warmup 4, lr / 2 at 8, then a ramp 1 -> 0.1 over steps 10..20 on top of it
    s = WarmupStepDecay(
        warmup_iters=4,
        start_factor=0.0,
        milestones=[0.4],
        gamma=0.5,
        cooldown=[0.5, 1.0],
        cooldown_final=0.1,
        max_steps=20,
    )
    steps = [0, 2, 4, 8, 10, 15, 19, 20, 30]
    expected = [0, 0.5, 1, 0.5, 0.5, 0.5 * 0.55, 0.5 * 0.19, 0.05, 0.05]  # 1 - 0.9 x (step - 10) / 10
    assert [s(t) for t in steps] == pytest.approx(expected)
    for bad in ([0.5], [1.0, 0.5], [0.5, 0.5], [0.5, 1.5]):
        with pytest.raises(ValueError, match="optim.cooldown"):
            WarmupStepDecay(cooldown=bad)
    with pytest.raises(ValueError, match="optim.cooldown_final"):
        WarmupStepDecay(cooldown=[0.1, 0.2], cooldown_final=2.0)


def test_frozen_parts_are_left_out(tiny):
    tiny.image_encoder.requires_grad_(False)
    try:
        groups = param_groups(tiny, 1e-3, 0.1, 0.8)
        names = [n for g in groups for n in g["names"]]
        assert names and not any(n.startswith("image_encoder.") for n in names)
    finally:
        tiny.image_encoder.requires_grad_(True)


# ---------------------------------------------------------------- simulation
def _run(model, batch, cfg, seed=0, grad=True):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        emb = model.image_encoder(batch["image"])
        out = simulate(model, emb, batch, cfg, SamLoss())
        if grad:
            out["loss"].backward()
    return out


def test_eleven_predictions_with_the_two_mask_rounds(tiny, monkeypatch):
    batch = toy_batch(1, 2, 256)
    calls = []
    orig_pe = tiny.prompt_encoder.forward

    def spy(points, boxes, masks, tokens=None):
        calls.append((tokens[1].clone(), masks is None))
        return orig_pe(points, boxes, masks, tokens=tokens)

    monkeypatch.setattr(tiny.prompt_encoder, "forward", spy)
    cfg = PromptConfig(p_box=0.0)
    out = _run(tiny, batch, cfg, grad=False)
    sched = out["schedule"]
    assert len(calls) == 11 and len(sched) == 11
    n_points = [int((lab >= 0).sum(1).max()) for lab, _ in calls]
    expected, n = [], 1
    for kind in sched:
        n += kind == "point"
        expected.append(n)
    assert n_points == expected  # mask rounds add no point
    # the release's layout in every round: the points, then exactly one PAD (no extra pads)
    for lab, _ in calls:
        assert (lab[:, :-1] >= 0).all() and (lab[:, -1] == -1).all()
    assert calls[0][1] and not any(m for _, m in calls[1:])  # mask prompt from round 1 on
    assert n_points[-1] == 9 and sched[-1] == "mask"
    assert out["round_loss"].shape == (11,) and (out["round_loss"] > 0).all()


def _grad_hook_on_decoder(model, monkeypatch, store):
    orig = model.mask_decoder.predict_masks

    def wrapped(*a, **k):
        masks, iou = orig(*a, **k)
        if masks.requires_grad:
            masks.register_hook(lambda g: store.append(g.clone()))
        return masks, iou

    monkeypatch.setattr(model.mask_decoder, "predict_masks", wrapped)


def test_multimask_backprops_exactly_one_mask_per_target(tiny, monkeypatch):
    batch = toy_batch(2, 8, 256, num_valid=6)
    grads = []
    _grad_hook_on_decoder(tiny, monkeypatch, grads)
    torch.manual_seed(3)
    cfg = PromptConfig(point_rounds=0, mask_rounds=0, p_box=0.5)
    from segany.training import prompting

    seen = {}
    orig_init = prompting.initial_prompts

    def spy(*a, **k):
        out = orig_init(*a, **k)
        seen["is_box"] = out.is_box
        return out

    monkeypatch.setattr("segany.training.simulation.initial_prompts", spy)
    _run(tiny, batch, cfg, seed=3)
    g = grads[0].flatten(2).abs().sum(-1) > 0  # (R, 4) tokens with gradient
    # padding rows are not decoded at all: the decoder saw the 2 x 6 valid rows only
    assert g.shape[0] == int(batch["valid"].sum()) == 12
    is_box = seen["is_box"]
    assert (~is_box).any() and is_box.any()
    pt, bx = ~is_box, is_box
    assert (g[pt, 0] == 0).all() and (g[pt, 1:].sum(1) == 1).all()  # one of the 3 multimask outputs
    assert (g[bx, 0]).all() and (g[bx, 1:] == 0).all()  # box: the single-mask output


def test_invalid_masks_contribute_nothing(tiny):
    cfg = PromptConfig(point_rounds=1, mask_rounds=1)
    a = toy_batch(2, 4, 256, num_valid=2, generator=torch.Generator().manual_seed(5))
    b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.items()}
    # garbage in the padding rows of b: masks and boxes that would give large losses
    b["masks"][:, 2:] = True
    b["masks_lowres"][:, 2:] = True
    b["boxes"][:, 2:] = torch.tensor([0.0, 0.0, 255.0, 255.0])
    out_a = _run(tiny, a, cfg, seed=1)
    ga = [p.grad.clone() for p in tiny.parameters()]
    out_b = _run(tiny, b, cfg, seed=1)
    gb = [p.grad.clone() for p in tiny.parameters()]
    assert torch.allclose(out_a["loss"], out_b["loss"])
    assert out_a["n_valid"] == out_b["n_valid"] == 4
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4)


def test_round_checkpointing_and_chunking_give_the_same_loss_and_gradients(tiny):
    batch = toy_batch(2, 4, 256, num_valid=3, generator=torch.Generator().manual_seed(2))
    base = PromptConfig(point_rounds=2, mask_rounds=1)
    out_a = _run(tiny, batch, base, seed=7)
    ga = [p.grad.clone() for p in tiny.parameters()]
    out_b = _run(tiny, batch, PromptConfig(point_rounds=2, mask_rounds=1, checkpoint_rounds=True), seed=7)
    gb = [p.grad.clone() for p in tiny.parameters()]
    assert torch.allclose(out_a["loss"], out_b["loss"], rtol=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-3)
    # chunks draw their random numbers in a different order: same statistics, not the same draws
    out_c = _run(tiny, batch, PromptConfig(point_rounds=2, mask_rounds=1, checkpoint_rounds=True, mask_chunk=2), seed=7)
    assert torch.isfinite(out_c["loss"]) and out_c["n_valid"] == 6


def test_feedback_gradient_switch(tiny):
    batch = toy_batch(1, 2, 256)
    for detach in (True, False):
        _run(tiny, batch, PromptConfig(point_rounds=1, mask_rounds=0, p_box=1.0, detach_feedback=detach))
        g = tiny.prompt_encoder.mask_downscaling[0].weight.grad
        # the mask prompt embedding always learns; only the path into the previous round differs
        assert g is not None and g.abs().sum() > 0


def test_later_round_weight_scales_the_rounds_after_the_first(tiny):
    """loss = round 0's loss + w x the later rounds' (the per-round sums are unweighted)."""
    batch = toy_batch(1, 2, 256, generator=torch.Generator().manual_seed(3))
    for w in (1.0, 0.25):
        cfg = PromptConfig(point_rounds=2, mask_rounds=1, later_round_weight=w)
        out = _run(tiny, batch, cfg, seed=11, grad=False)
        rl = out["round_loss"]
        assert torch.allclose(out["loss"], rl[0] + w * rl[1:].sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="later_round_weight"):
        PromptConfig(later_round_weight=-1.0)


def test_full_resolution_losses(tiny):
    batch = toy_batch(1, 2, 256)
    out = _run(tiny, batch, PromptConfig(point_rounds=1, mask_rounds=0, resolution="full"), grad=False)
    assert torch.isfinite(out["loss"]) and out["round_iou"].shape == (2,)


# ---------------------------------------------------------------- logger
def test_wandb_is_offline_without_credentials(tmp_path, monkeypatch):
    from segany.utils.wandb import wandb_credentials, wandb_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login a password b\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_credentials()
    logger = wandb_logger(save_dir=str(tmp_path / "run"), name="t")
    assert logger._offline and __import__("os").environ["WANDB_MODE"] == "offline"
    netrc.write_text("machine api.wandb.ai login user password k\n")
    netrc.chmod(0o600)
    assert wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials()


def test_wandb_offline_unless_credentials_or_told(tmp_path, monkeypatch):
    """The one rule the training logger and the evaluation report share."""
    from segany.utils.wandb import wandb_offline

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    assert wandb_offline() and not wandb_offline(False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline() and wandb_offline(True)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_offline()


def test_validation_images_draw_predictions_outlines_and_clicks():
    """draw_masks: predicted pixels blended with their colour, the GT outline white, the click dot."""
    import numpy as np

    from segany.testing.toy import toy_batch
    from segany.training.visualize import draw_masks

    batch = toy_batch(batch_size=2, num_masks=2, img_size=64, generator=torch.Generator().manual_seed(0))
    batch["input_size"] = torch.tensor([[64, 64], [48, 64]])
    pred = batch["masks"].clone()
    clicks = torch.tensor([[[10.0, 12.0], [40.0, 30.0]]] * 2)
    images = draw_masks(batch, pred, clicks, max_images=2)
    assert [im.shape for im in images] == [(64, 64, 3), (48, 64, 3)] and images[0].dtype == np.uint8
    img0 = (
        (
            batch["image"][0].permute(1, 2, 0) * torch.tensor([58.395, 57.12, 57.375])
            + torch.tensor([123.675, 116.28, 103.53])
        )
        .clamp(0, 255)
        .numpy()
    )
    changed = np.abs(images[0].astype(float) - img0).sum(-1) > 3
    inside = batch["masks"][0].any(0).numpy()
    assert changed[inside].mean() > 0.9  # every predicted pixel is coloured
    far = ~inside
    far[:20, :20] = False
    far[25:35, 35:45] = False  # around the click dots
    assert changed[far].mean() < 0.1


def test_packed_rows_meet_their_own_image(tiny):
    """Images with different mask counts: the padded batch gives the sum of each image alone
    (deterministic prompts: exact GT boxes, one round), so every packed row was decoded
    against its own image's embedding."""
    cfg = PromptConfig(point_rounds=0, mask_rounds=0, p_box=1.0, box_noise_frac=0.0)
    batch = toy_batch(2, 3, 256, generator=torch.Generator().manual_seed(4))
    batch["valid"][0, 1:] = False  # image 0: 1 mask, image 1: 3
    for k in ("masks", "masks_lowres"):
        batch[k][0, 1:] = False
    batch["boxes"][0, 1:] = 0.0
    singles = []
    for b, n in ((0, 1), (1, 3)):
        one = {
            k: (
                v[b : b + 1, :n]
                if k in ("masks", "masks_lowres", "valid", "boxes", "mask_ids")
                else v[b : b + 1]
                if torch.is_tensor(v)
                else v
            )
            for k, v in batch.items()
        }
        singles.append(_run(tiny, one, cfg, grad=False)["loss"])
    both = _run(tiny, batch, cfg, grad=False)
    assert both["n_valid"] == 4
    assert torch.allclose(both["loss"], singles[0] + singles[1], rtol=1e-5)


def test_a_batch_without_valid_masks_gives_zero_loss_and_gradient(tiny):
    batch = toy_batch(2, 2, 256, num_valid=0)
    out = _run(tiny, batch, PromptConfig(point_rounds=1, mask_rounds=1))
    assert out["n_valid"] == 0 and out["loss"].item() == 0.0
    dec = [p.grad for p in tiny.mask_decoder.parameters()]
    assert all(g is not None and (g == 0).all() for g in dec)


# ---------------------------------------------------------------- full-resolution targets
def test_a_2px_line_at_1024_has_a_target_and_the_right_iou_target():
    """At 1024 px a 2 px wide line vanishes from the S/4 target (the old default taught "predict
    nothing" for a prompt on it); at full resolution the target is the line itself, and the IoU
    target is the actual IoU: 1 for the exact line, 1/2 for the line grown to 4 px."""
    from segany.training.simulation import loss_targets

    S = 1024
    masks = torch.zeros(1, 1, S, S, dtype=torch.bool)
    masks[0, 0, 301:303, 100:900] = True  # 2 px wide, 800 px long
    batch = {"masks": masks}
    assert not loss_targets(batch, "low").any()  # the S/4 target is empty
    full = loss_targets(batch, "full")[:, 0]  # (1, S, S)
    assert torch.equal(full, masks[:, 0])
    exact = torch.where(full, 10.0, -10.0)[:, None]  # (1, 1, S, S) logits
    grown = torch.zeros(1, 1, S, S)
    grown[..., 300:304, 100:900] = 10.0
    grown[grown == 0] = -10.0
    loss = SamLoss(iou_weight=1.0)
    ones = torch.ones(1, dtype=torch.bool)
    assert loss(exact, torch.ones(1, 1), full, ones)["true_iou"].item() == 1.0
    assert loss(grown, torch.ones(1, 1), full, ones)["true_iou"].item() == 0.5


def test_every_training_click_agrees_with_the_full_resolution_gt(tiny, monkeypatch):
    """resolution=full: each corrective click's label is the GT at the clicked pixel of the
    full-resolution mask (thin lines and small discs included), and every click lies in the image
    content (input_size), not in the padding."""
    from segany.training import prompting, simulation

    g = torch.Generator().manual_seed(0)
    batch = toy_batch(2, 4, 256, generator=g)
    masks = batch["masks"]
    masks[:, 0] = False
    masks[:, 0, 60:62, 20:200] = True  # 2 px lines
    masks[:, 1] = False
    masks[:, 1, 100:105, 100:105] = True  # 5 px squares
    batch["input_size"] = torch.tensor([[256, 256], [200, 230]])
    masks[1, :, 200:] = False
    masks[1, :, :, 230:] = False
    seen = []
    orig = prompting.error_points

    def spy(*a, **k):
        coords, labels = orig(*a, **k)
        seen.append((coords.clone(), labels.clone()))
        return coords, labels

    monkeypatch.setattr(simulation, "error_points", spy)
    _run(tiny, batch, PromptConfig(point_rounds=4, mask_rounds=1, resolution="full", ignore_padding=True), grad=False)
    assert len(seen) == 4
    rows = batch["valid"].view(-1).nonzero().squeeze(1)
    gt = masks.view(-1, 256, 256)[rows]
    hw = batch["input_size"][rows // 4]
    for coords, labels in seen:
        x, y = coords[:, 0, 0].long(), coords[:, 0, 1].long()
        assert torch.equal(coords[:, 0], coords[:, 0].round())  # full-resolution pixels
        assert ((y < hw[:, 0]) & (x < hw[:, 1])).all()
        assert torch.equal(labels[:, 0] == 1, gt[torch.arange(len(rows)), y, x])
        assert (labels >= 0).all()

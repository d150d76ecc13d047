"""HQ-SAM training (experiment=hq_sam): its prompts (a box, 10 points or the noisy GT mask alone),
only the HQ parts training on a frozen SAM, the loss on the HQ mask, and the click protocol on an
HQ model. Truths: hand-made masks, the release's `masks_noise` rule written out here, and the
gradients autograd leaves on each parameter."""

import pytest
import torch
import torch.nn.functional as F

import segany
from segany.evaluation.protocol import ClickProtocol, interactive_eval
from segany.modeling.constants import PAD, POS
from segany.testing.toy import toy_batch
from segany.training import PromptConfig, SamLoss, SamModule, simulate
from segany.training.prompting import initial_prompts, noisy_mask_prompt, sample_uniform_k

HQ_PARTS = [r"mask_decoder\.(hf_token|hf_mlp|compress_vit_feat|embedding_encoder|embedding_maskfeature)\."]
HQ_PROMPTS = dict(point_rounds=0, mask_rounds=0, p_mask=1 / 3, p_box=0.5, init_points=10, box_noise_frac=0.0)


@pytest.fixture(scope="module")
def hq_tiny():
    torch.manual_seed(0)
    m = segany.build_sam("vit_tiny", img_size=64, window_size=4, hq_token=True)
    with torch.no_grad():  # non-trivial zero-initialised tensors (the HQ token's convs included)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def test_k_points_are_distinct_pixels_of_the_mask_and_a_small_mask_pads():
    region = torch.zeros(2, 8, 8, dtype=torch.bool)
    region[0, 2:6, 2:6] = True  # 16 pixels
    region[1, 0, :3] = True  # 3 pixels: 3 found, 7 not
    yx, found = sample_uniform_k(region, 10, torch.Generator().manual_seed(0))
    assert found[0].all() and found[1].tolist() == [True] * 3 + [False] * 7
    pix = yx[0].tolist()
    assert len({tuple(p) for p in pix}) == 10 and all(region[0, y, x] for y, x in pix)
    assert {tuple(p) for p in yx[1, :3].tolist()} == {(0, 0), (0, 1), (0, 2)}


def test_noisy_mask_prompt_changes_only_the_incoherent_boundary_region():
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 16:48, 16:48] = True
    out = noisy_mask_prompt(masks, 16, 255.0, torch.Generator().manual_seed(0))  # (1, 1, 16, 16)
    assert out.shape == (1, 1, 16, 16) and set(out.unique().tolist()) <= {0.0, 255.0}
    m = F.interpolate(masks[:, None].float(), (16, 16), mode="bilinear", align_corners=False)
    back = F.interpolate(F.interpolate(m, (2, 2), mode="bilinear"), (16, 16), mode="bilinear")
    calm = (m - back).abs() < 0.01  # outside the incoherent region the prompt is the GT exactly
    assert torch.equal((out > 0)[calm], (m > 0.5)[calm])
    assert not calm.all()  # and the region exists (near the square's edges)


def test_hq_prompts_mix_boxes_ten_points_and_masks_in_thirds():
    g = torch.Generator().manual_seed(0)
    b = toy_batch(batch_size=1, num_masks=600, img_size=64, generator=g)
    R = 600
    cfg = PromptConfig(**HQ_PROMPTS)
    p = initial_prompts(b["masks"][0], b["boxes"][0], b["valid"][0], b["input_size"].expand(R, 2), cfg, g)
    share = [float(x.float().mean()) for x in (p.is_box, p.is_mask, ~p.is_box & ~p.is_mask)]
    assert all(abs(s - 1 / 3) < 0.06 for s in share), share
    coords, labels = p.tokens()
    assert coords.shape[1] == labels.shape[1] == 11  # 10 points + PAD; boxes padded to the same length
    pts = ~p.is_box & ~p.is_mask
    assert (labels[pts][:, :10] == POS).all() and (labels[pts][:, 10] == PAD).all()
    assert (labels[p.is_mask] == PAD).all()  # the mask alone
    assert (labels[p.is_box][:, :2] == torch.tensor([2, 3])).all() and (labels[p.is_box][:, 2:] == PAD).all()
    exact = b["boxes"][0][p.is_box].clamp(max=63)  # the GT boxes, inside the 64 px image (noise 0)
    assert torch.equal(coords[p.is_box][:, :2].reshape(-1, 4), exact)
    assert not p.ambiguous.any()  # no multimask with 10 points


def test_mask_rows_get_their_mask_and_the_others_no_mask_embedding(hq_tiny):
    pe = hq_tiny.prompt_encoder
    masks = torch.randn(3, 1, 16, 16) * 100
    has = torch.tensor([True, False, True])
    coords, labels = torch.zeros(3, 2, 2), torch.full((3, 2), PAD)
    _, dense = pe(None, None, masks, tokens=(coords, labels), has_mask=has)
    _, with_mask = pe(None, None, masks, tokens=(coords, labels))
    _, without = pe(None, None, None, tokens=(coords, labels))
    assert torch.equal(dense[has], with_mask[has]) and torch.equal(dense[~has], without[~has])


def test_only_the_hq_parts_train_and_the_loss_sees_the_hq_mask(hq_tiny):
    module = SamModule(hq_tiny, prompting=PromptConfig(**HQ_PROMPTS), loss=SamLoss(iou_weight=0.0), trainable=HQ_PARTS)
    assert module.freeze == {"image_encoder": True, "prompt_encoder": True, "mask_decoder": False}
    trainable = {n for n, p in hq_tiny.named_parameters() if p.requires_grad}
    assert trainable and all(".hf_" in n or "compress_vit_feat" in n or "embedding_" in n for n in trainable)
    b = toy_batch(batch_size=2, num_masks=3, img_size=64, generator=torch.Generator().manual_seed(1))
    hq_tiny.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    emb, interm = module.embed(b["image"])
    assert interm.shape == (2, 192, 4, 4) and not emb.requires_grad
    out = simulate(hq_tiny, emb, b, module.prompting, module.loss_fn, interm=interm)
    out["loss"].backward()
    grads = {n for n, p in hq_tiny.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == trainable  # every HQ part gets a gradient, nothing else

    # the loss is the HQ mask's: with "sum" (SAM's + HQ's) the same prompts give another loss
    torch.manual_seed(0)
    with torch.no_grad():
        hq_loss = simulate(hq_tiny, emb, b, module.prompting, module.loss_fn, interm=interm)["loss"]
        torch.manual_seed(0)
        cfg = PromptConfig(**{**HQ_PROMPTS, "hq_output": "sum"})
        sum_loss = simulate(hq_tiny, emb, b, cfg, module.loss_fn, interm=interm)["loss"]
    assert torch.isclose(hq_loss, out["loss"]) and not torch.isclose(hq_loss, sum_loss)


def test_trainable_patterns_must_match_and_hq_refuses_the_embedding_cache(hq_tiny, tmp_path):
    with pytest.raises(ValueError, match="match no parameter"):
        SamModule(segany.build_sam("vit_tiny", img_size=64, window_size=4), trainable=["mask_decoder\\.hf_"])
    from segany.training import EmbeddingCache

    with pytest.raises(ValueError, match="early features"):
        SamModule(
            hq_tiny,
            freeze_image_encoder=True,
            embedding_cache=EmbeddingCache(enabled=True, dir=str(tmp_path)),
            trainable=HQ_PARTS,
        )


def test_click_protocol_scores_the_hq_output(hq_tiny):
    b = toy_batch(batch_size=1, num_masks=2, img_size=64, generator=torch.Generator().manual_seed(2))
    hq_tiny.eval()
    with torch.no_grad():
        emb, interm = hq_tiny.encode_image(b["image"], return_interm=True)
        ev_sum = interactive_eval(hq_tiny, b, ClickProtocol(clicks=(1, 2)))
        ev_hq = interactive_eval(hq_tiny, b, ClickProtocol(clicks=(1, 2), hq_output="hq"), emb, interm)
        # click 1 by hand: the centre click, the HQ mask alone, IoU with the GT
        from segany.evaluation.clicks import Clicker

        gt = b["masks"][0]
        pts = [Clicker(gt[i].numpy()).click() for i in range(2)]
        coords = torch.tensor([[[p[1], p[0]]] for p in pts], dtype=torch.float)
        low, _ = hq_tiny.decode(
            emb, coords[None], torch.full((1, 2, 1), POS), interm_embeddings=interm, hq_token_only=True
        )
        full = F.interpolate(low[0], (64, 64), mode="bilinear", align_corners=False)[:, 0] > 0
        iou = ((full & gt).sum((1, 2)) / (full | gt).sum((1, 2)).clamp(min=1)).tolist()
    assert ev_hq["iou"][1] == pytest.approx(iou, abs=1e-6)
    assert ev_sum["iou"][1] != pytest.approx(ev_hq["iou"][1], abs=1e-6)
    with pytest.raises(ValueError, match="interm"):
        interactive_eval(hq_tiny, b, ClickProtocol(clicks=(1,)), emb)

"""EfficientViT-SAM image encoder (segany/modeling/light/efficientvit.py) against a transcription of the release
(tests/reference/efficientvit_sam.py): key mapping both ways, shapes read back from a state dict, and embeddings
equal to the release's with every weight and BatchNorm statistic random."""

import pytest
import torch

from segany.modeling.light.efficientvit import (
    EFFICIENTVIT_SAM_L,
    RELEASE_ANCHOR,
    RELEASE_UNUSED,
    EfficientViTEncoder,
    from_release,
    release_args,
    to_release,
)
from tests.reference.efficientvit_sam import efficientvit_sam_encoder


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic drawn from a seeded generator (fan-in scaled weights, norm scales
    around 1, small shifts), so a wrongly mapped or unused tensor shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def pair(name: str, img_size: int, seed: int = 0):
    ref = randomize_(efficientvit_sam_encoder(name, upsample_size=img_size // 8), seed)
    ours = EfficientViTEncoder(img_size=img_size, **EFFICIENTVIT_SAM_L[name]).eval()
    ours.load_state_dict(from_release(ref.state_dict()), strict=True)
    return ref, ours


def max_diff(ref, ours, x):
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.shape == b.shape
    return (a - b).abs().max().item(), b


@pytest.mark.parametrize("name", ["l0", "l2"])
def test_parity_small(name):
    ref, ours = pair(name, 128)
    x = torch.randn(2, 3, 128, 128)
    diff, out = max_diff(ref, ours, x)
    assert out.shape == (2, 256, 16, 16)
    assert diff < 1e-4
    assert out.std() > 0.5  # the final LayerNorm's output, not a collapsed map


def test_other_input_size_resampled_onto_the_grid():
    # as in the release, the grid follows img_size: a 192 px input into a 128 px encoder still gives 16x16
    ref, ours = pair("l0", 128, seed=1)
    diff, out = max_diff(ref, ours, torch.randn(1, 3, 192, 192))
    assert out.shape == (1, 256, 16, 16)
    assert diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["l0", "l1", "l2"])
def test_parity_release_size(name):
    ref, ours = pair(name, 512, seed=2)
    diff, out = max_diff(ref, ours, torch.randn(1, 3, 512, 512))
    assert out.shape == (1, 256, 64, 64)
    assert diff < 1e-4


def test_round_trip_and_reference_loads_it():
    ref = randomize_(efficientvit_sam_encoder("l0"))
    sd = ref.state_dict()
    back = to_release(from_release(sd))
    assert list(back) == list(sd)
    assert all(back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]) for k in sd)
    assert RELEASE_UNUSED == ()  # the release has no head or other unused weight
    efficientvit_sam_encoder("l0").load_state_dict(back, strict=True)
    assert RELEASE_ANCHOR in sd and RELEASE_ANCHOR not in from_release(sd)


@pytest.mark.parametrize("name", ["l0", "l1", "l2"])
def test_release_args_rebuild(name):
    with torch.device("meta"):  # shapes only
        sd = efficientvit_sam_encoder(name).state_dict()
        args = release_args(sd)
        built = EfficientViTEncoder(**args).state_dict()
    assert {k: v for k, v in args.items() if k in EFFICIENTVIT_SAM_L[name]} == EFFICIENTVIT_SAM_L[name]
    assert args["widths"] == (32, 64, 128, 256, 512) and args["head_dim"] == 32 and args["neck_expand_ratio"] == 1
    mapped = from_release(sd)
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in mapped.items()}


def test_release_args_errors():
    with torch.device("meta"):
        sd = efficientvit_sam_encoder("l0").state_dict()
        xl = efficientvit_sam_encoder("xl0").state_dict()
    key = "neck.middle.op_list.0.main.spatial_conv.conv.weight"
    with pytest.raises(ValueError, match=key):
        release_args({k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="XL"):
        release_args(xl)
    with pytest.raises(ValueError, match="unexpected key"):
        from_release({**sd, "head.weight": sd["norm.weight"]})


def test_eps_match_the_release():
    # the zoo's 1e-6 on every norm and LiteMLA's 1e-15 move the output by only ~1e-5 here, so check them directly
    ref, ours = pair("l0", 128)

    def eps(model, kind):
        return sorted(m.eps for m in model.modules() if type(m).__name__ in kind)

    norms = ("BatchNorm2d", "LayerNorm2d")
    assert eps(ours, norms) == eps(ref, norms) and set(eps(ours, norms)) == {1e-6}
    assert eps(ours, ("LiteMLA",)) == eps(ref, ("LiteMLA",)) == [1e-15] * 4

"""The annotation server's --precision reaches the predictor it embeds and decodes with."""

import numpy as np
import pytest
import torch

from segany.annotate.__main__ import parser
from segany.annotate.session import Model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_reaches_the_embedding_and_masks_come_back(precision):
    torch.manual_seed(0)
    net = Model(None, "vit_tiny", precision=precision, cache=2)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    _, features, original_size, _ = net.embedding(0, image)
    # stored fp32 either way; computed under torch.autocast in bf16, every value is a bf16 one
    in_bf16 = torch.equal(features, features.bfloat16().float())
    assert features.dtype == torch.float32 and in_bf16 == (precision == "bf16")
    masks, scores = net.decode(0, image, [(20, 30, 1)], None, multimask=True)
    assert masks.shape == (3, 48, 64) and masks.dtype == bool and scores.shape == (3,)


def test_bad_precision_names_the_flag():
    with pytest.raises(ValueError, match="--precision"):
        Model(None, "vit_tiny", precision="fp16")
    with pytest.raises(SystemExit):
        parser().parse_args(["--images", "x", "--out", "y", "--precision", "fp16"])

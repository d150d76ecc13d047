"""Per-round IoU / loss of a real fit: the validation scalars, the figure in the run directory
and its train curve, against the sums `simulate` returned, recomputed here."""

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import Logger

import segany
from segany.data import SyntheticDataModule
from segany.training import PromptConfig, SamModule
from segany.training import module as module_lib

LABELS = {"init": "init", "point": "pt", "mask": "mask"}


class Recorder(Logger):
    """Keeps what a wandb logger would get: the metrics and the images."""

    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.metrics, self.images = [], []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, step, list(images)))


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    """4 steps of a narrow vit_tiny at 64 px, validation (2 images) after steps 2 and 4; every
    simulate output and every figure drawn, recorded."""
    root = tmp_path_factory.mktemp("rounds")
    torch.manual_seed(0)
    model = segany.build_sam(
        "vit_tiny",
        img_size=64,
        window_size=4,
        depth=2,
        global_attn_indexes=(1,),
        prompt_embed_dim=64,
        decoder_mlp_dim=128,
    )
    # 5 rounds, one mask round at a random position: with seed 1 the two validation batches
    # have it in different rounds (labelled "mask/pt")
    prompting = PromptConfig(point_rounds=2, mask_rounds=2)
    module = SamModule(model, prompting=prompting, val_clicks=(1,), val_images=0, seed=1)
    dm = SyntheticDataModule(
        root=str(root / "syn"),
        num_train=2,
        num_val=2,
        shard_size=2,
        min_side=40,
        max_side=64,
        img_size=64,
        max_masks=3,
        batch_size=1,
        num_workers=0,
    )
    calls, figures = [], []
    real_simulate, real_plot = module_lib.simulate, module_lib.plot_rounds

    def simulate(*args, **kwargs):
        out = real_simulate(*args, **kwargs)
        split = "train" if torch.is_grad_enabled() else "val"
        calls.append((split, {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()}))
        return out

    def plot_rounds(*args, **kwargs):
        figures.append((args, real_plot(*args, **kwargs)))
        return figures[-1][1]

    logger = Recorder()
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root / "run"),
    )
    mp = pytest.MonkeyPatch()
    mp.setattr(module_lib, "simulate", simulate)
    mp.setattr(module_lib, "plot_rounds", plot_rounds)
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        mp.undo()
    return {"root": root / "run", "calls": calls, "figures": figures, "logger": logger, "T": 5}


def _validations(calls):
    """[(train outputs since the previous validation, this validation's outputs)] in order."""
    runs, train, val = [], [], []
    for split, out in calls + [("train", None)]:
        if split == "val":
            val.append(out)
        elif val:
            runs.append((train, val))
            train, val = [], []
        if split == "train":
            train.append(out)
    return runs


def _means(outs, key):
    return (sum(o[key] for o in outs) / sum(float(o["n_valid"]) for o in outs)).tolist()


def test_logged_round_means_are_the_mask_weighted_means_of_simulates_sums(fit):
    runs = _validations(fit["calls"])
    assert [(len(t), len(v)) for t, v in runs] == [(2, 2), (2, 2)]
    logged = [(step, m) for step, m in fit["logger"].metrics if "val_round/iou_00" in m]
    assert [step for step, _ in logged] == [1, 3]  # Lightning logs the epoch's end at the last step done
    T = fit["T"]
    for (_, val), (_, m) in zip(runs, logged):
        keys = [f"val_round/{k}_{t:02d}" for k in ("iou", "loss") for t in range(T)] + ["val_round/masks"]
        assert sorted(k for k in m if k.startswith("val_round/")) == sorted(keys)
        assert m["val_round/masks"] == sum(int(o["n_valid"]) for o in val)
        assert [m[f"val_round/iou_{t:02d}"] for t in range(T)] == pytest.approx(_means(val, "round_iou"))
        assert [m[f"val_round/loss_{t:02d}"] for t in range(T)] == pytest.approx(_means(val, "round_loss"))


def test_one_figure_per_validation_with_both_curves_and_the_round_kinds(fit):
    runs, figures, T = _validations(fit["calls"]), fit["figures"], fit["T"]
    assert len(figures) == 2
    for (train, val), ((path, kinds, val_iou, train_iou, val_loss), fig) in zip(runs, figures):
        assert val_iou == pytest.approx(_means(val, "round_iou"))
        assert val_loss == pytest.approx(_means(val, "round_loss"))
        assert train_iou == pytest.approx(_means(train, "round_iou"))  # only the steps since the last validation
        seen = [{o["schedule"][t] for o in val} for t in range(T)]
        assert kinds == ["/".join(sorted(LABELS[k] for k in s)) for s in seen]
        assert kinds == figures[0][0][1]  # validation reseeds: the same kinds every time
        ax = fig.axes[0]
        assert list(ax.get_xticks()) == list(range(T)) and [t.get_text() for t in ax.get_xticklabels()] == kinds
        assert [len(line.get_xdata()) for line in ax.get_lines()] == [T, T]  # val and train IoU
        assert len(fig.axes[1].get_lines()[0].get_xdata()) == T  # the loss, on its own axis
    assert kinds[0] == "init" and kinds[-1] == "mask" and "mask/pt" in kinds


def test_the_figure_is_in_the_run_directory_and_goes_to_the_image_logger(fit):
    root = fit["root"]
    latest = root / "round_iou.png"
    with Image.open(latest) as im:
        im.verify()
    with Image.open(latest) as im:
        assert im.format == "PNG" and min(im.size) > 100
    steps = sorted(p.name for p in (root / "round_iou").iterdir())
    assert steps == ["step0000002.png", "step0000004.png"]
    assert latest.read_bytes() == (root / "round_iou" / "step0000004.png").read_bytes()  # the latest validation
    images = fit["logger"].images
    assert [(key, step) for key, step, _ in images] == [("val_round/plot", 2), ("val_round/plot", 4)]
    assert images[-1][2] == [str(root / "round_iou" / "step0000004.png")]

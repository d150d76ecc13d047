"""python -m segany.export CKPT OUT --format onnx and segany.inference.OnnxPredictor: the exported
graphs run by onnxruntime against the PyTorch model (SamPredictor, the modules themselves) on a
real photo and a synthetic scene; the check refuses a broken export and leaves nothing behind."""

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install -e '.[onnx]')")
pytest.importorskip("onnxruntime", reason="OnnxPredictor needs onnxruntime (pip install -e '.[onnx]')")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import segany  # noqa: E402
import segany.export.onnx_model as om  # noqa: E402
from segany.data.scenes import make_scene  # noqa: E402
from segany.export import main  # noqa: E402
from segany.inference import OnnxPredictor, SamPredictor  # noqa: E402

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "dog.jpg"
# fp32 graph vs PyTorch, both float32 on the CPU: measured max |delta| ~1e-5 (logits), ~1e-7 (IoU)
LOGITS_ATOL, IOU_PRED_ATOL, MIN_MASK_IOU = 1e-3, 1e-4, 0.99


def _tiny():
    torch.manual_seed(0)
    m = segany.build_sam("vit_tiny")
    with torch.no_grad():  # make zero-initialised tensors non-trivial too
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m.eval()


def _lightning_ckpt(model, prefix="model."):
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}],
        "lr_schedulers": [],
        "segany_config": {"model": {"variant": "vit_tiny"}},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The CLI as typed, once: a Lightning .ckpt -> OUT/{encoder,decoder}.onnx, checked on the photo."""
    d = tmp_path_factory.mktemp("onnx")
    model = _tiny()
    ckpt = d / "last.ckpt"
    torch.save(_lightning_ckpt(model), ckpt)
    out = d / "sam_onnx"
    argv = [str(ckpt), str(out), "--format", "onnx", "--no-optimize"]
    argv += ["--check-images", str(PHOTO)] if PHOTO.is_file() else []
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    assert rc == 0, stderr.getvalue()
    return {"model": model, "out": out, "stdout": stdout.getvalue(), "ckpt": ckpt}


def _photo():
    if not PHOTO.is_file():
        pytest.skip(f"real photo not present: {PHOTO} (see ../shared/data/SOURCES.md)")
    from PIL import Image

    with Image.open(PHOTO) as im:
        return np.asarray(im.convert("RGB"))


def _scene():
    return make_scene(np.random.default_rng(3), 200, 300, n_objects=5)[0]


def _prompts(h, w):
    return [
        {"point_coords": np.array([[0.45 * w, 0.55 * h]]), "point_labels": np.array([1])},
        {"point_coords": np.array([[0.3 * w, 0.4 * h], [0.6 * w, 0.6 * h], [0.8 * w, 0.2 * h]]),
         "point_labels": [1, 1, 0]},
        {"box": np.array([0.2 * w, 0.25 * h, 0.7 * w, 0.9 * h])},
        {"box": np.array([0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h]), "point_coords": np.array([[0.3 * w, 0.3 * h]]),
         "point_labels": np.array([1])},
    ]  # fmt: skip


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def test_cli_writes_two_checked_files(exported):
    out = exported["out"]
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx"]  # no temporary left
    assert "wrote" in exported["stdout"] and "opset 18" in exported["stdout"]
    dec = onnx.load(str(out / "decoder.onnx"))
    assert {o.domain: o.version for o in dec.opset_import}[""] == om.OPSET
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.graph.input}
    names = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
    assert list(ins) == names
    assert ins["image_embeddings"] == [1, 256, 16, 16] and ins["mask_input"] == [1, 1, 64, 64]
    assert isinstance(ins["point_coords"][1], str) and ins["point_coords"][1] == ins["point_labels"][1]  # dynamic P
    meta = {p.key: p.value for p in dec.metadata_props}
    assert meta["segany.img_size"] == "256" and meta["segany.return_single_mask"] == "0"
    enc = onnx.load(str(out / "encoder.onnx"))
    dims = [d.dim_param or d.dim_value for d in enc.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == [1, 3] and all(isinstance(d, str) for d in dims[2:])  # any resized (h, w)


@pytest.mark.parametrize("source", ["photo", "synthetic"])
def test_onnx_predictor_matches_sam_predictor(exported, source):
    image = _photo() if source == "photo" else _scene()
    ref, ox = SamPredictor(exported["model"]), OnnxPredictor(exported["out"])
    ref.set_image(image)
    ox.set_image(image)
    assert ox.original_size == ref.original_size and ox.input_size == ref.input_size
    emb = ref.get_image_embedding().numpy()
    assert ox.get_image_embedding().shape == emb.shape
    assert np.abs(ox.get_image_embedding() - emb).max() < LOGITS_ATOL
    prev = None
    for prompt in _prompts(*image.shape[:2]) + [{"point_coords": np.array([[10.0, 12.0]]), "point_labels": [1]}]:
        if prev is not None and "box" not in prompt:  # the last one: a click refined with the previous logits
            prompt["mask_input"] = prev
        for multimask in (True, False):
            r = ref.predict(**prompt, multimask_output=multimask, return_logits=True)
            o = ox.predict(**prompt, multimask_output=multimask, return_logits=True)
            assert [a.shape for a in o] == [a.shape for a in r]
            assert o[0].shape[-2:] == image.shape[:2] and len(o[1]) == (3 if multimask else 1)
            assert np.abs(o[0] - r[0]).max() < LOGITS_ATOL and np.abs(o[2] - r[2]).max() < LOGITS_ATOL
            assert np.abs(o[1] - r[1]).max() < IOU_PRED_ATOL
            assert min(_iou(a > 0, b > 0) for a, b in zip(r[0], o[0])) >= MIN_MASK_IOU
            assert (o[0] > 0).any(axis=(1, 2)).any() and not (o[0] > 0).all()  # non-trivial masks compared
        prev = r[2][np.argmax(r[1])][None]
    masks = ox.predict(**prompt)[0]  # thresholded by default, at the model's mask threshold (0)
    assert masks.dtype == bool and np.array_equal(masks, ox.predict(**prompt, return_logits=True)[0] > 0)


def test_dynamic_number_of_points_raw_inputs(exported):
    """The decoder as the release's ONNX model is fed (no padding added): P = 1 and 3 points
    against segany's prompt encoder + mask decoder on the same tokens."""
    import onnxruntime as ort

    model = exported["model"]
    sess = ort.InferenceSession(str(exported["out"] / "decoder.onnx"), providers=["CPUExecutionProvider"])
    emb = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(1))
    for coords, labels in [([[100.0, 80.0]], [1]), ([[30.0, 40.0], [200.0, 100.0], [120.0, 60.0]], [1, 0, 2])]:
        c, lab = torch.tensor([coords]), torch.tensor([labels], dtype=torch.float)
        masks, iou, low = sess.run(
            None,
            {
                "image_embeddings": emb.numpy(),
                "point_coords": c.numpy(),
                "point_labels": lab.numpy(),
                "mask_input": np.zeros((1, 1, 64, 64), np.float32),
                "has_mask_input": np.zeros(1, np.float32),
                "orig_im_size": np.array([192.0, 256.0], np.float32),
            },
        )
        with torch.no_grad():
            sparse, dense = model.prompt_encoder(None, None, None, tokens=(c, lab.long()))
            ref_low, ref_iou = model.mask_decoder.predict_masks(emb, model.prompt_encoder.get_dense_pe(), sparse, dense)
            ref_masks = model.postprocess_masks(ref_low, (192, 256), (192, 256))
        assert masks.shape == (1, 4, 192, 256) and low.shape == (1, 4, 64, 64) and iou.shape == (1, 4)
        assert np.abs(low - ref_low.numpy()).max() < LOGITS_ATOL and np.abs(iou - ref_iou.numpy()).max() < IOU_PRED_ATOL
        assert np.abs(masks - ref_masks.numpy()).max() < LOGITS_ATOL


def _broken_copy(src: Path, dst: Path) -> Path:
    """The export with one decoder weight (the largest) changed by 5%."""
    dst.mkdir()
    shutil.copy(src / "encoder.onnx", dst / "encoder.onnx")
    m = onnx.load(str(src / "decoder.onnx"))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.05, init.name))
    onnx.save(m, str(dst / "decoder.onnx"))
    return dst


def test_broken_export_fails_the_check_and_leaves_nothing(exported, tmp_path, monkeypatch, capsys):
    model, good = exported["model"], exported["out"]
    broken = _broken_copy(good, tmp_path / "broken")
    with pytest.raises(om.OnnxCheckError, match="do not match the PyTorch model") as e:
        om.check_onnx(model, broken)
    assert "max |delta| embedding" in str(e.value)  # the figures are reported
    # the CLI with an exporter that writes the broken decoder: exit 1, the reason, no ONNX file in OUT
    monkeypatch.setattr(om, "export_encoder", lambda sam, path, **k: shutil.copy(broken / "encoder.onnx", path))
    monkeypatch.setattr(om, "export_decoder", lambda sam, path, **k: shutil.copy(broken / "decoder.onnx", path))
    out = tmp_path / "out"
    out.mkdir()
    (out / "encoder.onnx").write_bytes((good / "encoder.onnx").read_bytes())  # an earlier export's file
    (out / "notes.txt").write_text("kept")
    assert main([str(exported["ckpt"]), str(out), "--format", "onnx"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "do not match the PyTorch model" in err and "Nothing written" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_fp16_weights_pass_their_own_tolerance(exported, tmp_path):
    model, good = exported["model"], exported["out"]
    half = tmp_path / "fp16"
    half.mkdir()
    for name in ("encoder.onnx", "decoder.onnx"):
        m = onnx.load(str(good / name))
        om._weights_to_fp16(m)
        onnx.save(m, str(half / name))
        assert (half / name).stat().st_size < 0.6 * (good / name).stat().st_size
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    r32 = om.check_onnx(model, good)
    r16 = om.check_onnx(model, half, fp16=True)
    assert r16.logits_max_abs > r32.logits_max_abs  # the weights were rounded...
    assert r16.embed_max_abs > 10 * r32.embed_max_abs
    assert r16.mask_iou_min >= om.TOLERANCES["fp16"]["min_iou"]  # ...within the fp16 tolerance


def test_onnx_predictor_errors(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.onnx"):
        OnnxPredictor(tmp_path)
    ox = OnnxPredictor(exported["out"])
    with pytest.raises(RuntimeError, match="set_image"):
        ox.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="image_format"):
        ox.set_image(_scene(), image_format="RGBA")
    # BGR input is flipped to the model's RGB
    image = _scene()
    ox.set_image(image[..., ::-1], image_format="BGR")
    emb = ox.get_image_embedding().copy()
    ox.set_image(image)
    assert np.array_equal(emb, ox.get_image_embedding())


@pytest.mark.slow
def test_cli_fp16_single_mask(exported, tmp_path, monkeypatch):
    """The full export as shipped (graph optimisation on), fp16 weights and the release's single mask,
    the weights in external data files (as a model over 2 GB has them)."""
    monkeypatch.setattr(om, "EXTERNAL_DATA_BYTES", 1000)
    out = tmp_path / "sam_fp16"
    assert main([str(exported["ckpt"]), str(out), "--format", "onnx", "--fp16", "--return-single-mask"]) == 0
    names = ["decoder.onnx", "decoder.onnx.data", "encoder.onnx", "encoder.onnx.data"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert (out / "encoder.onnx").stat().st_size < 2**20  # the graph only
    ox = OnnxPredictor(out)
    image = _scene()
    ox.set_image(image)
    click = {"point_coords": np.array([[150.0, 100.0]]), "point_labels": np.array([1])}
    masks, iou, low = ox.predict(**click, multimask_output=False)
    assert masks.shape == (1, 200, 300) and iou.shape == (1,) and low.shape == (1, 64, 64)
    with pytest.raises(ValueError, match="return_single_mask"):
        ox.predict(**click)

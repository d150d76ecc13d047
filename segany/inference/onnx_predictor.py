"""SamPredictor on onnxruntime: the two files of ``python -m segany.export CKPT OUT --format onnx``.

``OnnxPredictor(OUT)`` has SamPredictor's ``set_image`` / ``predict`` / ``get_image_embedding`` /
``reset_image`` and return values, as numpy arrays; its pre-processing is segany's own
(``ResizeLongestSide``, the graph normalises and pads), so no PyTorch model runs. The files and
their inputs: segany/export/onnx_model.py. Boxes go in as the release's ONNX decoder takes them:
two points labelled 2 and 3 after the clicks; clicks without a box get one padding point.
Without any point or box (a mask prompt alone) one padding point is the sparse prompt, as in the
release's ONNX demo (SamPredictor then has no sparse token at all: a different input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from segany.modeling.constants import BOX_BR, BOX_TL, MASK_THRESHOLD, PAD
from segany.modeling.transforms import ResizeLongestSide

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"


class OnnxPredictor:
    """Compute a SAM image embedding once with ``encoder.onnx``, then predict masks for prompts
    on it with ``decoder.onnx``.

    Arguments:
      model_dir: the export's directory (holding ENCODER_FILE and DECODER_FILE).
      providers: onnxruntime execution providers (default: CPU).
      sess_options: an ``onnxruntime.SessionOptions`` for both sessions (threads and so on).
    """

    image_format = "RGB"

    def __init__(self, model_dir, providers: Sequence = ("CPUExecutionProvider",), sess_options=None) -> None:
        import onnxruntime as ort

        d = Path(model_dir)
        paths = [d / ENCODER_FILE, d / DECODER_FILE]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"OnnxPredictor: {', '.join(missing)} missing (python -m segany.export ... --format onnx)"
            )
        self.encoder, self.decoder = (
            ort.InferenceSession(str(p), sess_options, providers=list(providers)) for p in paths
        )
        meta = self.decoder.get_modelmeta().custom_metadata_map
        if meta.get("segany.part") != "decoder":
            raise ValueError(f"OnnxPredictor: {paths[1]} is not a segany decoder export (no segany.part metadata)")
        self.img_size = int(meta["segany.img_size"])
        self.mask_threshold = float(meta.get("segany.mask_threshold", MASK_THRESHOLD))
        self.return_single_mask = bool(int(meta.get("segany.return_single_mask", 0)))
        self.transform = ResizeLongestSide(self.img_size)
        self.reset_image()

    # ------------------------------------------------------------------ image

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an (H, W, 3) uint8 image given in ``image_format`` ("RGB" or "BGR")."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"set_image expects an (H, W, 3) image, got shape {tuple(image.shape)}")
        if image_format != self.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))  # (h, w, 3) uint8
        x = np.ascontiguousarray(resized.transpose(2, 0, 1)[None], dtype=np.float32)  # (1, 3, h, w) 0-255
        self.reset_image()
        (self.features,) = self.encoder.run(None, {"image": x})  # (1, 256, S/16, S/16)
        self.original_size = tuple(image.shape[:2])
        self.input_size = tuple(resized.shape[:2])
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        """The current image embedding, (1, 256, h, w)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    def reset_image(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self.features: Optional[np.ndarray] = None
        self.original_size: Optional[Tuple[int, ...]] = None
        self.input_size: Optional[Tuple[int, ...]] = None

    # ------------------------------------------------------------------ prompts

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As SamPredictor.predict: point_coords (P, 2) xy px, point_labels (P,), box (4,) xyxy px,
        mask_input (1, 4h, 4w) low-res logits of a previous call. Returns masks (C, H, W) (bool, or
        float32 logits with return_logits), iou predictions (C,) and low-res logits (C, 4h, 4w);
        C = 3 with multimask_output, else 1. A decoder exported with return_single_mask returns its
        one mask (the release's choice) and refuses multimask_output=True."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if self.return_single_mask and multimask_output:
            raise ValueError(
                "this decoder was exported with return_single_mask: it returns one mask; pass multimask_output=False"
            )
        coords, labels = [], []
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied together with point_coords.")
            xy = self.transform.apply_coords(
                np.asarray(point_coords, dtype=np.float64).reshape(-1, 2), self.original_size
            )
            coords.append(xy)
            labels.append(np.asarray(point_labels, dtype=np.float32).reshape(-1))
            if len(labels[-1]) != len(xy):
                raise ValueError(f"{len(xy)} point_coords but {len(labels[-1])} point_labels")
        if box is not None:
            coords.append(
                self.transform.apply_boxes(np.asarray(box, dtype=np.float64), self.original_size).reshape(2, 2)
            )
            labels.append(np.array([BOX_TL, BOX_BR], dtype=np.float32))
        else:  # the release's padding point
            coords.append(np.zeros((1, 2)))
            labels.append(np.array([PAD], dtype=np.float32))
        h, w = self.features.shape[-2:]
        if mask_input is None:
            mask, has_mask = np.zeros((1, 1, 4 * h, 4 * w), np.float32), np.zeros(1, np.float32)
        else:
            mask = np.asarray(mask_input, dtype=np.float32).reshape(1, 1, 4 * h, 4 * w)
            has_mask = np.ones(1, np.float32)
        masks, iou, low_res = self.decoder.run(
            None,
            {
                "image_embeddings": self.features,
                "point_coords": np.concatenate(coords)[None].astype(np.float32),  # (1, P, 2)
                "point_labels": np.concatenate(labels)[None],  # (1, P)
                "mask_input": mask,
                "has_mask_input": has_mask,
                "orig_im_size": np.array(self.original_size, dtype=np.float32),
            },
        )  # (1, K, H, W), (1, K), (1, K, 4h, 4w); K = 4 (token 0: single mask) or 1
        sel = slice(None) if self.return_single_mask else slice(1, None) if multimask_output else slice(0, 1)
        masks, iou, low_res = masks[0, sel], iou[0, sel], low_res[0, sel]
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, low_res

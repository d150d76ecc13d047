"""Write SA-1B-format tar shards (`<key>.jpg` + `<key>.json`, COCO RLE masks).

    python -m segany.data.make_shards synthetic OUT_DIR --num 300 --seed 0 --prefix train
    python -m segany.data.make_shards coco OUT_DIR --images IMG_DIR --annotations ann.json
    python -m segany.data.make_shards binary_pngs OUT_DIR --images IMG_DIR --annotations MASK_DIR
    python -m segany.data.make_shards instance_pngs OUT_DIR --images IMG_DIR --annotations MASK_DIR --ignore-value 255
    python -m segany.data.make_shards labelme OUT_DIR --annotations JSON_DIR

The COCO converter keeps each image file's bytes as they are (so decoding is identical),
turns every annotation (polygons, uncompressed or compressed RLE) into a compressed RLE
string and keeps `iscrowd` and `category_id` next to SA-1B's fields; images without a
usable annotation are left out and reported.

The image-folder converters (binary_pngs, instance_pngs, labelme; file layouts in
segany/data/formats/folders.py and labelme.py) read each image through the datamodule's own reader
(FolderStream.read), so the shards hold exactly the masks that FolderDataModule trains on; JPEG and
PNG bytes are kept as they are, other images stored as PNG. Keys are the image stems (a "." becomes
"_": webdataset splits a member's name at its first dot); a labelme object keeps its `label`, an
ignore region is an `iscrowd` annotation of id 0. Bad files are skipped, warned about by name and
counted in the summary line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Iterable, Iterator

from webdataset import TarWriter

from segany.utils.io import atomic_write


def write_shards(
    samples: Iterable[tuple[str, str, bytes, dict]], out_dir: str, prefix: str = "sa", shard_size: int = 1000
) -> list[str]:
    """samples: (key, image extension, image bytes, json dict). Returns the shard paths,
    named <prefix>-000000.tar, <prefix>-000001.tar, ...; each is written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    it = iter(samples)
    for first in it:
        path = os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar")
        with atomic_write(path, "wb") as f:
            writer = TarWriter(f, mtime=1.0)
            for key, ext, image, meta in itertools.chain([first], itertools.islice(it, shard_size - 1)):
                writer.write({"__key__": key, ext: image, "json": json.dumps(meta).encode()})
            writer.close()
        paths.append(path)
    return paths


def coco_samples(images_dir: str, annotations: str, stats: dict) -> Iterator[tuple[str, str, bytes, dict]]:
    """SA-1B-format samples of a COCO / LVIS instance dataset, keyed by str(image id)."""
    from segany.data.formats.coco import image_path, load_coco, rle_counts
    from segany.data.formats.sa1b import annotation, image_json

    coco = load_coco(annotations)
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        anns = []
        for ann in coco.imgToAnns.get(img_id, []):
            try:
                counts = rle_counts(coco, ann)
            except ValueError as exc:
                stats["bad_annotation"] = stats.get("bad_annotation", 0) + 1
                print(f"skipped annotation {ann.get('id')} of image {img_id}: {exc}", file=sys.stderr)
                continue
            coco_fields = {k: ann[k] for k in ("iscrowd", "category_id") if k in ann}
            segmentation = {"size": [info["height"], info["width"]], "counts": counts}
            anns.append(annotation(ann["id"], segmentation, ann.get("bbox"), ann.get("area"), **coco_fields))
        if not anns:
            stats["no_annotations"] = stats.get("no_annotations", 0) + 1
            continue
        path = image_path(images_dir, info)
        with open(path, "rb") as f:
            data = f.read()
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        ext = "jpg" if ext == "jpeg" else ext
        meta = image_json(img_id, info["height"], info["width"], os.path.basename(path), anns)
        stats["images"] = stats.get("images", 0) + 1
        yield str(img_id), ext, data, meta


def _shard_image(data: bytes, h: int, w: int) -> tuple[str, bytes]:
    """(extension, bytes) to store: JPEG / PNG as they are, anything else as PNG; SampleFault
    bad_image if it does not decode to h x w."""
    import cv2
    import numpy as np

    from segany.data.decode import decode_image
    from segany.data.faults import SampleFault

    img = decode_image(data, bgr=True, size=(h, w))  # the check training makes (bad_image when not h x w)
    if data[:2] == b"\xff\xd8":
        return "jpg", data
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", data
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise SampleFault("bad_image", "cannot be re-encoded as PNG")
    return "png", buf.tobytes()


def folder_samples(fmt: str, images_dir, annotations_dir, list_file, ignore_value, faults) -> Iterator:
    """SA-1B-format samples of an image folder (FolderDataModule's formats), keyed by image stem."""
    from segany.data.datamodules.folder import IGNORE_ID, FolderStream
    from segany.data.decode import numeric_id
    from segany.data.faults import SampleFault
    from segany.data.formats.sa1b import annotation, image_json
    from segany.data.sample import SampleConfig

    stream = FolderStream(fmt, images_dir, annotations_dir, list_file, ignore_value, SampleConfig(), train=False)
    for idx in range(stream.num_images()):
        obj = stream.read(idx, faults)
        if obj is None:
            continue
        h, w = obj.height, obj.width
        try:
            ext, data = _shard_image(obj.image() if callable(obj.image) else obj.image, h, w)
        except SampleFault as f:
            faults.add(f.kind, obj.source, obj.key, f.message)
            continue
        extra = [{} if obj.labels is None else {"label": lb} for lb in obj.labels or obj.ids]
        anns = [annotation(k, {"size": [h, w], "counts": c}, **e) for k, c, e in zip(obj.ids, obj.counts, extra)]
        if obj.ignore is not None:
            anns.append(annotation(IGNORE_ID, {"size": [h, w], "counts": obj.ignore}, iscrowd=1))
        key = obj.key.replace(".", "_")
        yield key, ext, data, image_json(numeric_id(key), h, w, os.path.basename(obj.source), anns)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segany.data.make_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="random scenes of shapes with exact masks")
    syn.add_argument("out_dir")
    syn.add_argument("--num", type=int, default=300)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--prefix", default="train")
    syn.add_argument("--first-id", type=int, default=0, help="image id of the first scene")
    syn.add_argument("--shard-size", type=int, default=100)
    syn.add_argument("--min-side", type=int, default=192)
    syn.add_argument("--max-side", type=int, default=320)
    syn.add_argument("--objects", type=int, nargs=2, default=[3, 8], metavar=("MIN", "MAX"))
    syn.add_argument("--thin-small-frac", type=float, default=0.3, help="share of thin lines / small blobs")
    syn.add_argument("--line-width", type=float, nargs=2, default=[1.0, 4.0], metavar=("MIN", "MAX"))
    syn.add_argument("--small-diameter", type=float, nargs=2, default=[4.0, 16.0], metavar=("MIN", "MAX"))
    syn.add_argument("--min-visible", type=int, default=10, help="pixels: smaller visible parts get no mask")
    coco = sub.add_parser("coco", help="convert a COCO / LVIS instance dataset")
    coco.add_argument("out_dir")
    coco.add_argument("--images", required=True, help="folder holding the image files")
    coco.add_argument("--annotations", required=True, help="instance json")
    coco.add_argument("--prefix", default="sa")
    coco.add_argument("--shard-size", type=int, default=1000)
    for fmt, what in (
        ("binary_pngs", "image folder + one binary PNG per object (<stem>_<k>.png or <stem>/<k>.png)"),
        ("instance_pngs", "image folder + one instance-id PNG per image (<stem>.png, 0 = background)"),
        ("labelme", "folder of labelme json (polygons, rectangles, circles, masks)"),
    ):
        p = sub.add_parser(fmt, help=what)
        p.add_argument("out_dir")
        if fmt == "labelme":
            p.add_argument("--annotations", required=True, help="folder of labelme .json files")
            p.add_argument("--images", help="where to look for an imagePath not found next to its json")
        else:
            p.add_argument("--images", required=True, help="folder holding the image files")
            p.add_argument("--annotations", required=True, help="folder holding the mask PNGs")
        if fmt == "instance_pngs":
            p.add_argument("--ignore-value", type=int, help="mask value of an ignore region (e.g. 255)")
        p.add_argument("--list", help="text file of image stems to convert (one a line); default: all")
        p.add_argument("--prefix", default="sa")
        p.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        from segany.data.scenes import scene_samples

        paths = write_shards(
            scene_samples(
                args.num,
                args.seed,
                args.first_id,
                args.min_side,
                args.max_side,
                objects=args.objects,
                thin_small_frac=args.thin_small_frac,
                line_width=args.line_width,
                small_diameter=args.small_diameter,
                min_visible=args.min_visible,
            ),
            args.out_dir,
            args.prefix,
            args.shard_size,
        )
        print(f"wrote {args.num} scenes to {len(paths)} shards in {args.out_dir}")
    elif args.command in ("binary_pngs", "instance_pngs", "labelme"):
        from segany.data.faults import FaultCounter

        faults = FaultCounter(where="make_shards")
        n = [0]

        def counted(samples):
            for sample in samples:
                n[0] += 1
                yield sample

        samples = folder_samples(
            args.command, args.images, args.annotations, args.list, getattr(args, "ignore_value", None), faults
        )
        paths = write_shards(counted(samples), args.out_dir, args.prefix, args.shard_size)
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(faults.total.items())) or "nothing"
        print(f"wrote {n[0]} images to {len(paths)} shards in {args.out_dir}; skipped: {skipped}")
    else:
        stats: dict = {}
        paths = write_shards(
            coco_samples(args.images, args.annotations, stats), args.out_dir, args.prefix, args.shard_size
        )
        print(
            f"wrote {stats.get('images', 0)} images to {len(paths)} shards in {args.out_dir}; left out: "
            f"{stats.get('no_annotations', 0)} images without annotations, "
            f"{stats.get('bad_annotation', 0)} unusable annotations"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The annotation web app (FastAPI): the page, its JSON API, the statistics page.

    GET  /                      the annotation page (static/index.html)      GET /stats: statistics page
    GET  /api/info              number of images, model, annotator, mode
    GET  /api/images            per image: id, key, number of masks (progress)
    GET  /api/images/{i}        image i: size and its stored masks (row-major runs); starts its
                                embedding and prefetches image i + 1; semi mode: places the
                                engine's semi-stage masks the first time
    GET  /api/images/{i}/image  the image bytes
    POST /api/images/{i}/decode       {points: [[x, y, label]], box, multimask} -> masks + scores
    POST /api/images/{i}/accept       the prompt again (+ choice, brush strokes, label, seconds,
                                      clicks): decoded and stored as a new mask
    POST /api/images/{i}/masks/{id}/brush   {strokes: [{x, y, r, erase}]}: fix a stored mask's pixels
    POST /api/images/{i}/masks/{id}/delete
    POST /api/images/{i}/undo         undo this session's last change to image i
    POST /api/model/reload            read --checkpoint again (a newer checkpoint), no restart
    GET  /api/stats             per mask: source, seconds, clicks, time; masks per image

Safe by default: images are addressed by index (never by a path from the client), request
bodies are limited to MAX_BODY bytes and every field is bounded (pydantic; unknown fields are
refused); a malformed request gets a 4xx naming the field before anything is written. With a
token (required when not bound to 127.0.0.1), every request must carry it (header X-Token or
?token=).

Several annotators may work at once (each request runs in a worker thread): a change and its
undo record happen under the store's lock, so the undo history is in the order the shards
were written, and an undo restores the state before the image's newest change, whoever made it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, conlist

from segany.annotate.session import Images, Model, mask_runs, paint
from segany.annotate.store import ShardStore
from segany.data.decode import decode_mask
from segany.data.formats.sa1b import annotation
from segany.engine.annotate import ID_STRIDE, SemiAnnotator

STATIC = os.path.join(os.path.dirname(__file__), "static")
COOKIE = "segany_annotate_token"
MAX_BODY = 1 << 20  # bytes per request
MAX_POINTS = 64
MAX_STROKES = 20_000
MAX_UNDO = 50
COORD = 1e6  # |coordinate| bound (px); the image's own size is checked per request


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a default


class Stroke(Strict):
    x: float = Field(ge=-COORD, le=COORD)
    y: float = Field(ge=-COORD, le=COORD)
    r: float = Field(ge=0, le=1000)
    erase: bool = False


class Prompt(Strict):
    points: conlist(conlist(float, min_length=3, max_length=3), max_length=MAX_POINTS) = []
    box: Optional[conlist(float, min_length=4, max_length=4)] = None
    multimask: bool = True


class Accept(Prompt):
    choice: int = Field(0, ge=0, le=2)
    strokes: conlist(Stroke, max_length=MAX_STROKES) = []
    label: Optional[str] = Field(None, max_length=64)
    seconds: float = Field(0.0, ge=0, le=86400)
    clicks: int = Field(0, ge=0, le=10_000)


class Brush(Strict):
    strokes: conlist(Stroke, min_length=1, max_length=MAX_STROKES)
    seconds: float = Field(0.0, ge=0, le=86400)


def _check_prompt(p: Prompt, h: int, w: int) -> None:
    for x, y, label in p.points:
        if not (0 <= x < w and 0 <= y < h) or label not in (0, 1):
            raise HTTPException(422, f"point {[x, y, label]} is not inside the {w}x{h} image with label 0 or 1")
    if p.box is not None:
        x0, y0, x1, y1 = p.box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise HTTPException(422, f"box {p.box} is not an xyxy box inside the {w}x{h} image")
    if not p.points and p.box is None:
        raise HTTPException(422, "a prompt needs at least one point or a box")


def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field. FastAPI's own handler echoes the input back, and an input
    it cannot write as JSON (NaN, a lone surrogate) turned that answer into a 500."""
    why = "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in exc.errors())
    return JSONResponse({"detail": why}, status_code=422)


def box_centre(box) -> list:
    return [0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])]


def _public(ann: dict) -> dict:
    """A stored annotation for the page: its fields, the mask as runs instead of RLE."""
    out = {k: v for k, v in ann.items() if k not in ("segmentation", "point_coords", "crop_box")}
    out["runs"] = mask_runs(decode_mask(ann["segmentation"]))
    return out


def create_app(
    images: str,
    checkpoint: Optional[str],
    out: str,
    *,
    model: str = "vit_tiny",
    device: str = "cpu",
    trust_checkpoint: bool = False,
    shard_size: int = 10,
    annotator: str = "anonymous",
    token: Optional[str] = None,
    semi: bool = False,
    semi_settings: Optional[dict] = None,
    cache: int = 16,
    precision: str = "fp32",
) -> FastAPI:
    """The app on the images of `images` (a folder or a shard spec, read by segany.engine.plan_jobs),
    the model of `checkpoint` (segany.modeling.checkpoint.load_model; `model` only when it stores no architecture)
    and the output folder `out` (resumed). semi_settings: SemiAnnotator keywords. cache: images whose
    pixels and embedding stay in memory; each annotator uses two (the open image, the next one
    prefetched), and fewer than that re-embeds an image on clicks (a ViT-B embedding is 4 MB)."""
    app = FastAPI(title="segany annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, _invalid)
    imgs = Images(images, shard_size, cache=cache)
    net = Model(checkpoint, model, device, trust_checkpoint, cache=cache, precision=precision)
    store = ShardStore(out)
    imgs.check_output(store)
    history: dict = {}  # image index -> previous annotation lists (this session's undo)
    hist_lock = threading.Lock()
    semi_lock = threading.Lock()
    app.state.model, app.state.store, app.state.images = net, store, imgs

    @app.middleware("http")
    async def guard(request: Request, call_next):
        from_url = False
        if token is not None:
            given = request.headers.get("x-token") or request.query_params.get("token") or request.cookies.get(COOKIE)
            if not secrets.compare_digest((given or "").encode(), token.encode()):
                return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
            from_url = "token" in request.query_params
        if request.method not in ("GET", "HEAD"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
            if int(length) > MAX_BODY:
                return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
        response = await call_next(request)
        if from_url:  # the page's URL carried it: the page's own requests then carry a cookie
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    def index(i: int):
        if not 0 <= i < len(imgs):
            raise HTTPException(404, f"no image {i} (there are {len(imgs)})")
        return imgs.item(i)

    def where(i: int):
        e = imgs.entries[i]
        return e.job.name, e.key

    def change(i: int, fn, undoable: bool = True):
        item, image = index(i)
        shard, key = where(i)
        with store.locked():  # the undo record in the order of the writes
            before, after = store.update(shard, key, item.data, item.image_id, image.shape[:2], fn)
            if undoable and after is not before:
                with hist_lock:
                    stack = history.setdefault(i, [])
                    stack.append(before)
                    del stack[:-MAX_UNDO]
        return after

    def place_semi(i: int) -> None:
        """Semi mode: the first time image i is opened, add the engine's semi-stage masks."""
        shard, key = where(i)
        if not semi or store.is_seen(key):
            return
        with semi_lock:
            if store.is_seen(key):
                return
            item, image = index(i)
            given = {id(a) for a in (item.meta or {}).get("annotations", [])}
            anns = SemiAnnotator(net.model, **(semi_settings or {}))(image, item.image_id, item.meta)
            now = time.time()
            for a in anns:  # the input's confident masks keep their provenance (none: the auto stage's)
                a.setdefault("source", "auto" if id(a) in given else "semi")
                a.setdefault("annotator", "engine")
                a.setdefault("seconds", 0.0)
                a.setdefault("clicks", 0)
                a.setdefault("time", now)

            def place(cur):
                if any(a.get("source") == "semi" for a in cur):
                    return None  # placed before (a kill between the write and mark_seen)
                used = {int(c["id"]) for c in cur}
                nxt = store.next_number(key, cur + anns)
                for a in anns:  # ids stay unique when the output already holds masks of this image
                    if int(a["id"]) in used:
                        a["id"], nxt = int(item.image_id) * ID_STRIDE + nxt, nxt + 1
                    used.add(int(a["id"]))
                return cur + anns

            if anns:
                change(i, place, False)
            store.mark_seen(key)

    @app.get("/")
    def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    @app.get("/stats")
    def stats_page():
        return FileResponse(os.path.join(STATIC, "stats.html"))

    @app.get("/api/info")
    def info():
        return {"images": len(imgs), "model": net.description, "annotator": annotator, "semi": semi}

    @app.get("/api/images")
    def listing():
        counts = {}
        for meta in store.all_images():
            counts[meta["image"]["file_name"].rsplit(".", 1)[0]] = len(meta["annotations"])
        rows = [{"id": j, "key": e.key, "masks": counts.get(e.key, 0)} for j, e in enumerate(imgs.entries)]
        return {"images": rows, "done": sum(r["masks"] > 0 for r in rows)}

    @app.get("/api/images/{i}")
    def image_state(i: int):
        item, image = index(i)
        net.embedding(i, image)
        if i + 1 < len(imgs):
            net.prefetch(i + 1, lambda: imgs.item(i + 1)[1])
        place_semi(i)
        shard, key = where(i)
        h, w = image.shape[:2]
        anns = store.annotations(shard, key)
        return {"id": i, "key": key, "width": w, "height": h, "masks": [_public(a) for a in anns]}

    @app.get("/api/images/{i}/image")
    def image_bytes(i: int):
        item, _ = index(i)
        return Response(item.data, media_type="image/png" if item.ext == "png" else "image/jpeg")

    def decoded(i: int, p: Prompt):
        item, image = index(i)
        _check_prompt(p, *image.shape[:2])
        return image, net.decode(i, image, p.points, p.box, p.multimask and len(p.points) <= 1 and p.box is None)

    @app.post("/api/images/{i}/decode")
    def decode(i: int, p: Prompt):
        _, (masks, scores) = decoded(i, p)
        # a JSONResponse goes out as json.dumps: FastAPI's jsonable_encoder would walk every run
        return JSONResponse({"masks": [mask_runs(m) for m in masks], "scores": [float(s) for s in scores]})

    @app.post("/api/images/{i}/accept")
    def accept(i: int, a: Accept):
        _, (masks, _scores) = decoded(i, a)
        if a.choice >= len(masks):
            raise HTTPException(422, f"choice {a.choice}: the prompt gives {len(masks)} mask(s)")
        mask = paint(masks[a.choice], a.strokes)
        if not mask.any():
            raise HTTPException(422, "the mask is empty")
        item, _ = index(i)
        fields = dict(  # no predicted_iou: a person's mask counts as confident (the semi stage keeps it)
            point_coords=[[x, y] for x, y, lab in a.points if lab == 1] or [box_centre(a.box)],
            source="manual",
            annotator=annotator,
            seconds=round(a.seconds, 2),
            clicks=a.clicks,
            time=time.time(),
        )
        if a.label:
            fields["label"] = a.label
        new, shard_key = {}, where(i)[1]

        def add(cur):
            start = store.next_number(shard_key, cur)
            new["ann"] = annotation(int(item.image_id) * ID_STRIDE + start, mask, **fields)
            return cur + [new["ann"]]

        change(i, add)
        return _public(new["ann"])

    def find(cur: list, ann_id: int) -> int:
        j = next((j for j, c in enumerate(cur) if int(c["id"]) == ann_id), None)
        if j is None:
            raise HTTPException(404, f"image has no mask {ann_id}")
        return j

    @app.post("/api/images/{i}/masks/{ann_id}/delete")
    def delete(i: int, ann_id: int):
        index(i)

        def drop(cur):
            j = find(cur, ann_id)
            return cur[:j] + cur[j + 1 :]

        after = change(i, drop)
        return {"masks": len(after)}

    @app.post("/api/images/{i}/masks/{ann_id}/brush")
    def brush(i: int, ann_id: int, b: Brush):
        index(i)
        out = {}

        def fix(cur):
            j = find(cur, ann_id)
            old = cur[j]
            mask = paint(decode_mask(old["segmentation"]), b.strokes)
            if not mask.any():
                raise HTTPException(422, "the brush would leave the mask empty; delete it instead")
            keep = {k: v for k, v in old.items() if k not in ("id", "segmentation", "bbox", "area")}
            keep.update(seconds=round(float(old.get("seconds", 0)) + b.seconds, 2), time=time.time())
            keep["source"] = "manual" if old.get("source") in (None, "manual") else old["source"]
            out["ann"] = annotation(old["id"], mask, **keep)
            return cur[:j] + [out["ann"]] + cur[j + 1 :]

        change(i, fix)
        return _public(out["ann"])

    @app.post("/api/images/{i}/undo")
    def undo(i: int):
        index(i)
        with store.locked():  # no change of image i between taking the record and restoring it
            with hist_lock:
                stack = history.get(i) or []
                if not stack:
                    raise HTTPException(409, "nothing to undo on this image")
                previous = stack.pop()
            after = change(i, lambda cur: previous, undoable=False)
        return {"masks": len(after)}

    @app.post("/api/model/reload")
    def reload():
        return {"model": net.reload()}

    @app.get("/api/stats")
    def stats():
        masks, per_image = [], []
        for meta in store.all_images():
            per_image.append({"key": meta["image"]["file_name"], "masks": len(meta["annotations"])})
            for a in meta["annotations"]:
                masks.append({k: a.get(k) for k in ("source", "annotator", "seconds", "clicks", "time", "area")})
        masks.sort(key=lambda m: m["time"] or 0)
        secs = [m["seconds"] for m in masks if m["source"] == "manual" and m["seconds"] is not None]
        return {
            "images": per_image,
            "masks": masks,
            "median_seconds": float(np.median(secs)) if secs else None,
        }

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

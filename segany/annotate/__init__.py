"""segany.annotate: assisted-manual annotation in the browser (data engine stage 1, paper §4).

    python -m segany.annotate --images DIR_OR_SHARDS --checkpoint CKPT --out OUT

A FastAPI server (server.py) embeds each image once (session.py) and decodes every click with
the prompt encoder and mask decoder; the page (static/, plain HTML/JS) draws the masks. Accepted
masks go to SA-1B-format shards with per-mask provenance (store.py), which SA1BDataModule and the
mixture's `manual` source read: annotate -> fine-tune with train.py -> annotate with the new
checkpoint (experiments/data_engine.md).
"""

from segany.annotate.server import create_app

__all__ = ["create_app"]

"""python -m segany.annotate --images DIR_OR_SHARDS --checkpoint CKPT --out OUT  (prints the URL)"""

from __future__ import annotations

import argparse
import secrets
import sys

from segany.utils.cli import add_checkpoint_args, add_precision_arg

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segany.annotate",
        description="Assisted-manual annotation in the browser (data engine stage 1); writes SA-1B-format shards.",
    )
    p.add_argument("--images", required=True, help="folder of images, or SA-1B-format shards (any shard spec)")
    add_checkpoint_args(p, "train.py .ckpt, FSDP directory or SAM .pth (none: untrained)")
    p.add_argument("--out", required=True, help="output folder of SA-1B-format shards (resumed if it exists)")
    p.add_argument("--model", default="vit_tiny", help="size when the checkpoint stores none / no checkpoint")
    p.add_argument("--device", default="cpu")
    add_precision_arg(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--annotator", default="anonymous", help="name stored with every mask")
    p.add_argument("--shard-size", type=int, default=10, help="images per output shard (folder input)")
    p.add_argument("--semi", action="store_true", help="open each image with the engine's semi-stage masks placed")
    p.add_argument("--semi-points-per-side", type=int, default=32)
    p.add_argument("--cache", type=int, default=16, help="images kept embedded: 2 per annotator (default 16)")
    p.add_argument("--host", default="127.0.0.1", help="any other address requires a token")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="access token (default: random when --host is not loopback)")
    return p


def main(argv=None) -> int:
    import uvicorn

    from segany.annotate.server import create_app

    args = parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    token = args.token
    if token is None and args.host not in LOOPBACK:
        token = secrets.token_urlsafe(16)
    app = create_app(
        args.images,
        args.checkpoint,
        args.out,
        model=args.model,
        device=args.device,
        trust_checkpoint=args.trust_checkpoint,
        shard_size=args.shard_size,
        annotator=args.annotator,
        token=token,
        semi=args.semi,
        semi_settings={"points_per_side": args.semi_points_per_side},
        cache=args.cache,
        precision=args.precision,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"segany annotate: {len(app.state.images)} images, {app.state.model.description}", flush=True)
    print(f"open {url}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuzz of the annotation server's API (the real server: uvicorn on a loopback port). Every
request is invalid by construction (a field given a value outside its bounds or of the wrong
type, a cut or non-UTF-8 body, an unknown field, image or mask id, an oversized or lying
body, a wrong token), so every answer must be a 4xx naming what is wrong (never a 5xx, never
a hang), and the output folder must stay byte for byte as it was."""

import json
import random
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from segany.annotate import create_app  # noqa: E402
from segany.annotate.server import MAX_BODY  # noqa: E402

try:
    from test_annotate_load import H, W, make_inputs, serve
except ImportError:  # tests/ imported as a package
    from tests.test_annotate_load import H, W, make_inputs, serve

SEEDS = (0, 1, 2)
CASES = 80  # per seed
TIMEOUT = 20.0  # seconds per request: longer is a hang
JSON = {"Content-Type": "application/json"}
NAN, INF = float("nan"), float("inf")
STROKE = {"x": 10.0, "y": 10.0, "r": 3.0}
VALID = {
    "decode": {"points": [[60, 70, 1]], "multimask": True},
    "accept": {"points": [[60, 70, 1]], "choice": 0, "strokes": [STROKE], "label": "car", "seconds": 1.0, "clicks": 1},
    "brush": {"strokes": [STROKE], "seconds": 1.0},
}
BAD_NUMBERS = [NAN, INF, -INF, 1e308, -1e308, 10**30, "1", None, [], {}]
BAD = {  # field -> values that make any body invalid
    "points": [
        [[NAN, 70, 1]],
        [[60, INF, 1]],
        [[1e308, 70, 1]],
        [[-1, 70, 1]],
        [[W, 70, 1]],
        [[60, H, 1]],
        [[60, 70, 2]],
        [[60, 70, -1]],
        [[60, 70, 0.5]],
        [[60, 70]],
        [[60, 70, 1, 1]],
        [["a", 70, 1]],
        [[None, 70, 1]],
        [{"x": 60}],
        [[60, 70, 1]] * 65,
        [],
        "points",
        {"x": 1},
    ],
    "box": [
        [NAN, 0, 10, 10],
        [0, 0, 1e308, 10],
        [50, 50, 40, 60],  # negative width
        [10, 60, 40, 50],  # negative height
        [10, 10, 10, 20],  # empty
        [-1, 0, 10, 10],
        [0, 0, W + 1, 10],
        [0, 0, 10],
        [0, 0, 10, 10, 10],
        ["a", 0, 10, 10],
        "box",
    ],
    "multimask": [2, -1, 0.5, "maybe", [], {}, None],
    "choice": [-1, 3, 1.5, "a", 1e300, NAN, None, []],
    "strokes": [
        [{**STROKE, "x": NAN}],
        [{**STROKE, "r": NAN}],
        [{**STROKE, "r": INF}],
        [{**STROKE, "r": -1}],
        [{**STROKE, "r": 1e9}],
        [{**STROKE, "x": 1e7}],
        [{**STROKE, "y": -1e7}],
        [{"x": 1, "y": 1}],
        [{**STROKE, "erase": "maybe"}],
        [{**STROKE, "colour": 1}],
        [1, 2],
        [STROKE] * 20_001,
        "strokes",
    ],
    "label": ["x" * 65, 5, ["a"], {"a": 1}, "\ud800", "a\udfffb"],
    "seconds": [-1, 86401, "soon"] + BAD_NUMBERS[:6],
    "clicks": [-1, 1.5, 10_001, "x"] + BAD_NUMBERS[:6],
}
FIELDS = {"decode": ["points", "box", "multimask"], "accept": list(BAD), "brush": ["strokes", "seconds"]}
BAD_IDS = ["3", "99", "-1", str(10**30), "abc", "1.5", "nan", "%00", "..%2F0"]


def snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A running server on an output folder that already holds masks on images 0 and 1 (drawn
    by an earlier server, so this one has nothing to undo) -> (url, out, {image: mask id})."""
    root = tmp_path_factory.mktemp("fuzz")
    images, ckpt = make_inputs(root)
    out = root / "out"
    first = TestClient(create_app(str(images), str(ckpt), str(out), shard_size=2))
    ids = {i: first.post(f"/api/images/{i}/accept", json=VALID["decode"]).json()["id"] for i in (0, 1)}
    with serve(create_app(str(images), str(ckpt), str(out), shard_size=2)) as url:
        yield url, out, ids


def cases(seed: int, ids: dict):
    """-> [(url path, body bytes)] of invalid requests, from `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(CASES):
        i = rng.choice([0, 1])
        kind = rng.choice(["decode", "accept", "brush"])
        path = {"brush": f"/api/images/{i}/masks/{ids[i]}/brush"}.get(kind, f"/api/images/{i}/{kind}")
        body = dict(VALID[kind])
        text = json.dumps(body).encode()
        how = rng.choice(["field", "field", "field", "cut", "byte", "noise", "type", "extra", "image", "mask"])
        if how == "field":
            for field in rng.sample(FIELDS[kind], rng.randint(1, 2)):
                body[field] = rng.choice(BAD[field])
            text = json.dumps(body).encode()  # NaN / Infinity as Python's json writes them
        elif how == "cut":  # a strict prefix of a JSON object is never valid JSON
            text = text[: rng.randrange(len(text))]
        elif how == "byte":  # a byte that is never valid UTF-8
            at = rng.randrange(len(text) + 1)
            text = text[:at] + bytes([rng.choice([0x80, 0xBF, 0xC0, 0xFF])]) + text[at:]
        elif how == "noise":
            text = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        elif how == "type":
            text = json.dumps(rng.choice([[body], 1, "body", None, True, [], 1e400])).encode()
        elif how == "extra":
            body[rng.choice(["point", "boxes", "Choice", "__proto__", ""])] = 1
            text = json.dumps(body).encode()
        elif how == "image":
            path = path.replace(f"/images/{i}/", f"/images/{rng.choice(BAD_IDS)}/", 1)
        else:  # an unknown mask: absent, or the other image's
            mask = rng.choice(BAD_IDS[1:] + [str(ids[1 - i])])
            path = f"/api/images/{i}/masks/{mask}/" + rng.choice(["brush", "delete"])
        out.append((path, text))
    out += [(f"/api/images/{rng.choice(BAD_IDS)}/{rng.choice(['undo', 'accept'])}", b"") for _ in range(5)]
    out += [(f"/api/images/{i}/undo", b"") for i in range(3)]  # nothing to undo
    out.append(("/api/images/0/decode", b"[" * 100_000 + b"]" * 100_000))  # deep nesting
    out.append(("/api/images/0/accept", b"x" * (MAX_BODY + 1)))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_invalid_requests_get_a_4xx_and_write_nothing(setup, seed):
    url, out, ids = setup
    before = snapshot(out)
    wrong = []
    with httpx.Client(timeout=TIMEOUT) as c:
        for path, body in cases(seed, ids):
            t0 = time.monotonic()
            r = c.post(url + path, content=body, headers=JSON)
            if not 400 <= r.status_code < 500 or "detail" not in r.json():
                wrong.append((path, body[:120], r.status_code, r.text[:200]))
            assert time.monotonic() - t0 < TIMEOUT
        for seg in BAD_IDS:
            for tail in ("", "/image"):
                r = c.get(f"{url}/api/images/{seg}{tail}")
                if not 400 <= r.status_code < 500:
                    wrong.append((f"GET {seg}{tail}", b"", r.status_code, r.text[:200]))
        # the server still answers, and the masks are the ones it had
        assert [len(c.get(f"{url}/api/images/{i}").json()["masks"]) for i in range(3)] == [1, 1, 0]
    assert wrong == []
    assert snapshot(out) == before


def test_a_field_error_names_the_field(setup):
    url, _, ids = setup
    for body, field in [
        ({"points": [[60, 70, 1]], "seconds": NAN}, "body.seconds"),
        ({"points": [[60, 70, 1]], "strokes": [{**STROKE, "r": NAN}]}, "body.strokes.0.r"),
        ({"points": [[60, 70, 1]], "label": "\ud800"}, "body.label"),
        ({"points": [[60, 70, 1]], "choise": 1}, "body.choise"),
    ]:
        r = httpx.post(f"{url}/api/images/0/accept", content=json.dumps(body), headers=JSON, timeout=TIMEOUT)
        assert r.status_code == 422 and r.json()["detail"].startswith(field + ":"), r.text
    r = httpx.post(f"{url}/api/images/0/accept", json={"box": [50, 50, 40, 60]}, timeout=TIMEOUT)
    assert r.status_code == 422 and "box [50.0, 50.0, 40.0, 60.0]" in r.json()["detail"]


def raw(url: str, request: bytes, *, close_after_send: bool = True) -> bytes:
    """Send raw bytes to the server; -> the status line it answers (b"" if it closes silently)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(request)
        if close_after_send:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[0]


def test_malformed_http_gets_a_4xx_and_writes_nothing(setup):
    url, out, _ = setup
    before = snapshot(out)
    ok = json.dumps(VALID["decode"]).encode()
    head = b"POST /api/images/0/accept HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for headers, body in [
        (b"Content-Length: -1\r\n", ok),
        (b"Content-Length: abc\r\n", ok),
        (b"Content-Length: 5\r\nContent-Length: 7\r\n", ok),
        (b"Content-Length: " + str(2**70).encode() + b"\r\n", ok),
        (b"Transfer-Encoding: chunked\r\n", b"%x\r\n" % len(ok) + ok + b"\r\n0\r\n\r\n"),
        (b"", ok),  # no length at all
    ]:
        status = raw(url, head + headers + b"\r\n" + body)
        assert status.split()[1][:1] == b"4", (headers, status)
    assert raw(url, b"GARBAGE\r\n\r\n").split()[1][:1] == b"4"
    # a body shorter than its Content-Length, then the client goes away: nothing is written
    assert raw(url, head + b"Content-Length: %d\r\n\r\n" % (len(ok) + 50) + ok) in (b"", b"HTTP/1.1 400 Bad Request")
    # a client that stops half-way through its body does not hold the others up
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as stuck:
        stuck.sendall(head + b"Content-Length: %d\r\n\r\n" % (len(ok) + 50) + ok[:10])
        t0 = time.monotonic()
        assert httpx.get(url + "/api/info", timeout=TIMEOUT).status_code == 200
        assert time.monotonic() - t0 < 5
    time.sleep(0.2)
    assert snapshot(out) == before


def test_wrong_token_gets_401_and_writes_nothing(tmp_path):
    images, ckpt = make_inputs(tmp_path)
    out = tmp_path / "out"
    with serve(create_app(str(images), str(ckpt), str(out), shard_size=2, token="s3cret")) as url:
        before = snapshot(out)
        body = VALID["decode"]
        rng = random.Random(0)
        tokens = ["", "wrong", "s3cre", "s3cret-", "S3CRET", "%ff", "s3cr\u00e9t", "s3cret" * 100]
        for _ in range(30):
            given, where = rng.choice(tokens), rng.choice(["header", "query", "cookie", "none"])
            path = rng.choice(["/api/images/0/accept", "/api/images/1/decode", "/api/images/0/undo"])
            kw = {
                "header": {"headers": {"X-Token": given.encode()}},
                "query": {"params": {"token": given}},
                "cookie": {"headers": {"Cookie": f"segany_annotate_token={given}".encode()}},
                "none": {},
            }[where]
            r = httpx.post(url + path, json=body, timeout=TIMEOUT, **kw)
            assert r.status_code == 401, (given, where, r.status_code)
        r = httpx.get(url + "/api/images/0", timeout=TIMEOUT)
        assert r.status_code == 401 and snapshot(out) == before
        assert httpx.post(url + "/api/images/0/accept", json=body, headers={"X-Token": "s3cret"}).status_code == 200

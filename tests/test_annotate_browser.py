"""The annotation page in a real browser (headless Chromium via Selenium): open a real photo,
click an object, see the mask drawn, accept it, find that mask in the shard on disk, and see
it plotted on the statistics page."""

import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path

import cv2
import pytest
import torch
from pycocotools import mask as mask_utils

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

try:
    from _official import build_blob_sam, make_test_image
except ImportError:  # tests/ imported as a package
    from tests._official import build_blob_sam, make_test_image

PHOTO = Path("/work/shared/data/photos/dog.jpg")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no chromium + chromedriver (Debian: apt install chromium chromium-driver)"
)


class Server:
    """uvicorn serving `app` on a free local port, in a thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def browser(width=1300, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    opts.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_click_accept_in_the_browser(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from segany.annotate import create_app

    images = tmp_path / "images"
    images.mkdir()
    if PHOTO.is_file():
        shutil.copy(PHOTO, images / PHOTO.name)
    else:
        cv2.imwrite(str(images / "scene.jpg"), make_test_image(400, 600)[..., ::-1])
    ckpt = tmp_path / "blob.pth"
    torch.save(build_blob_sam(seed=0).state_dict(), ckpt)
    out = tmp_path / "out"
    app = create_app(str(images), str(ckpt), str(out))
    with Server(app) as url:
        driver = browser()
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "0")
            canvas = driver.find_element(By.ID, "overlay")
            w, h = (int(canvas.get_attribute(a)) for a in ("width", "height"))
            shown = canvas.size  # CSS pixels: the canvas is scaled to the window
            fx, fy = 0.45, 0.55  # the click, as a fraction of the image
            ActionChains(driver).move_to_element_with_offset(
                canvas, int((fx - 0.5) * shown["width"]), int((fy - 0.5) * shown["height"])
            ).click().perform()
            wait.until(lambda d: "mask in" in d.find_element(By.ID, "status").text)
            drawn = driver.execute_script(
                "const c = document.getElementById('overlay'), d = c.getContext('2d')"
                ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
                "for (let k = 3; k < d.length; k += 4) if (d[k] === 150) n++; return n;"
            )  # pixels of the draft mask's colour
            draft = driver.execute_script("return S.draft.reduce((a, b) => a + b, 0)")  # the page's mask
            assert 0 < drawn <= draft and drawn > draft - 1000  # drawn, but under the click's marker
            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)
            wait.until(lambda d: "stored mask" in d.find_element(By.ID, "status").text)
            if os.environ.get("SEGANY_SCREENSHOT"):
                driver.save_screenshot(os.environ["SEGANY_SCREENSHOT"])
            driver.get(url + "stats")  # the statistics page plots the one mask
            wait.until(lambda d: "1 images, 1 masks (manual 1)" in d.find_element(By.ID, "summary").text)
            assert len(driver.find_elements(By.CSS_SELECTOR, "#per-image svg rect")) == 1
            assert len(driver.find_elements(By.CSS_SELECTOR, "#seconds svg circle")) == 1
        finally:
            driver.quit()
    (shard,) = out.glob("*.tar")
    with tarfile.open(shard) as t:
        (meta,) = [json.load(io.BytesIO(t.extractfile(m).read())) for m in t.getmembers() if m.name.endswith(".json")]
    (ann,) = meta["annotations"]
    seg = ann["segmentation"]
    mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
    assert mask.shape == (h, w) and ann["source"] == "manual" and ann["clicks"] == 1
    ((x, y),) = ann["point_coords"]
    assert abs(x - fx * w) < 0.02 * w and abs(y - fy * h) < 0.02 * h  # the click landed where we clicked
    assert mask.sum() == draft  # the stored mask is the one drawn

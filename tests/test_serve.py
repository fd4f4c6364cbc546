"""`bgjax serve` as a person uses it: the server started on 127.0.0.1 with the bundled model, the page driven in
a real headless Chromium (Debian's chromium and chromium-driver, through selenium), plus the page's input
handling in-process."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from bgjax.demo import MODEL, PRODUCTS
from bgjax.sampling.pipeline import BackgroundPipeline
from bgjax.serve import CUTOUT, PHOTO, App, BadInput, Defaults, product_inputs

# The network is closed: nothing may try to reach out (updates, sync, QUIC probes).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1700")
PRODUCT = PRODUCTS / "rice_cooker.png"  # a 64 px RGBA product photo: its alpha marks the product


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`bgjax serve` on 127.0.0.1 (4 steps, 1 image: what it compiles at start); (url, temporary folder, process)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bgjax.cli", "serve", "--port", str(port), "--steps", "4",
                             "--num-images", "1"], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, tmp, deadline = [], None, time.time() + 900  # loading and compiling takes minutes on a loaded machine
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("the server stopped:\n" + "".join(lines))
        lines.append(line)
        if "are kept in " in line:
            tmp = Path(line.split("are kept in ")[1].split(" until")[0])
        if f"127.0.0.1:{port}" in line:
            break
    yield f"http://127.0.0.1:{port}", tmp, proc
    if proc.poll() is None:  # a test failed before the one that stops it: stop it the same way (it cleans up)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="bgjax-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(browser, url: str) -> WebDriverWait:
    browser.get(url)
    return WebDriverWait(browser, 180)


def _find(wait: WebDriverWait, css: str):
    """The first element `css` selects, once the page has rendered it."""
    return wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, css))[0]


def _text(wait: WebDriverWait, css: str, text: str) -> None:
    wait.until(lambda d: any(text in e.text for e in d.find_elements(By.CSS_SELECTOR, css)))


def _upload(wait: WebDriverWait, path: Path) -> None:
    _find(wait, "#product input[type=file]").send_keys(str(path))
    _text(wait, "#product", path.stem)


def test_upload_generate_and_the_product_is_untouched(server, browser, tmp_path):
    """Upload a bundled product photo, choose its category from the dropdown, type a seed, generate: the result
    appears in the gallery, captioned with the category and seed, served from the server's temporary folder, and
    every product pixel (alpha 255) of the upload is in it unchanged while the background is generated."""
    url, tmp, _ = server
    wait = _open(browser, url)
    _upload(wait, PRODUCT)
    _find(wait, "#category input").click()
    _find(wait, "[role=option][aria-label='rice cooker']").click()
    seed = _find(wait, "#seed input[type=number]")
    seed.send_keys(Keys.CONTROL, "a")  # a modifier stays down until the call ends
    seed.send_keys("7", Keys.TAB)
    _find(wait, "#generate").click()
    _text(wait, "#results", "rice cooker, seed 7")
    src = _find(wait, "#results img").get_attribute("src")
    screenshot = tmp_path / "bgjax_serve.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert src.startswith(f"{url}/gradio_api/file={tmp}/")  # results live in the temporary folder
    with urllib.request.urlopen(src) as response:
        result = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    upload = np.asarray(Image.open(PRODUCT))
    product = upload[..., 3] == 255
    assert result.shape == upload.shape[:2] + (3,)
    np.testing.assert_array_equal(result[product], upload[..., :3][product])
    assert np.abs(result[~product].astype(int) - 255).mean() > 20  # a generated background, not the white canvas
    assert "Traceback" not in browser.page_source


def test_a_mask_painted_with_the_brush(server, browser):
    """A photo without alpha and no mask file: paint over part of it in the page's editor, generate; the painted
    part comes back unchanged, the rest is generated."""
    url, _, _ = server
    wait = _open(browser, url)
    photo = PRODUCTS / "reference_dark.png"
    _upload(wait, photo)
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if "Mask: a file" in b.text).click()
    canvas = wait.until(lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#editor canvas") if c.size["width"]])
    time.sleep(1)  # the photo is drawn into the editor after the upload's change event
    ActionChains(browser).move_to_element(canvas[-1]).click_and_hold().move_by_offset(30, 0).move_by_offset(0, 30) \
        .release().perform()
    _find(wait, "#generate").click()
    _text(wait, "#results", "seed 0, image 0")
    with urllib.request.urlopen(_find(wait, "#results img").get_attribute("src")) as response:
        result = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    kept = (result == np.asarray(Image.open(photo).convert("RGB"))).all(-1).mean()
    assert 0.05 < kept < 0.95, kept


def test_bad_input_is_a_message_in_the_page(server, browser, tmp_path):
    url, _, _ = server
    wait = _open(browser, url)
    broken = tmp_path / "broken_photo.png"
    broken.write_bytes(PRODUCT.read_bytes()[:100])  # a truncated PNG
    _upload(wait, broken)
    _find(wait, "#generate").click()
    _text(wait, "body", "product: unreadable or truncated image")
    wait = _open(browser, url)
    _upload(wait, PRODUCTS / "reference_dark.png")  # a photo without alpha, and no mask given
    _find(wait, "#generate").click()
    _text(wait, "body", "no mask: upload a mask file")
    assert "Traceback" not in browser.page_source


def test_stopping_the_server_removes_its_temporary_folder(server):
    _, tmp, proc = server
    assert tmp is not None and any(tmp.rglob("*.png"))  # what was uploaded and generated lives there
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert not tmp.exists()


def _layer(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    layer = np.zeros((size[1], size[0], 4), np.uint8)
    layer[box[1]:box[3], box[0]:box[2]] = (255, 0, 255, 255)
    return Image.fromarray(layer, "RGBA")


def test_mask_sources_in_order_and_aspect_ratios(tmp_path):
    """A mask file beats brush strokes, strokes beat the photo's alpha; strokes painted on a larger canvas are
    scaled to the photo; a padded aspect keeps the photo's pixels in the middle; a cut-out is placed."""
    photo = np.asarray(Image.open(PRODUCT))
    mask_file = tmp_path / "mask.png"
    file_mask = np.zeros((64, 64), np.uint8)
    file_mask[:10, :10] = 255
    Image.fromarray(file_mask).save(mask_file)
    editor = {"background": None, "layers": [_layer((128, 128), (0, 64, 32, 128))], "composite": None}
    rgb, mask = product_inputs(str(PRODUCT), PHOTO, str(mask_file), editor, "as uploaded", 64)
    np.testing.assert_array_equal(mask, file_mask)
    np.testing.assert_array_equal(rgb[photo[..., 3] == 255], photo[..., :3][photo[..., 3] == 255])
    _, mask = product_inputs(str(PRODUCT), PHOTO, None, editor, "as uploaded", 64)
    assert mask[32:, :16].all() and not mask[:32].any() and not mask[:, 16:].any()
    plain, plain_mask = product_inputs(str(PRODUCT), PHOTO, None, None, "as uploaded", 64)
    np.testing.assert_array_equal(plain_mask > 0, photo[..., 3] > 127)
    rgb, mask = product_inputs(str(PRODUCT), PHOTO, None, None, "16:9", 64)
    assert mask.shape == (64, 114) and not mask[:, :25].any() and not mask[:, 89:].any()
    np.testing.assert_array_equal(mask[:, 25:89], plain_mask)
    np.testing.assert_array_equal(rgb[:, 25:89], plain)
    rgb, mask = product_inputs(str(PRODUCT), CUTOUT, None, None, "3:4", 64)
    assert mask.shape == (64, 48) and mask.any() and not mask[:, :4].any()
    with pytest.raises(BadInput, match="needs an alpha channel"):
        product_inputs(str(PRODUCTS / "reference_dark.png"), CUTOUT, None, None, "1:1", 64)


@pytest.fixture(scope="module")
def bundled() -> BackgroundPipeline:
    return BackgroundPipeline.from_pretrained(MODEL)


def test_the_handler_turns_bad_input_into_messages(bundled, tmp_path):
    app = App(bundled, Defaults(steps=2, num_images=1))
    settings = dict(kind=PHOTO, mask_file=None, editor=None, reference=None, reference_mask=None,
                    aspect="as uploaded", guidance=7.5, steps=2, lambda_cg=1.0, lambda_pg=1.0, seed=0, num_images=1,
                    keep_product=True, edge_fill=True)
    with pytest.raises(gr.Error, match="category 'teapot': this model knows coffee mug, desk lamp"):
        app.generate(str(PRODUCT), category="teapot", **settings)
    bomb = tmp_path / "huge.png"
    Image.new("L", (8200, 8200)).save(bomb)
    with pytest.raises(gr.Error, match="product: decompression bomb refused"):
        app.generate(str(bomb), category="rice cooker", **settings)
    with pytest.raises(gr.Error, match="product: nothing uploaded"):
        app.generate(None, category="rice cooker", **settings)
    empty = tmp_path / "empty_mask.png"
    Image.new("L", (64, 64)).save(empty)
    with pytest.raises(gr.Error, match="mask: no product pixels"):
        app.generate(str(PRODUCT), category="rice cooker", **{**settings, "mask_file": str(empty)})


def test_the_keep_product_and_edge_fill_checkboxes_reach_the_pipeline(bundled):
    """The page's settings, the checkboxes included, arrive in the pipeline call (a handler that dropped one
    would always generate with the pipeline's default, off)."""
    calls = []
    app = App(bundled, Defaults(steps=2, num_images=1))
    assert Defaults().keep_product and Defaults().edge_fill  # the page starts with them on, as the demo runs

    class Recorder:
        resolution = bundled.resolution

        def __call__(self, **kwargs):
            calls.append(kwargs)
            return [Image.new("RGB", (8, 8))]

    app.pipe = Recorder()
    settings = dict(kind=CUTOUT, mask_file=None, editor=None, reference=None, reference_mask=None,
                    aspect="as uploaded", guidance=7.5, steps=2, lambda_cg=1.0, lambda_pg=1.0, seed=3, num_images=1)
    for keep, fill in ((True, False), (False, True)):
        app.generate(str(PRODUCT), category="rice cooker", keep_product=keep, edge_fill=fill, **settings)
    assert [(c["keep_product"], c["edge_fill"]) for c in calls] == [(True, False), (False, True)]
    assert calls[0]["seed"] == 3 and calls[0]["steps"] == 2

"""tools/serve.py's page in a real browser: headless Chromium (Debian's package, driven by
Selenium) types a vocabulary with a novel class, uploads a shapes val image, and finds the
picture and the expected classes in the table.

By default the model is the tests' tiny random one on tests/tiny_world.py's world. With
VILD_D2_SHAPES_MODEL=<weights> it is configs/Shapes/vild_ensemble.yaml with those weights
(`make demo`'s model) on the demo's world; VILD_D2_SCREENSHOT=<file.png> keeps the screenshot
there (docs/images/serve_page.png in the README comes from this test)."""

import vild_d2  # noqa: F401  (first: compat bridges)

import os
import shutil
import time
from pathlib import Path

import cv2
import pytest
from detectron2.data import MetadataCatalog

from vild_d2 import ViLDPredictor
from vild_d2.config import load_config
from vild_d2.serve import DetectionService, ServerThread, build_app

from tiny_world import TINY_SPEC, TRAIN_NAMES, make_random_model, make_world  # tests/ helper

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHAPES_MODEL = os.environ.get("VILD_D2_SHAPES_MODEL", "")
SCREENSHOT = os.environ.get("VILD_D2_SCREENSHOT", "")

pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="no Chromium: install Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver; .ci/run does it)",
    ),
    pytest.mark.slow,  # a browser and a server
]


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_clip_path):
    """(config file, opts, image, typed names, the novel ones among them, threshold)."""
    if SHAPES_MODEL:
        names = [
            "red star",
            "orange heart",
            "purple triangle",
            "yellow circle",
            "blue cross",
            "green square",
        ]
        image = Path("datasets/shapes/images/val/000000.png")
        opts = ["MODEL.WEIGHTS", SHAPES_MODEL, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05"]
        world_novel = set(MetadataCatalog.get("shapes_val").novel_classes)
        novel = {n for n in names if n in world_novel}
        return "configs/Shapes/vild_ensemble.yaml", opts, image, names, novel, 0.4
    root = tmp_path_factory.mktemp("toy_serve_browser")
    config_file, opts = make_random_model(root, tiny_clip_path)
    # The random model scores ~1.0 everywhere: few detections keep the whole table in view.
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "6"]
    world = make_world(root / "datasets", prefix="browser_shapes", spec=TINY_SPEC)
    image = sorted((world["root"] / "images" / "val").glob("*.png"))[0]
    # "purple star" is novel: not among the training names (tests/tiny_world.py TRAIN_NAMES).
    names = ["red square", "purple star"]
    return config_file, opts, image, names, set(names) - set(TRAIN_NAMES), 0.0


@pytest.fixture(scope="module")
def server(setting):
    config_file, opts, image, _, _, _ = setting
    predictor = ViLDPredictor(load_config(config_file, opts))
    service = DetectionService(predictor, samples={image.name: str(image)}, title=config_file)
    with ServerThread(build_app(service)) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1400",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _wait(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _status(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#status").text


def test_page_finds_a_novel_class_from_typed_names(server, browser, setting, tmp_path):
    from selenium.webdriver.common.by import By

    config_file, opts, image, names, novel, threshold = setting
    # The expected classes, from the predictor called directly.
    predictor = ViLDPredictor(load_config(config_file, opts))
    predictor.set_vocabulary(names)
    instances = predictor(cv2.imread(str(image)))["instances"]
    kept = instances[instances.scores >= threshold].pred_classes.tolist()
    expected = {names[c] for c in kept}
    assert expected & novel, "the setting must show a novel class"

    driver = browser
    driver.get(server.url + "/")
    button = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#detect"), "the page")[0]
    # Bad input is shown on the page: no image yet.
    button.click()
    _wait(lambda: "Error" in _status(driver), "the error message")
    assert "no image" in _status(driver)

    driver.find_element(By.CSS_SELECTOR, "#names textarea").send_keys(", ".join(names))
    slider = driver.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
    slider.clear()
    slider.send_keys(str(threshold))
    driver.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys(str(image.resolve()))
    # Wait for the upload to land before asking (the button is disabled while uploading).
    uploaded = f'#images td.filename[aria-label="{image.name}"]'
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, uploaded), "the upload")
    button.click()
    _wait(lambda: "detections" in _status(driver), "the result")
    assert "Error" not in _status(driver)

    pictures = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#pictures img"), "the picture")
    assert (
        _wait(
            lambda: driver.execute_script("return arguments[0].naturalWidth", pictures[0]),
            "the picture to load",
        )
        > 0
    )
    # The table's cells (a virtual grid: only its visible rows exist, enough here).
    table = {}
    for cell in driver.find_elements(By.CSS_SELECTOR, "#table [role=gridcell]"):
        row, col = int(cell.get_attribute("data-row")), int(cell.get_attribute("data-col"))
        table.setdefault(row, {})[col] = cell.text.strip()
    assert len(table) == len(kept)
    assert {r[1] for r in table.values()} == expected  # column 1: the class
    assert all((r[2] == "yes") == (r[1] in novel) for r in table.values())  # 2: novel
    assert any(
        "download" in (a.get_attribute("download") or "") or a.get_attribute("href")
        for a in driver.find_elements(By.CSS_SELECTOR, "#json a")
    )

    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "serve_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0

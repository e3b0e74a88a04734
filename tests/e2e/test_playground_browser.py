"""The playground in a real browser: Debian's headless Chromium, driven by Selenium through Debian's chromedriver,
against a real uvicorn server (CLIPSERVE_PLAYGROUND on, the demo model).

Skipped when the browser, the driver or Selenium is missing, unless CLIPSERVE_REQUIRE_BROWSER=1 (CI, where
.ci/run installs them): then it fails. CLIPSERVE_SCREENSHOTS_DIR, when set, receives the README's screenshots
(playground-desktop.png, playground-phone.png); otherwise they go to a temporary folder.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import live_server, shape_png

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
LABELS = "red circle, blue square, green triangle"
WAIT_S = 30  # only turns a hang into a failure; every wait returns as soon as its condition holds
API_KEY = "playground-test-key"

pytestmark = pytest.mark.timeout(240)


def _require_browser() -> None:
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if not Path(CHROMIUM).exists():
        missing.append("chromium (apt-get install chromium)")
    if not Path(CHROMEDRIVER).exists():
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        message = f"the browser test needs {', '.join(missing)}"
        if os.environ.get("CLIPSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1280,900",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(browser) -> Iterator[str]:
    with live_server(playground=True) as (_, url):
        yield url


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, (shape, colour) in {
        "red-circle": ("circle", "red"),
        "blue-square": ("square", "blue"),
        "green-triangle": ("triangle", "green"),
    }.items():
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(shape_png(shape, colour))
    return paths


@pytest.fixture
def page(browser, server) -> Iterator[Any]:
    """The playground freshly loaded at desktop size; afterwards, the browser logged no error (a CSP violation, a
    script error, a failed asset)."""
    browser.get(f"{server}/")
    wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready") == "true")
    wait(browser, lambda d: "clipserve-demo" in d.find_element("id", "model-info").text)
    browser.get_log("browser")  # start clean
    yield browser
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    # A failed request logs a SEVERE entry too: the tests that provoke an error answer (422) leave theirs out.
    unexpected = [entry for entry in errors if "the server responded with a status of 422" not in entry["message"]]
    assert not unexpected, unexpected


def wait(driver: Any, condition: Callable[[Any], Any], timeout_s: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(condition)


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def results(driver: Any) -> list[list[str]]:
    """The result blocks' labels, top first."""
    blocks = driver.find_elements("css selector", "[data-testid=result]")
    return [[label.text for label in b.find_elements("css selector", "[data-testid=bar-label]")] for b in blocks]


def classify(driver: Any, files: list[Path], labels: str) -> None:
    for file in files:
        by_id(driver, "images").send_keys(str(file))
    wait(driver, lambda d: len(d.find_elements("css selector", "#previews img")) == len(files))
    field = by_id(driver, "labels")
    field.clear()
    field.send_keys(labels)
    by_id(driver, "classify-submit").click()
    wait(driver, lambda d: len(d.find_elements("css selector", "[data-testid=result]")) == len(files))


def direct_error(server: str, image: Path) -> dict[str, Any]:
    """What the API itself answers to an image without labels."""
    response = httpx.post(f"{server}/classify", files={"image": ("red-circle.png", image.read_bytes(), "image/png")})
    assert response.status_code == 422
    return response.json()["error"]


def test_an_uploaded_red_circle_is_ranked_red_circle_first(page, server, images):
    classify(page, [images["red-circle"]], LABELS)
    [ranking] = results(page)
    assert ranking[0] == "red circle"
    assert sorted(ranking) == sorted(label.strip() for label in LABELS.split(","))
    bars = page.find_elements("css selector", "[data-testid=bar]")
    assert all(bar.get_attribute("title").startswith("cosine ") for bar in bars)
    probabilities = [
        float(bar.text.rstrip(" %").lstrip("<>"))
        for bar in page.find_elements("css selector", "[data-testid=bar-probability]")
    ]
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > 50
    meta = by_id(page, "classify-meta").text
    assert "clipserve-demo" in meta and "ms" in meta
    assert by_id(page, "classify-error").text == ""


def test_an_empty_label_list_shows_the_services_error(page, server, images):
    by_id(page, "images").send_keys(str(images["red-circle"]))
    by_id(page, "labels").clear()
    by_id(page, "classify-submit").click()
    error = wait(page, lambda d: by_id(d, "classify-error").text)
    expected = direct_error(server, images["red-circle"])
    assert expected["message"] in error and expected["code"] in error
    assert results(page) == []


def test_the_embed_view_cosine_of_two_texts_matches_embed(page, server):
    by_id(page, "tab-embed").click()
    texts = ["a red circle", "a blue square"]
    for slot, text in zip("ab", texts, strict=True):
        field = by_id(page, f"embed-{slot}-text")
        field.clear()
        field.send_keys(text)
    by_id(page, "embed-submit").click()
    shown = wait(page, lambda d: by_id(d, "embed-cosine").get_attribute("data-cosine"))
    answer = httpx.post(f"{server}/embed", json={"texts": texts}).json()
    expected = cosine(*answer["texts"])
    assert abs(float(shown) - expected) < 1e-6
    assert abs(float(by_id(page, "embed-cosine").text) - expected) <= 5e-5 + 1e-7  # shown to 4 decimals
    assert by_id(page, "embed-dim").text == str(answer["dim"])
    assert by_id(page, "embed-model").text == answer["model"]


def test_the_embed_view_compares_an_image_with_a_text(page, server, images):
    by_id(page, "tab-embed").click()
    by_id(page, "embed-a-kind-image").click()
    by_id(page, "embed-a-image").send_keys(str(images["red-circle"]))
    wait(page, lambda d: d.find_element("css selector", "#slot-a .slot-preview").is_displayed())
    field = by_id(page, "embed-b-text")
    field.clear()
    field.send_keys("a red circle")
    by_id(page, "embed-submit").click()
    shown = wait(page, lambda d: by_id(d, "embed-cosine").get_attribute("data-cosine"))
    image = base64.b64encode(images["red-circle"].read_bytes()).decode()
    answer = httpx.post(f"{server}/embed", json={"images": [image], "texts": ["a red circle"]}).json()
    assert abs(float(shown) - cosine(answer["images"][0], answer["texts"][0])) < 1e-6


DROP = """
const [selector, kind, done] = arguments;
const canvas = document.createElement("canvas");
canvas.width = 120; canvas.height = 90;
const context = canvas.getContext("2d");
context.fillStyle = "lightgrey"; context.fillRect(0, 0, 120, 90);
context.fillStyle = "red"; context.beginPath(); context.arc(60, 45, 30, 0, 2 * Math.PI); context.fill();
canvas.toBlob((blob) => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], "drawn-circle.png", {type: "image/png"}));
  const target = document.querySelector(selector);
  const event = kind === "paste"
    ? new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true})
    : new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true});
  target.dispatchEvent(event);
  done(true);
}, "image/png");
"""


def test_images_can_be_dropped_and_pasted(page):
    page.execute_async_script(DROP, "#images-drop", "drop")
    page.execute_async_script(DROP, "body", "paste")
    wait(page, lambda d: len(d.find_elements("css selector", "#previews img")) == 2)
    page.find_element("css selector", "#previews button").click()  # remove the first again
    wait(page, lambda d: len(d.find_elements("css selector", "#previews img")) == 1)
    by_id(page, "classify-submit").click()
    wait(page, lambda d: results(d))
    assert results(page)[0][0] == "red circle"


def test_a_classifier_made_on_the_page_takes_examples_and_classifies(page, images):
    by_id(page, "tab-classifiers").click()
    by_id(page, "new-name").send_keys("browser-shapes")
    by_id(page, "new-labels").send_keys("red circle\nblue square")
    by_id(page, "create-submit").click()
    item = wait(page, lambda d: d.find_element("css selector", "[data-testid=classifier][data-name=browser-shapes]"))
    wait(page, lambda d: "ready" in item.find_element("css selector", ".badge").text)
    targets = wait(page, lambda d: d.find_elements("css selector", "[data-testid=label-target]"))
    assert [t.get_attribute("data-label") for t in targets] == ["red circle", "blue square"]

    by_id(page, "example-input-1").send_keys(str(images["blue-square"]))  # the label's "Add images" button
    wait(page, lambda d: "1 example" in targets[1].text)
    page.execute_async_script(DROP, "[data-testid=label-target][data-label='red circle']", "drop")
    wait(page, lambda d: "1 example" in targets[0].text)
    assert "2 example images" in item.text

    item.find_element("xpath", ".//button[normalize-space()='Classify with it']").click()
    assert by_id(page, "panel-classify").is_displayed() and by_id(page, "classifier").get_attribute("value") == (
        "browser-shapes"
    )
    by_id(page, "images").send_keys(str(images["red-circle"]))
    by_id(page, "classify-submit").click()
    wait(page, lambda d: results(d))
    assert results(page) == [["red circle", "blue square"]]
    assert "browser-shapes" in by_id(page, "classify-meta").text


def test_the_tabs_are_keyboard_operable(page):
    from selenium.webdriver.common.keys import Keys

    by_id(page, "tab-classify").send_keys(Keys.TAB)  # the drop zone's file input comes next: Enter opens it
    assert page.switch_to.active_element.get_attribute("id") == "images"
    by_id(page, "tab-classify").send_keys(Keys.ARROW_RIGHT)
    assert page.switch_to.active_element.get_attribute("id") == "tab-embed"
    assert by_id(page, "panel-embed").is_displayed() and not by_id(page, "panel-classify").is_displayed()
    page.switch_to.active_element.send_keys(Keys.END)
    assert by_id(page, "panel-classifiers").is_displayed()


def test_screenshots_after_a_classification(page, images, tmp_path):
    folder = Path(os.environ.get("CLIPSERVE_SCREENSHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    classify(page, [images["red-circle"], images["blue-square"]], LABELS)
    assert [ranking[0] for ranking in results(page)] == ["red circle", "blue square"]
    shots = {
        "desktop": (1280, 900, "0"),
        "phone": (390, 844, "document.getElementById('labels').getBoundingClientRect().top + window.scrollY - 48"),
    }
    try:
        for name, (width, height, scroll) in shots.items():
            page.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": name == "phone"},
            )
            wait(page, lambda d, w=width: d.execute_script("return window.innerWidth") == w)
            page.execute_script(f"window.scrollTo(0, {scroll});")
            path = folder / f"playground-{name}.png"
            assert page.save_screenshot(str(path))
            with Image.open(path) as shot:
                assert shot.size == (width, height)
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_an_api_key_is_asked_for_and_kept_in_memory_only(browser, images):
    with live_server(playground=True, api_keys=[API_KEY]) as (_, url):
        browser.get(f"{url}/")
        wait(browser, lambda d: by_id(d, "auth").is_displayed())
        by_id(browser, "api-key").send_keys("not-the-key")
        by_id(browser, "api-key-submit").click()
        wait(browser, lambda d: "API key" in by_id(d, "auth-error").text)
        field = by_id(browser, "api-key")
        field.clear()
        field.send_keys(API_KEY)
        by_id(browser, "api-key-submit").click()
        wait(browser, lambda d: not by_id(d, "auth").is_displayed())
        wait(browser, lambda d: "clipserve-demo" in by_id(d, "model-info").text)
        classify(browser, [images["red-circle"]], LABELS)
        assert results(browser)[0][0] == "red circle"
        stored = browser.execute_script("return localStorage.length + sessionStorage.length + document.cookie.length")
        assert stored == 0
        assert API_KEY not in browser.page_source and API_KEY not in browser.current_url


def cosine(a: list[float], b: list[float]) -> float:
    u, v = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

"""The /ui pages in a real headless browser (Debian's chromium + chromium-driver, selenium) against `bentoml serve`.

Skips with the reason when selenium, chromium or chromedriver is missing (.ci/run installs them where it can).
Set CELLSCAN_SCREENSHOTS=DIR to keep the screenshots of the scans page and a scan's page (docs/ holds the README's).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.test_service import KEY, served  # noqa: F401 (the module-scoped fixture: a trained project served)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not CHROMIUM or not DRIVER:
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    drv.set_page_load_timeout(120)
    yield drv
    drv.quit()


def _fresh_files(served, folder: str, n: int, shift: int, out: Path) -> list[Path]:  # noqa: F811
    """New images (dataset images rolled sideways): pixels the dataset does not hold yet."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in sorted((served["project"] / "data/cells" / folder).glob("*.png"))[:n]:
        arr = np.asarray(Image.open(p))
        # defects: rolled sideways (a seam is fine); normals: mirrored, one grey level up (still a normal cell)
        arr = np.fliplr(arr) + np.asarray(shift, arr.dtype) if "good" in folder else np.roll(arr, shift, axis=1)
        target = out / f"{folder.replace('/', '_')}_{shift}_{p.name}"
        Image.fromarray(arr).save(target)
        paths.append(target)
    return paths


def _upload(browser, served, files: list[Path]) -> list:  # noqa: F811
    browser.get(f"{served['base']}/ui/upload")
    browser.find_element(By.ID, "upload-files").send_keys("\n".join(str(f) for f in files))
    browser.find_element(By.CSS_SELECTOR, "#upload-form button").click()
    WebDriverWait(browser, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == len(files))
    return browser.find_elements(By.CSS_SELECTOR, "#results .result")


def _scans(served, **filters: str) -> list[int]:  # noqa: F811
    """Scan ids on the scans page for a filter (read from the HTML the browser also gets)."""
    html = httpx.get(f"{served['base']}/ui/scans", params=filters, timeout=60).text
    return [int(part.split('"', 1)[0]) for part in html.split('data-scan="')[1:]]


def _key(browser) -> None:
    """The key, entered once for this tab (what the key prompt stores)."""
    browser.execute_script("sessionStorage.setItem('cellscan-api-key', arguments[0])", KEY)


def _shot(browser, name: str) -> None:
    folder = os.environ.get("CELLSCAN_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / name))


def _wait_version(served, version: int, seconds: int = 60) -> None:  # noqa: F811
    for _ in range(seconds * 2):
        if httpx.get(f"{served['base']}/health", timeout=10).json()["model_version"] == version:
            return
        time.sleep(0.5)
    raise AssertionError(f"the service did not switch to version {version}")


def test_upload_flags_a_defect_with_its_heatmap(browser, served, tmp_path):  # noqa: F811
    defects = _fresh_files(served, "test/void", 2, 3, tmp_path) + _fresh_files(served, "test/crack", 2, 3, tmp_path)
    results = _upload(browser, served, defects)
    flagged = [r for r in results if r.find_elements(By.CSS_SELECTOR, ".badge.anomaly")]
    assert flagged, [r.text for r in results]
    heat = flagged[0].find_element(By.CSS_SELECTOR, "img.heatmap")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat) == 48
    # The scans page lists it (newest first, thumbnails), and its page shows the overlay at the image's size.
    time.sleep(1.5)  # the prediction log writes in a background thread
    browser.get(f"{served['base']}/ui/scans?verdict=anomaly")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.scans tbody tr")
    assert rows and all("anomaly" in r.get_attribute("class") for r in rows)
    thumb = rows[0].find_element(By.CSS_SELECTOR, "img.thumb")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return arguments[0].naturalWidth", thumb) > 0)
    rows[0].find_element(By.CSS_SELECTOR, "td a").click()
    overlay = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "heat-img"))
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return arguments[0].naturalWidth", overlay) == 48)
    assert browser.find_element(By.ID, "judged").text == "anomaly"
    browser.find_element(By.ID, "heat-opacity").send_keys("\ue012" * 5)  # arrow left: less opaque
    assert float(overlay.value_of_css_property("opacity")) < 1
    _shot(browser, "ui-scan.png")
    browser.find_element(By.ID, "heat-on").click()
    assert not overlay.is_displayed()


def test_false_alarm_is_queued_for_retraining(browser, served, tmp_path):  # noqa: F811
    # A flagged scan of a normal image when there is one, else a flagged one (the operator's call either way).
    goods = _fresh_files(served, "test/good", 6, 5, tmp_path)
    _upload(browser, served, goods)
    time.sleep(1.5)
    flagged = [i for i in _scans(served, verdict="anomaly", review="unreviewed")]
    assert flagged
    scan = flagged[0]
    browser.get(f"{served['base']}/ui/scans/{scan}")
    # Without the key the page asks for it; refused until given.
    browser.execute_script("sessionStorage.clear(); window.prompt = () => null;")
    browser.find_element(By.ID, "v-false_alarm").click()
    WebDriverWait(browser, 10).until(lambda d: "API key" in d.find_element(By.ID, "status").text)
    _key(browser)
    browser.find_element(By.ID, "v-false_alarm").click()
    review = WebDriverWait(browser, 60).until(
        lambda d: (t := d.find_element(By.ID, "review").text).startswith("false_alarm") and t)
    assert "key-" in review and "stored as" in review, review
    stored = served["project"] / review.split("stored as ")[1].split(" ·")[0].strip()
    assert stored.is_file() and "temp" in stored.parts  # where /retrain queues new normals
    assert scan in _scans(served, review="false_alarm") and scan not in _scans(served, review="unreviewed")
    browser.get(f"{served['base']}/ui/scans")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"))
    _shot(browser, "ui-scans.png")


def test_rollback_from_the_models_page_serves_the_older_version(browser, served, tmp_path):  # noqa: F811
    # A second version: a missed defect on a scan judged normal stores a known anomaly and re-evaluates the threshold.
    normal = _scans(served, verdict="normal", review="unreviewed")
    if not normal:
        _upload(browser, served, _fresh_files(served, "test/good", 6, 7, tmp_path))
        time.sleep(1.5)
        normal = _scans(served, verdict="normal", review="unreviewed")
    with httpx.Client(base_url=served["base"], timeout=300, headers={"x-api-key": KEY}) as c:
        if normal:
            browser.get(f"{served['base']}/ui/scans/{normal[0]}")
            _key(browser)
            browser.find_element(By.ID, "v-missed_defect").click()
            review = WebDriverWait(browser, 60).until(
                lambda d: (t := d.find_element(By.ID, "review").text).startswith("missed_defect") and t)
            job = review.split("job ")[1].split(" ")[0]
            assert "stored as" in review and "anomaly" in review
        else:  # the one-epoch model flags every scan here: the second version comes through /anomaly instead
            (defect,) = _fresh_files(served, "test/particle", 1, 11, tmp_path)
            job = c.post("/anomaly", files={"image": (defect.name, defect.read_bytes(), "image/png")},
                         data={"defect": "particle", "wait": "false"}).json()["job_id"]
        for _ in range(600):
            state = c.get(f"/jobs/{job}").json()
            if state["status"] in ("done", "failed"):
                break
            time.sleep(1)
        assert state["status"] == "done", state
        if c.get("/health").json()["model_version"] != 2:  # the gate kept v1: make v2 the champion by hand
            from cellscan.mlops import registry
            from cellscan.settings import Settings

            registry.promote(Settings.from_env(served["project"], env=served["env"]), 2, "ui test")
        _wait_version(served, 2)
        browser.get(f"{served['base']}/ui/models")
        assert browser.find_element(By.ID, "serving").text == "2"
        _key(browser)
        page = browser.find_element(By.TAG_NAME, "html")
        browser.find_element(By.ID, "rollback-1").click()
        # the page reloads itself 0.6 s after a rollback: wait for that reload, or it may cancel the next
        # test's get()
        WebDriverWait(browser, 60).until(EC.staleness_of(page))
        WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.ID, "serving").text == "1")
        _wait_version(served, 1)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(Image.open(_fresh_files(served, "test/good", 1, 9, tmp_path)[0]))).save(buf, "PNG")
        pred = c.post("/predict", files={"image": ("after.png", buf.getvalue(), "image/png")}).json()
        assert pred["model_version"] == 1


@pytest.mark.parametrize("path", ["/docs", "/ui/api"])
def test_api_docs_page_offline(browser, served, path):  # noqa: F811
    browser.get(served["base"] + path)
    assert browser.current_url == served["base"] + path
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "POST /predict" in body and "POST /ui/scans/{scan_id}/verdict" in body and '"error"' in body
    links = browser.execute_script(
        "return [...document.querySelectorAll('script[src],link[href],img[src]')].map(e => e.src || e.href)")
    assert all(u.startswith(served["base"]) for u in links), links  # every asset from the service itself

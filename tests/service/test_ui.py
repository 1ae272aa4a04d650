"""The viewer page at /ui in real headless Chromium, against a real gateway on a port, a real worker and Redis.

A browser needs a real HTTP port, so the gateway runs under uvicorn as a task on the test's event loop beside the
worker, and Selenium is driven from a thread so that loop keeps serving. The page is tested as a user meets it:
upload through the file input, wait for the overlay, scroll the slices, read the report, reload by URL; and a
broken upload must show the API's error. With API keys configured, the page must ask for a key, send it with
every request (overlays and downloads included) and never leak it. Browser console errors fail the test, so a
page that half-works cannot pass. Without Debian's chromium and chromium-driver the browser tests are skipped,
never passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import httpx
import nibabel as nib
import numpy as np
import pytest
import redis.asyncio as aioredis
import uvicorn

from service.auth import REFUSED, entry_for, new_key
from service.config import QueueSettings, Settings
from service.gateway.app import create_app
from service.ops.metrics import Metrics
from service.worker.consumer import Worker
from tests.service.harness import disc_image, engine_for, make_settings, png_bytes, running

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
SLICES = 5
WAIT_S = 30.0
LEVELS = {"high", "medium", "low"}
# A refused request shows up in the console as a failed resource load; that is expected when we provoke it.
EXPECTED_HTTP_ERROR = re.compile(
    r"/v1/segmentations\S* - Failed to load resource: the server responded with a status of 4\d\d"
)


def test_the_viewer_files_are_served(
    redis_url: str, queue_settings: QueueSettings, tmp_path: Path, exported: Path
) -> None:
    """Cheap and browser-free, so it runs everywhere: the three files, the redirect and a JSON 404."""
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            redirect = await http.get("/ui")
            assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/"
            page = await http.get("/ui/")
            assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
            assert '<script type="module" src="app.js"></script>' in page.text
            assert 'href="style.css"' in page.text
            for name in ("key", "file", "submit", "job-id", "overlay", "slice", "error"):
                assert f'id="{name}"' in page.text
            script = await http.get("/ui/app.js")
            assert script.status_code == 200 and script.headers["content-type"] == "text/javascript; charset=utf-8"
            assert not re.search(r"\bconsole\.\w+\(", script.text)  # nothing of a job goes to the browser's logs
            assert "localStorage" not in script.text  # the key lives in sessionStorage, for this tab only
            style = await http.get("/ui/style.css")
            assert style.status_code == 200 and style.headers["content-type"] == "text/css; charset=utf-8"
            for missing in ("/ui/nope", "/ui/..%2Fui.py"):
                answer = await http.get(missing)
                assert answer.status_code == 404 and answer.headers["content-type"] == "application/json"
                assert answer.json()["code"] in {"output_not_available", "not_found"}

    asyncio.run(scenario())


def need_browser() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (Debian packages chromium and chromium-driver)")
    pytest.importorskip("selenium", reason="needs selenium 4 (the test extra)")


def test_the_viewer_in_headless_chromium(
    redis_url: str, queue_settings: QueueSettings, exported: Path, tmp_path: Path
) -> None:
    need_browser()
    settings = make_settings(redis_url, queue_settings, exported)
    volume = tmp_path / "discs.nii.gz"
    nib.save(nib.Nifti1Image(disc_volume(), np.diag([0.8, 0.8, 2.5, 1.0])), volume)
    broken = tmp_path / "x.png"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    async def scenario() -> None:
        async with serving(settings, exported) as base:
            await asyncio.to_thread(drive, base, volume, broken, tmp_path)

    asyncio.run(scenario())


def test_the_viewer_with_api_keys(
    redis_url: str, queue_settings: QueueSettings, exported: Path, tmp_path: Path
) -> None:
    """Keys configured: the page asks for one, sends it on every request and keeps it out of URLs and the DOM."""
    need_browser()
    key, other = new_key(), new_key()
    settings = make_settings(redis_url, queue_settings, exported).model_copy(
        update={"api_keys": f"{entry_for('ward', key)},{entry_for('lab', other)}"}
    )
    picture = tmp_path / "disc.png"
    picture.write_bytes(png_bytes(disc_image()))
    volume = tmp_path / "discs.nii.gz"
    nib.save(nib.Nifti1Image(disc_volume(), np.diag([0.8, 0.8, 2.5, 1.0])), volume)

    async def scenario() -> None:
        async with serving(settings, exported) as base:
            await asyncio.to_thread(drive_with_keys, base, key, other, picture, volume, tmp_path)

    asyncio.run(scenario())


def disc_volume() -> np.ndarray:
    """Discs of varying radius on a dark background, [x, y, z] as NIfTI stores them: a small MR-like volume."""
    yy, xx = np.mgrid[:80, :96]
    data = np.full((SLICES, 80, 96), 60, np.int16)
    for z, radius in enumerate((8, 14, 22, 16, 10)):
        data[z][(yy - 40) ** 2 + (xx - 48) ** 2 < radius**2] = 900
    return np.ascontiguousarray(data.transpose(2, 1, 0))


@contextlib.asynccontextmanager
async def serving(settings: Settings, exported: Path) -> AsyncIterator[str]:
    """The gateway under uvicorn on a free loopback port and a worker, on this loop; yields the base URL.

    The listening socket is bound here and handed to uvicorn, so no other process can take the port in between.
    """
    client = aioredis.Redis.from_url(settings.redis_url)
    metrics = Metrics()
    app = create_app(settings, metrics, client)
    worker = Worker(settings, engine_for(exported), client, metrics, consumer="ui-test")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on", ws="none"
    )
    server = uvicorn.Server(config)
    serve = asyncio.create_task(server.serve(sockets=[sock]))
    work = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 10)
        while not server.started:
            if serve.done():
                serve.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        worker.stop()
        await asyncio.wait_for(asyncio.gather(serve, work), 30)
        sock.close()
        await client.aclose()


def start_browser(profile: Path, downloads: Path | None = None) -> WebDriver:
    """Headless Chromium with nothing that phones home, and the chromedriver given, so Selenium downloads nothing.
    With ``downloads``, files the page saves land there without a prompt."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-quic", "--disable-extensions", "--disable-default-apps", f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    if downloads is not None:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def showing(driver: WebDriver, index: int, count: int = SLICES) -> Callable[[Any], bool]:
    """The overlay of slice ``index`` has loaded (from a blob: URL, the page fetched it) and the label says so."""
    from selenium.webdriver.common.by import By

    def check(_: Any) -> bool:
        shown = driver.execute_script(
            "const img = document.getElementById('overlay');"
            "return img.complete && img.naturalWidth > 0 && !img.hidden && img.src.startsWith('blob:')"
            "  ? img.dataset.slice : null;"
        )
        return shown == str(index) and driver.find_element(By.ID, "slice-label").text == f"{index + 1} / {count}"

    return check


def drive(base: str, volume: Path, broken: Path, tmp_path: Path) -> None:
    """Everything the browser does; runs in a thread while the event loop serves the page and the API."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = start_browser(tmp_path / "chromium-profile")
    try:
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.05)

        def find(element_id: str) -> Any:
            return driver.find_element(By.ID, element_id)

        # 1. a NIfTI volume through the file input, with a modality hint
        driver.get(f"{base}/ui/")
        wait.until(lambda _: find("status").get_attribute("data-status") == "idle")
        Select(find("modality")).select_by_value("MR")
        find("file").send_keys(str(volume))
        find("submit").click()
        wait.until(lambda _: find("status").get_attribute("data-status") in {"succeeded", "failed"})
        assert find("status").get_attribute("data-status") == "succeeded", find("error").text
        job_id = parse_qs(urlparse(driver.current_url).query)["job"][0]
        assert find("job-id").get_attribute("value") == job_id
        job = httpx.get(f"{base}/v1/segmentations/{job_id}", timeout=10).json()
        result = job["result"]
        assert result["input"]["shape"][0] == SLICES and result["input"]["modality"] == "MR"
        areas = {entry["index"]: entry["area"] for entry in result["mask"]["slices"]}
        first = max(range(SLICES), key=lambda k: (areas.get(k, 0), -k))  # the largest mask, as the page picks
        wait.until(showing(driver, first))
        slider = find("slice")
        assert slider.is_displayed() and slider.get_attribute("max") == str(SLICES - 1)
        assert slider.get_attribute("value") == str(first)

        score = float(find("score").get_attribute("textContent"))
        assert 0 <= score <= 1 and score == pytest.approx(result["reliability"]["score"], abs=5e-4)
        assert find("level").get_attribute("data-level") == result["reliability"]["level"] in LEVELS
        assert find("level").get_attribute("textContent") in LEVELS
        by_index = {entry["index"]: entry for entry in result["reliability"]["slices"]}
        assert float(find("slice-score").get_attribute("textContent")) == pytest.approx(
            by_index[first]["score"], abs=5e-4
        )
        assert find("slice-level").get_attribute("data-level") == by_index[first]["level"]
        assert len(find("slice-marks").find_elements(By.CLASS_NAME, "mark")) == SLICES
        assert result["model"]["name"] in find("model").text and result["model"]["version"] in find("model").text
        assert find("input-modality").text == "MR"
        assert not find("key-note").is_displayed()  # open: nothing asked for

        # the arrow keys (focus on the page, not a field), the buttons, the slider's own keys, the mouse wheel
        ActionChains(driver).move_to_element(find("overlay")).click().perform()
        step = -1 if first == SLICES - 1 else 1
        ActionChains(driver).send_keys(Keys.ARROW_LEFT if step < 0 else Keys.ARROW_RIGHT).perform()
        wait.until(showing(driver, first + step))
        assert find("slice").get_attribute("value") == str(first + step)
        find("prev" if step > 0 else "next").click()
        wait.until(showing(driver, first))
        find("slice").send_keys(Keys.END)
        wait.until(showing(driver, SLICES - 1))
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(find("overlay")), 0, -120).perform()
        wait.until(showing(driver, SLICES - 3))

        links = {name: find(f"download-{name}") for name in ("json", "nifti", "dicom-seg")}
        assert links["json"].get_attribute("href").endswith(f"/v1/segmentations/{job_id}/result?format=json")
        assert links["nifti"].is_displayed() and not links["dicom-seg"].is_displayed()  # a NIfTI has no SEG
        assert httpx.get(links["nifti"].get_attribute("href"), timeout=10).status_code == 200

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "viewer.png"))
        driver.save_screenshot(str(tmp_path / "viewer.png"))
        assert severe_errors(driver) == []

        # the job's URL opens it directly
        driver.get(f"{base}/ui/?job={job_id}")
        wait.until(showing(driver, first))
        assert find("status").get_attribute("data-status") == "succeeded"
        assert find("job-id").get_attribute("value") == job_id

        # 2. a broken upload: the API's refusal is shown, code and message
        driver.get(f"{base}/ui/")
        wait.until(lambda _: find("status").get_attribute("data-status") == "idle")
        find("file").send_keys(str(broken))
        find("submit").click()
        wait.until(lambda _: find("error").is_displayed())
        assert find("error-code").text in {"unsupported_format", "invalid_image"}
        assert find("error-message").text.strip()
        assert find("status").get_attribute("data-status") == "failed"
        assert not find("overlay").is_displayed() and not find("report").is_displayed()
        driver.save_screenshot(str(ARTIFACTS / "error.png"))

        # and an unknown job id typed in
        find("job-id").send_keys("no-such-job")
        find("open").click()
        wait.until(lambda _: find("error-code").text == "job_not_found")
        assert "job=no-such-job" in driver.current_url
        assert severe_errors(driver, allowed=EXPECTED_HTTP_ERROR) == []
    except (AssertionError, WebDriverException):
        driver.save_screenshot(str(tmp_path / "failure.png"))  # what the page showed, for the one who debugs it
        raise
    finally:
        driver.quit()


def drive_with_keys(base: str, key: str, other: str, picture: Path, volume: Path, tmp_path: Path) -> None:
    """The viewer against a service with keys: asked for one, then everything works with it, and it never leaks."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = start_browser(tmp_path / "chromium-profile", downloads)
    try:
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.05)

        def find(element_id: str) -> Any:
            return driver.find_element(By.ID, element_id)

        def status() -> str:
            wait.until(lambda _: find("status").get_attribute("data-status") in {"succeeded", "failed"})
            return find("status").get_attribute("data-status")

        def downloaded(link_id: str, name: str) -> bytes:
            """Click a download link: the page fetched it (200) and the browser saved the file under ``name``."""
            find(link_id).click()
            wait.until(lambda _: (downloads / name).is_file())
            url = find(link_id).get_attribute("href")
            fetched = driver.execute_script(
                "return performance.getEntriesByName(arguments[0]).map(e => [e.initiatorType, e.responseStatus]);",
                url,
            )
            assert ["fetch", 200] in fetched, fetched
            return (downloads / name).read_bytes()

        # no key: the upload is refused with the API's message, and the key field asks for one
        driver.get(f"{base}/ui/")
        wait.until(lambda _: find("status").get_attribute("data-status") == "idle")
        assert find("key").get_attribute("type") == "password" and find("key").get_attribute("autocomplete") == "off"
        find("file").send_keys(str(picture))
        find("submit").click()
        wait.until(lambda _: find("error").is_displayed())
        assert find("error-code").text == "unauthenticated"
        assert find("error-message").get_attribute("textContent") == REFUSED
        assert find("key-note").is_displayed() and "API key or token" in find("key-note").text
        assert driver.execute_script("return document.activeElement.id") == "key"

        # the key typed and Enter: the refused upload goes again, and the overlay is fetched with the key
        find("key").send_keys(key + Keys.ENTER)
        wait.until(lambda _: "job=" in driver.current_url)
        assert status() == "succeeded", find("error").text
        job_id = parse_qs(urlparse(driver.current_url).query)["job"][0]
        wait.until(showing(driver, 0, 1))
        assert not find("key-note").is_displayed() and not find("error").is_displayed()
        assert httpx.get(f"{base}/v1/segmentations/{job_id}", timeout=10).status_code == 401
        mine = httpx.get(f"{base}/v1/segmentations/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert mine.status_code == 200 and mine.json()["result"]["input"]["format"] == "png"
        assert json.loads(downloaded("download-json", f"{job_id}.json")) == mine.json()["result"]

        # a new page in the same tab keeps the key: a volume, its slices, its NIfTI
        driver.get(f"{base}/ui/")
        wait.until(lambda _: find("status").get_attribute("data-status") == "idle")
        Select(find("modality")).select_by_value("MR")
        find("file").send_keys(str(volume))
        find("submit").click()
        assert status() == "succeeded", find("error").text
        volume_id = parse_qs(urlparse(driver.current_url).query)["job"][0]
        start = int(find("slice").get_attribute("value"))
        wait.until(showing(driver, start))
        step = -1 if start == SLICES - 1 else 1
        find("prev" if step < 0 else "next").click()
        wait.until(showing(driver, start + step))
        find("slice").send_keys(Keys.HOME)
        wait.until(showing(driver, 0))
        assert downloaded("download-nifti", f"{volume_id}.nii.gz")[:2] == b"\x1f\x8b"  # gzip

        # nowhere but the field (and this tab's sessionStorage): not the URL, localStorage, the DOM, request URLs
        assert key not in driver.current_url
        assert driver.execute_script("return localStorage.length") == 0
        assert driver.execute_script("return sessionStorage.getItem('c2p-serve.key')") == key
        assert key not in driver.execute_script("return document.documentElement.outerHTML")
        assert key not in json.dumps(driver.execute_script("return performance.getEntries().map(e => e.name)"))
        assert find("key").get_attribute("value") == key
        assert severe_errors(driver, allowed=EXPECTED_HTTP_ERROR) == []

        # another tenant's key sees no such job
        find("key").clear()
        find("key").send_keys(other)
        find("job-id").clear()
        find("job-id").send_keys(volume_id)
        find("open").click()
        wait.until(lambda _: find("error-code").text == "job_not_found")
        assert not find("key-note").is_displayed()
        assert severe_errors(driver, allowed=EXPECTED_HTTP_ERROR) == []
    except (AssertionError, WebDriverException):
        driver.save_screenshot(str(tmp_path / "failure.png"))
        raise
    finally:
        driver.quit()


def severe_errors(driver: WebDriver, allowed: re.Pattern[str] | None = None) -> list[str]:
    """SEVERE browser console entries since the last call (reading the log empties it), less the expected ones."""
    from selenium.common.exceptions import WebDriverException

    try:
        entries = driver.get_log("browser")  # type: ignore[attr-defined]
    except (AttributeError, WebDriverException):  # a driver without the log endpoint: nothing to read
        return []
    return [
        entry["message"]
        for entry in entries
        if entry.get("level") == "SEVERE" and not (allowed and allowed.search(entry.get("message", "")))
    ]

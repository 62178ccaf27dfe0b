"""End to end in a real browser: the real server, headless Chromium, a live run.

Starts ``streamlit run app.py`` on a free localhost port (run store and embedded-task cache
in tmp dirs), then drives Debian's ``chromium`` through ``chromedriver`` (Selenium, with the
driver's path given so Selenium Manager never downloads anything): open the Train page,
launch a one-epoch linear probe on an embedded task, watch it finish, follow its card's link
to the Compare page; an invalid number blocks Launch; the home page is "Home" in the
navigation, its "Start here" link and every shared link (task, tab, tour step in the URL)
open the view they name, even as the first request a fresh server gets; a click on a cell of
Compare's confusion matrix opens the Inside page on that cell's images. Screenshots of every
step are saved in the test's tmp dir. Each test starts its own server on a port the kernel
hands out (bound to port 0), so engineers running the suite at once do not collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from vpeft_viz.runs import REPO_ROOT, RunStore, queue

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not CHROMIUM or not Path(CHROMEDRIVER).is_file():
    pytest.skip("needs Debian's chromium and chromium-driver (`make system-deps` installs them "
                "as root: apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (requirements-dev)")

from selenium.common.exceptions import (  # noqa: E402
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver import ActionChains  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SERVER_START_S = 90
PAGE_LOAD_S = 150  # first render of a page (its widget code loads lazily) on a busy machine
RUN_S = 180  # the run, from launch to done, on a busy 2-core machine
TASK = "digits"


# What a widget action can meet while Streamlit is still re-rendering the page after the
# previous one: the element replaced, covered, or not yet drawn again.
RERENDERED = (StaleElementReferenceException, ElementNotInteractableException,
              ElementClickInterceptedException, NoSuchElementException)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The real app on 127.0.0.1:<free port>; yields (base url, user run store)."""
    store = RunStore(tmp_path / "runs")
    env = {**os.environ, "VPEFT_VIZ_RUNS": str(store.root),
           "VPEFT_VIZ_CACHE": str(tmp_path / "cache")}
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true",
         "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.3)
        yield url, store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        for slot in queue.device_slots()["cpu"]:  # workers run in their own session
            pid = queue.worker_pid(store, slot)
            if pid:
                os.kill(pid, signal.SIGTERM)


@pytest.fixture
def browser(tmp_path):
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1400,1800",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class Page:
    """Small helpers over a Streamlit page (widgets are found by their labels)."""

    def __init__(self, driver, shots: Path):
        self.d, self.shots, self.n = driver, shots, 0

    def shot(self, name: str) -> Path:
        self.n += 1
        path = self.shots / f"{self.n:02d}_{name}.png"
        self.d.save_screenshot(str(path))
        return path

    def wait(self, condition, timeout: float, what: str):
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.25,
                                 ignored_exceptions=RERENDERED
                                 ).until(lambda d: condition())
        except Exception as e:
            self.shot("timeout")
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from e

    def text(self) -> str:
        return self.d.find_element(By.TAG_NAME, "body").text

    def wait_text(self, needle: str, timeout: float = 30) -> None:
        self.wait(lambda: needle in self.text(), timeout, repr(needle))

    def no_exception(self) -> None:
        errors = self.d.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        assert not errors, errors[0].text

    def idle(self, timeout: float = 30, quiet_s: float = 1.0) -> None:
        """Wait until the script has not been running (no 'Running...' status widget) for
        ``quiet_s`` in a row: a rerun's status widget can show up a moment after a click."""
        quiet_since = [None]

        def quiet() -> bool:
            if self.d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'):
                quiet_since[0] = None
                return False
            now = time.monotonic()
            quiet_since[0] = quiet_since[0] or now
            return now - quiet_since[0] >= quiet_s

        self.wait(quiet, timeout, "the script to finish")

    def shown_value(self, xpath: str) -> str:
        """What a widget shows: its text and the values of its inputs (a select box draws
        its choice in an input)."""
        box = self.d.find_element(By.XPATH, xpath)
        inputs = box.find_elements(By.TAG_NAME, "input")
        return " ".join([box.text, *(i.get_attribute("value") or "" for i in inputs)])

    def button(self, label_start: str):
        for b in self.d.find_elements(By.CSS_SELECTOR, '[data-testid="stButton"] button'):
            if b.text.strip().startswith(label_start):
                return b
        return None

    def settled(self, action, what: str, tries: int = 5):
        """Run ``action`` again if a rerun replaced or covered an element under it.

        Streamlit re-renders widgets after each interaction and the layout shifts (a
        method's settings expander appears or goes); the status widget that ``idle`` waits
        on can appear a moment after the click, so an element found just before a rerun
        can go stale, or be briefly not interactable, while it is used.
        """
        for attempt in range(tries):
            try:
                return action()
            except RERENDERED:
                if attempt == tries - 1:
                    self.shot("stale")
                    raise AssertionError(f"{what}: the page kept re-rendering") from None
                time.sleep(0.5)
                self.idle()

    def set_input(self, label: str, value: str) -> None:
        def type_it():
            box = self.d.find_element(By.CSS_SELECTOR, f'input[aria-label="{label}"]')
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(value, Keys.TAB)
        self.settled(type_it, f"typing {value!r} into {label!r}")
        self.idle()
        box = f'input[aria-label="{label}"]'
        self.wait(lambda: self.d.find_element(By.CSS_SELECTOR, box).get_attribute("value")
                  == value, 10, f"{label!r} to read {value!r}")

    def multiselect_only(self, label: str, option: str) -> None:
        """Leave exactly ``option`` chosen in the multiselect labelled ``label``."""
        widget = (f'//input[starts-with(@aria-label, "{label}")]'
                  '/ancestor::div[@data-testid="stMultiSelect"]')
        remove = f'{widget}//button[starts-with(@aria-label, "Remove ")]'
        chip = f'{widget}//button[@aria-label="Remove {option}"]'

        def remove_one() -> bool:
            removes = self.d.find_elements(By.XPATH, remove)
            if removes:
                removes[0].click()
            return bool(removes)

        while self.settled(remove_one, f"clearing {label!r}"):
            self.idle()
        choice = f'//*[@role="option"][normalize-space(.)="{option}"]'

        def pick():
            if self.d.find_elements(By.XPATH, remove):  # chosen by an earlier attempt
                return
            box = self.d.find_element(By.CSS_SELECTOR, f'input[aria-label^="{label}"]')
            box.click()
            box.send_keys(option)
            self.wait(lambda: self.d.find_elements(By.XPATH, choice), 10, f"option {option!r}")
            self.d.find_element(By.XPATH, choice).click()
            box.send_keys(Keys.ESCAPE)
        self.settled(pick, f"choosing {option!r} in {label!r}")
        self.idle()
        self.wait(lambda: self.d.find_elements(By.XPATH, chip), 10, f"{option!r} chosen")
        self.idle()


def test_train_a_run_and_compare_it(server, browser, tmp_path):
    url, store = server
    page = Page(browser, tmp_path)
    browser.get(f"{url}/Train")
    page.wait(lambda: page.button("Launch"), PAGE_LOAD_S, "the Launch button")
    page.idle()
    page.no_exception()
    assert f"{TASK} (" in page.text()  # the embedded task picker, first task chosen
    page.shot("train_page")

    page.multiselect_only("PEFT methods", "Linear probe")
    page.set_input("Epochs", "1")
    page.wait(lambda: page.button("Launch 1 run"), 10, "'Launch 1 run'")
    page.no_exception()
    page.shot("configured")

    page.button("Launch 1 run").click()
    page.wait_text("Queued 1 run.", 30)
    deadline = time.monotonic() + RUN_S
    (run,) = store.list()
    config = run.config
    assert config["method"] == "linear" and config["train"]["epochs"] == 1
    assert config["data"]["spec"] == f"embedded:{TASK}"
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    page.wait(lambda: "ETA" in page.text() or run.status()["status"] not in ("queued",
              "running"), deadline - time.monotonic(), "the live progress bar with its ETA")
    page.shot("running")

    browser.refresh()  # a reload loses nothing: the run is still there, still updating
    label = f"linear · {TASK} · vit_tiny_patch4_32_vpeft · 1 epoch · seed 0"
    page.wait_text(label, 60)
    page.wait(lambda: " done · " in page.text() or run.status()["status"] in ("failed",
              "cancelled"), deadline - time.monotonic(), "the run to finish")
    status = run.status()
    assert status["status"] == "done", status.get("error")
    page.wait_text(f"{label} done", 10)
    page.no_exception()
    page.shot("done")

    # the finished run keeps its card, with a link to Compare on its task
    link = f"Compare it with the other runs on {TASK}"
    page.wait_text(link, 30)
    page.settled(lambda: browser.find_element(By.PARTIAL_LINK_TEXT, link).click(),
                 "following the card's link to Compare")
    page.wait_text("Compare methods", 60)
    page.idle()
    page.wait_text("runs in", 30)  # "<n> runs in <m> groups", once the table has loaded
    page.no_exception()
    assert f"task={TASK}" in browser.current_url
    assert "No finished runs yet" not in page.text()
    assert "linear" in page.text() and TASK in page.text()
    page.shot("compare")


def _query(url: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(urllib.parse.urlparse(url).query)


def test_invalid_number_blocks_launch(server, browser, tmp_path):
    url, store = server
    page = Page(browser, tmp_path)
    browser.get(f"{url}/Train")
    page.wait(lambda: page.button("Launch"), PAGE_LOAD_S, "the Launch button")
    page.idle()
    for label in ("Epochs", "rank"):
        page.set_input(label, "0")
        page.wait_text("Launch is blocked", 15)
        assert not page.button("Launch").is_enabled(), f"Launch enabled with {label} = 0"
        page.shot(f"blocked_{label}")
        page.set_input(label, "2")
    page.wait(lambda: page.button("Launch").is_enabled(), 15, "Launch to be enabled again")
    assert "Launch is blocked" not in page.text()
    # the form lives in the URL: a reload keeps it
    page.wait(lambda: _query(browser.current_url).get("train.epochs") == ["2"], 10,
              "train.epochs=2 in the URL")
    browser.refresh()
    page.wait(lambda: page.button("Launch"), 60, "the Launch button after a reload")
    page.idle()
    box = 'input[aria-label="Epochs"]'
    page.wait(lambda: browser.find_element(By.CSS_SELECTOR, box).get_attribute("value") == "2",
              15, "Epochs to read 2 after the reload")
    # the configuration Launch would queue is on the page, with the values just typed
    page.settled(lambda: browser.find_element(
        By.XPATH, '//summary[contains(., "Exactly what Launch queues")]').click(),
        "opening the queued configuration")
    page.wait_text('"epochs": 2', 15)
    page.wait_text('"rank": 2', 15)
    page.no_exception()
    assert store.list() == []  # nothing was queued on the way
    page.shot("config_shown")


def test_home_start_here_and_shared_links(server, browser, tmp_path):
    url, _ = server
    page = Page(browser, tmp_path)
    # A shared deep link as the very first request of a fresh server opens that view, with
    # the navigation of the app (Home, not the script's name).
    browser.get(f"{url}/Compare?task=count&tab=vs+peak+memory")
    page.wait_text("Compare methods", 60)
    page.idle()
    page.wait_text("runs in", 30)
    page.no_exception()
    nav = page.wait(lambda: browser.find_element(By.CSS_SELECTOR,
                                                 '[data-testid="stSidebarNav"]').text,
                    30, "the navigation")
    assert "Home" in nav.split("\n") and "app" not in nav.split("\n"), nav
    task_box = '//div[@data-testid="stSelectbox"][.//label[normalize-space(.)="Task"]]'
    page.wait(lambda: "count" in page.shown_value(task_box), 60,
              "the Task picker to show count")
    active = '[role="tab"][aria-selected="true"]'
    page.wait(lambda: browser.find_element(By.CSS_SELECTOR, active).text.strip()
              == "vs peak memory", 30, "the 'vs peak memory' tab to be open")
    page.shot("shared_compare")

    # the page icon is served by the app itself, never fetched from another host
    icons = [e.get_attribute("href") for e in browser.find_elements(
        By.CSS_SELECTOR, 'link[rel~="icon"]')]
    assert icons and all(h.startswith((url, "data:")) for h in icons), icons

    browser.get(url)
    page.wait_text("Start here", 60)
    page.idle()
    page.settled(lambda: browser.find_element(By.PARTIAL_LINK_TEXT, "Start here").click(),
                 "following Start here")
    page.wait_text("Step 1 of", 60)
    page.idle()
    assert _query(browser.current_url) == {"tab": ["Guided tour"], "step": ["1"]}
    page.settled(lambda: page.button("Next").click(), "clicking Next")
    page.wait_text("Step 2 of", 30)
    page.idle()
    page.wait(lambda: _query(browser.current_url).get("step") == ["2"], 10, "step=2 in the URL")
    shared = browser.current_url
    page.shot("tour_step_2")

    browser.get(f"{url}/Train")  # leave, then open the shared link as a new visitor would
    page.wait(lambda: page.button("Launch"), PAGE_LOAD_S, "the Launch button")
    browser.get(shared)
    page.wait_text("Step 2 of", 60)
    page.no_exception()


CONFUSION_JS = """
for (const el of document.querySelectorAll('.js-plotly-plot')) {
  const d = el.data || [];
  if (d.length > 1 && d[0].type === 'heatmap' && d[1].name === 'cells') {
    el.scrollIntoView({block: 'center'});
    return d[1].customdata;
  }
}
return null;
"""
CELL_JS = """
for (const el of document.querySelectorAll('.js-plotly-plot')) {
  const d = el.data || [];
  if (d.length > 1 && d[0].type === 'heatmap' && d[1].name === 'cells') {
    return el.querySelectorAll('.scatterlayer .trace .points path.point')[arguments[0]];
  }
}
return null;
"""


def test_a_confusion_cell_on_compare_opens_its_images(server, browser, tmp_path):
    """Click a cell of Compare's confusion matrix (shipped runs): the Inside page opens on
    the images of that cell, its (image, run) count equal to the cell's count."""
    import json
    import re

    from vpeft_viz.data.embedded import get_task

    url, _ = server
    page = Page(browser, tmp_path)
    browser.get(f"{url}/Compare?task=count")
    page.wait_text("Compare methods", 60)
    page.wait_text("Click a cell to see its images", PAGE_LOAD_S)
    page.idle()
    cells = page.wait(lambda: browser.execute_script(CONFUSION_JS), 60, "the confusion matrix")
    # the busiest cell off the diagonal (a mistake the runs share), else the busiest one
    off = [c for c in cells if c[0] != c[1] and c[2] > 0]
    k = cells.index(max(off or cells, key=lambda c: c[2]))
    page.shot("compare_confusion")
    point = page.wait(lambda: browser.execute_script(CELL_JS, k), 30, "the cell's marker")
    ActionChains(browser).move_to_element(point).click().perform()
    page.wait(lambda: "/Inside" in browser.current_url, 60, "the Inside page to open")
    page.wait_text("(image, run) pairs", PAGE_LOAD_S)
    page.idle(timeout=PAGE_LOAD_S)
    page.no_exception()
    page.shot("inside_cell")

    # the view: the group's runs in the URL, the cell's classes and counts on the page
    runs = _query(browser.current_url)["runs"]
    names = list(get_task("count").class_names)
    text = page.text()
    m = re.search(r"(\d+) of \d+ test images: true (.+), predicted (.+) — (\d+) \(image, "
                  r"run\) pairs", text)
    assert m, text[:3000]
    shown, true, pred, pairs = int(m[1]), names.index(m[2]), names.index(m[3]), int(m[4])
    assert [true, pred, pairs] == [int(c) for c in cells[k][:3]]  # the cell clicked
    assert pairs == sum(json.loads((REPO_ROOT / "cached_runs" / r / "artifacts" / "eval.json")
                                   .read_text())["test_confusion"][true][pred] for r in runs)
    assert 0 < shown <= pairs
    page.wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"]'))
              == min(shown, 40), 60, "the gallery")
    assert page.text().count(f"· true {names[true]}") == min(shown, 40)
    page.shot("inside_gallery")

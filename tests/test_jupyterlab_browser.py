"""Notebook 06's classifier widget, used as a learner would: JupyterLab in a real (headless) Chromium.

The test trains the fast ``smoke`` classifier by running notebooks 02-05 headless into its own data folder, starts
``jupyter lab`` on 127.0.0.1 (free port, random token, its own config/data/runtime/settings folders, no news
fetching), opens a copy of notebook 06, runs all cells, types a message into the text box, clicks the button, and
checks the verdict the page shows against ``classify(text)`` computed here. It saves a screenshot in the output
folder (``--lab-screenshot PATH`` saves another copy, e.g. images/jupyterlab_classifier.png for the README).

The browser is Debian's ``chromium`` (``.ci/run`` installs it) driven by Playwright; Playwright's own browser
download is not needed. Without any Chromium the test skips and says how to install one.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from course_run import kernel  # noqa: E402  (scripts/ is on sys.path)

pytestmark = [pytest.mark.slow, pytest.mark.needs_tokenizer]

NOTEBOOK = "06_evaluate_and_use.ipynb"
PREPARE = ["02_download_and_balance", "03_split_and_data_loaders", "04_pretrained_gpt2_new_head",
           "05_fine_tune_classifier"]
MESSAGE = "URGENT! You have won a 1 week FREE membership in our prize draw. Text WIN to 80086 now"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Chromium as root in a container, on a machine whose only network is the loopback (see the env notes).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAB_SETTINGS = {  # user settings in the test's own settings folder
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},  # every cell in the page, not only visible
}
SERVER_START_S, KERNEL_READY_S, RUN_ALL_S, VERDICT_S = 90, 60, 180, 30


def find_chromium() -> str | None:
    """A Chromium or Chrome executable on PATH, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lab:
    """``jupyter lab`` in its own folders, stopped on exit; ``api()`` calls its REST API with the token."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.port, self.token = free_port(), secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "jupyter-lab.log"

    def __enter__(self) -> "Lab":
        env = dict(os.environ)
        for variable, folder in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                                 ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                                 ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")]:
            env[variable] = str(self.home / folder)
            (self.home / folder).mkdir(parents=True, exist_ok=True)
        for plugin, values in LAB_SETTINGS.items():
            path = self.home / "settings" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                   "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   "--LabApp.extension_manager=readonly"]  # nothing fetched from outside
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_until_up()
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"jupyter lab exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        pytest.fail(f"jupyter lab did not answer on {self.url} within {SERVER_START_S} s:\n{self.log_tail()}")

    def start_kernel_for(self, notebook: str) -> str:
        """Create the notebook's session (and kernel) before the page opens: no "Select Kernel" dialog."""
        session = self.api("POST", "/api/sessions", {"path": notebook, "name": notebook, "type": "notebook",
                                                     "kernel": {"name": "python3"}})
        return session["kernel"]["id"]


class Silent:
    """``course_run.kernel.Events`` that shows nothing: the notebooks only prepare data and a checkpoint here."""

    def cell_started(self, index: int) -> None: ...
    def bar(self, text: str) -> None: ...
    def stream(self, name: str, text: str) -> None: ...
    def tick(self) -> None: ...
    def interrupting(self, presses: int) -> None: ...


def prepare_classifier(folder: Path) -> Path:
    """Data splits and the smoke-profile checkpoint that notebook 06 loads, made by notebooks 02-05."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PREPARE:
        outcome = kernel.execute_notebook(ROOT / "notebooks" / f"{name}.ipynb", folder / f"{name}.ipynb", Silent(),
                                          run_info={})
        assert outcome.status == "ok", f"{name} failed while preparing notebook 06: {outcome.headline}"
    from helpers import config

    checkpoint = config.data_dir() / "checkpoints" / "spam_classifier.pt"
    assert checkpoint.is_file(), f"notebooks 02-05 ran but left no checkpoint at {checkpoint}"
    return checkpoint


def wait_for(page, expression: str, seconds: float, what: str, arg=None) -> None:
    """Wait until ``expression`` (a JS function) is true in the page, or fail saying ``what`` never happened."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(expression, arg=arg, timeout=seconds * 1000, polling=250)
    except PlaywrightTimeout:
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        pytest.fail(f"{what} within {seconds} s. Cell prompts: {prompts}\nError outputs: "
                    f"{errors.all_inner_texts()[-3:]}")


KERNEL_IDLE = "() => document.querySelector('.jp-Notebook-ExecutionIndicator[data-status=\"idle\"]') !== null"
ALL_CELLS_RAN = """expected => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  return prompts.length === expected && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""


def open_and_run_all(page, lab: Lab, code_cells: int) -> None:
    """Open notebook 06 in JupyterLab and run every cell through the menu, as a learner would."""
    page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}")
    wait_for(page, KERNEL_IDLE, KERNEL_READY_S, "the notebook did not open with an idle kernel")
    open_tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if open_tab.count():
        open_tab.first.click()  # fold the file browser away: more room for the notebook in the screenshot
    page.locator(".jp-Notebook").first.click()  # focus the notebook, then Run > Run All Cells
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
    wait_for(page, ALL_CELLS_RAN, RUN_ALL_S, f"not all {code_cells} code cells ran", arg=code_cells)


def classify_in_page(page, expect, message: str) -> str:
    """Type ``message`` into the classifier's text box, click its button, return the verdict it prints.

    The widgets are found by their ipywidgets classes (a box holding a text area, a button and an output),
    not by cell position, so rewording the notebook does not break the test.
    """
    panel = page.locator(".widget-vbox").filter(has=page.locator(".widget-textarea")).filter(
        has=page.locator(".widget-button")).filter(has=page.locator(".widget-output"))
    expect(panel, "notebook 06 shows one box with a text area, a button and an output").to_have_count(1, timeout=15_000)
    outputs = panel.locator(".widget-output .jp-OutputArea-output")
    outputs.evaluate_all("nodes => nodes.forEach(n => n.setAttribute('data-stale', ''))")  # the notebook's own click
    text_box = panel.locator(".widget-textarea textarea")
    text_box.fill("")
    text_box.press_sequentially(message)
    panel.locator(".widget-button").click()
    verdict = panel.locator(".widget-output .jp-OutputArea-output:not([data-stale])").last
    expect(verdict, "no new verdict appeared after clicking the button").to_contain_text(
        re.compile(r"\b(spam|ham)\b", re.IGNORECASE), timeout=VERDICT_S * 1000)
    panel.evaluate("element => element.scrollIntoView({block: 'center'})")
    return verdict.inner_text().strip()


def test_classifier_widget_in_jupyterlab(tmp_path, monkeypatch, request, capsys):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (requirements.txt)")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium to drive: install Debian's `chromium` package (apt-get install chromium; "
                    ".ci/run does) or put chromium / google-chrome on PATH")
    screenshot = Path(os.environ["COURSE_OUTPUT_DIR"]) / "jupyterlab_classifier.png"
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "data"))  # the server's kernels inherit these
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path / "outputs"))
    started = time.perf_counter()
    checkpoint = prepare_classifier(tmp_path / "executed")
    prepared = time.perf_counter()

    import nbformat

    lab_root = tmp_path / "lab"
    lab_root.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, lab_root / NOTEBOOK)  # the committed file stays untouched
    code_cells = sum(c.cell_type == "code" for c in nbformat.read(lab_root / NOTEBOOK, as_version=4).cells)

    with Lab(lab_root, tmp_path / "jupyter") as lab, sync_api.sync_playwright() as playwright:
        lab.start_kernel_for(NOTEBOOK)
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        with capsys.disabled():  # shown in `make test`'s log
            print(f"\nPlaywright {importlib.metadata.version('playwright')}, {chromium}: Chromium {browser.version}")
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        open_and_run_all(page, lab, code_cells)
        shown = classify_in_page(page, sync_api.expect, MESSAGE)
        page.screenshot(path=str(screenshot))
        browser.close()
    finished = time.perf_counter()

    from helpers.checkpoints import load_classifier
    from helpers.evaluate import classify

    expected = classify(load_classifier(checkpoint), MESSAGE)
    label = re.search(r"\b(spam|ham)\b", shown, re.IGNORECASE)
    percent = re.search(r"(\d+(?:\.\d+)?)\s*%", shown)
    assert label and label.group(1).lower() == expected.label, f"page says {shown!r}, classify says {expected}"
    assert percent and abs(float(percent.group(1)) / 100 - expected.spam_probability) <= 0.0005 + 1e-6, (
        f"page says {shown!r}, classify says p(spam)={expected.spam_probability:.4f}")
    assert screenshot.stat().st_size > 10_000
    if request.config.getoption("lab_screenshot"):
        shutil.copy(screenshot, request.config.getoption("lab_screenshot"))
    with capsys.disabled():
        print(f"page: {shown!r}; notebooks 02-05 {prepared - started:.1f} s, "
              f"JupyterLab + browser {finished - prepared:.1f} s; screenshot {screenshot}")

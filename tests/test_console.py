"""The web console in headless Chromium against a real server: key, create a task from a CSV, predict."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import serving, task_artifact, training_settings

from recast_core.bank import TemplateBank
from recast_core.datasets import load_splits

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (tools/system-deps.sh installs them)",
)
KEY = "console-admin"

if CHROMIUM is not None and DRIVER is not None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait


@pytest.fixture()
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _csv(path: Path, count: int) -> Path:
    splits = load_splits("sms_spam")
    rows: dict[str, list[tuple[str, str]]] = {}
    for text, label in zip(splits.train.texts, splits.train.labels, strict=True):
        rows.setdefault(label, []).append((text, label))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    for label_rows in rows.values():
        writer.writerows(label_rows[: count // len(rows)])
    path.write_text(buffer.getvalue())
    return path


def test_console_creates_a_task_from_a_csv_and_predicts_with_it(
    browser: webdriver.Chrome, bank_dir: Path, default_bank: TemplateBank, tmp_path: Path
) -> None:
    settings = training_settings(bank_dir, tmp_path / "tasks", KEY)
    data = _csv(tmp_path / "spam.csv", 240)
    artifact = tmp_path / "topic.safetensors"
    artifact.write_bytes(task_artifact(default_bank, 5, labels=("sports", "science")).to_bytes())
    with serving(settings) as url:
        wait = WebDriverWait(browser, 30)
        browser.get(url + "/console")
        assert browser.title == "recast-serve console"
        wait.until(lambda d: "bank" in d.find_element(By.ID, "backbone").text)
        assert wait.until(ec.visibility_of_element_located((By.ID, "tasks-empty")))

        # a wrong key: a clear error on the page, nothing created
        browser.find_element(By.ID, "api-key").send_keys("not-the-key")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        browser.find_element(By.ID, "create-id").send_keys("spam")
        browser.find_element(By.ID, "create-file").send_keys(str(data))
        browser.find_element(By.CSS_SELECTOR, "#create-form button").click()
        error = wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert error.text.startswith("forbidden:")

        # the right key: create from the CSV, follow the progress bar to the end
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        epochs = browser.find_element(By.ID, "create-epochs")
        epochs.clear()
        epochs.send_keys("2")
        browser.find_element(By.CSS_SELECTOR, "#create-form button").click()
        progress = wait.until(ec.visibility_of_element_located((By.ID, "job-progress")))
        seen = set()
        WebDriverWait(browser, 600, poll_frequency=0.3).until(
            lambda d: (
                seen.add(progress.get_attribute("value"))
                or "succeeded" in d.find_element(By.ID, "job-state").text
            )
        )
        state = browser.find_element(By.ID, "job-state")
        assert "spam version 1" in state.text and "validation accuracy" in state.text
        assert len(seen) >= 2  # the bar moved while the job ran
        assert not browser.find_element(By.ID, "error").is_displayed()
        row = browser.find_element(By.CSS_SELECTOR, '#tasks tr[data-task-id="spam"]')
        assert "ham, spam" in row.text

        # upload an artifact through the page
        browser.find_element(By.ID, "upload-id").send_keys("topic")
        browser.find_element(By.ID, "upload-file").send_keys(str(artifact))
        browser.find_element(By.CSS_SELECTOR, "#upload-form button").click()
        wait.until(lambda d: "stored topic version 1" in d.find_element(By.ID, "upload-result").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#tasks tr[data-task-id="topic"]'))

        # predict with the new task
        Select(browser.find_element(By.ID, "predict-task")).select_by_value("spam")
        texts = ["WINNER!! You have won a free prize, call now to claim", "ok see you at 5 then"]
        browser.find_element(By.ID, "predict-texts").send_keys("\n".join(texts))
        browser.find_element(By.CSS_SELECTOR, "#predict-form button").click()
        table = wait.until(ec.visibility_of_element_located((By.ID, "predictions")))
        labels = [cell.text for cell in table.find_elements(By.CSS_SELECTOR, "td.label")]
        assert labels == ["spam", "ham"]
        browser.find_element(By.ID, "refresh").click()
        wait.until(lambda d: d.find_element(By.ID, "m-tasks").text == "2")
        assert browser.find_element(By.ID, "m-jobs").text == "1"

        shot = tmp_path / "console.png"
        assert browser.save_screenshot(str(shot))
        for element_id in ("tasks", "job-progress", "predictions", "metrics"):
            element = browser.find_element(By.ID, element_id)
            assert element.is_displayed() and element.size["width"] > 0 and element.size["height"] > 0
        _assert_screenshot(shot.read_bytes(), browser.find_element(By.ID, "predictions").screenshot_as_png)


def _assert_screenshot(page: bytes, predictions: bytes) -> None:
    """The page screenshot is a real, non-blank image of the window; the predictions table has ink."""
    from io import BytesIO

    from PIL import Image

    image = Image.open(BytesIO(page)).convert("L")
    assert image.size[0] >= 1000 and image.size[1] >= 800
    low, high = image.getextrema()
    assert high - low > 100  # dark text on a light page, not a blank frame
    table = Image.open(BytesIO(predictions)).convert("L")
    histogram = table.histogram()
    dark = sum(histogram[:128]) / (table.size[0] * table.size[1])
    assert 0.005 < dark < 0.5  # text rendered in the table, not empty and not a solid block

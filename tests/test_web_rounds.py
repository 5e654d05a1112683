"""The rounds page in a real browser: headless Chromium (Debian's `chromium` and `chromedriver`, installed by
`make browser`) drives `gansteer-web` through an interactive evolution on the built-in generator, each round's picks
made by a simulated person looking at the images the page shows. It clicks as a person does (repeats, none is good,
undo, a double-clicked "next round"), the front end is restarted mid-job, and the test checks what the server
recorded in the interaction log; it saves a screenshot (docs/images/rounds_page.png with GANSTEER_DOCS_SCREENSHOT=1).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from job_fixtures import JobStack, make_settings
from PIL import Image

from gansteer import Client
from gansteer.simulate import SimulatedPerson, Target
from gansteer.web import serve
from gansteer_server.data.scenes import render_scenes
from gansteer_server.servers.app import start_generation_server, start_scoring_server

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "rounds_page.png"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

if CHROMIUM is None or CHROMEDRIVER is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs chromium and chromedriver: `make browser` installs them")
    pytest.skip("no chromium/chromedriver here; `make browser` installs them", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only once the browser is known to be there
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


class Front:
    """gansteer-web in a thread of this process, restartable on the same port."""

    def __init__(self, targets: list[str]) -> None:
        self.targets, self.port = targets, 0
        self.start()

    def start(self) -> None:
        optimization, generation, scoring = self.targets
        self.server, self.clients = serve(
            self.port, target=optimization, generation_target=generation, scoring_target=scoring
        )
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.clients.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Front]]:
    jobs = JobStack(tmp_path_factory.mktemp("web"))
    settings = make_settings(jobs.registry_root)
    generation = start_generation_server(settings, port=0, metrics_port=0)
    scoring = start_scoring_server(settings, port=0, metrics_port=0)
    front = None
    try:
        optimization, _ = jobs.start_server()
        jobs.start_worker()
        targets = [optimization.address, generation.address, scoring.address]
        front = Front(targets)
        with Client(targets[0], generation_target=targets[1], scoring_target=targets[2], timeout=30) as client:
            yield client, front
    finally:
        if front is not None:
            front.stop()
        jobs.close()
        generation.stop(grace=None)
        scoring.stop(grace=None)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1250"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shown_round(driver: webdriver.Chrome, after: str = "") -> tuple[str, list[Image.Image], list[Any]]:
    """Waits for a round other than `after` on the page; its id, the images as shown, and the cells."""

    def ready(d: webdriver.Chrome) -> Any:  # one script: the round id and its cells at one instant
        round_id, cells = d.execute_script(
            "return [state.round && state.round.round_id, Array.from(document.querySelectorAll('#grid .cell'))]"
        )
        return (round_id, cells) if cells and round_id and round_id != after else False

    round_id, cells = WebDriverWait(driver, 90, poll_frequency=0.1).until(ready)
    images = []
    for cell in cells:
        source = cell.find_element(By.TAG_NAME, "img").get_attribute("src") or ""
        images.append(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))
    return round_id, images, cells


def click_picks(cells: list[Any], picks: list[int]) -> None:
    for index in picks:
        cells[index].click()


def test_a_person_runs_an_evolution_in_the_browser_and_the_server_records_it(
    stack: tuple[Client, Front], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    client, front = stack
    target = render_scenes(1, seed=7_777).images[0]
    person = SimulatedPerson(client, Target(target), noise=0.02, rater_id="browser-person")

    browser.get(front.url)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("scenes-gen@1")
    for field, value in (("mu", "3"), ("rounds", "3")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "start").click()

    # Round 1: none is good (the N key), then a redrawn round.
    first, _, _ = shown_round(browser)
    browser.find_element(By.TAG_NAME, "body").send_keys("n")
    redrawn, images, cells = shown_round(browser, after=first)
    job_id = browser.execute_script("return state.job")

    # The person picks; its best image twice (repeats), then "next round" double-clicked.
    best = person.pick(images, 2)
    picks = [best[0], best[0], best[1]]
    click_picks(cells, picks)
    assert browser.find_element(By.CSS_SELECTOR, f'.cell[data-index="{best[0]}"] .count').text == "x2"
    browser.execute_script("document.getElementById('next').click(); document.getElementById('next').click();")
    second, images, cells = shown_round(browser, after=redrawn)
    resent = browser.execute_async_script(  # the same answer again (another tab, a retry): recorded once
        """const done = arguments[arguments.length - 1];
        fetch(`/api/jobs/${state.job}/answer`, {method: "POST", headers: headers(), body: JSON.stringify(
            {round_id: arguments[0], action: "pick", picks: arguments[1], key: arguments[0] + ":web"})})
          .then((r) => r.json()).then(done);""",
        redrawn,
        picks,
    )
    assert resent["duplicate"] is True

    # Undo goes back to the round the picks were made in.
    browser.find_element(By.ID, "undo").click()
    again, images, cells = shown_round(browser, after=second)
    shown_ids = sorted(c.get_attribute("data-item-id") for c in cells)
    assert shown_ids == sorted(i.item_id for i in client.interactions(job_id)[1].items)

    # The front end restarts; the page reloads and carries on from the services' state.
    front.stop()
    front.start()
    browser.get(f"{front.url}#job={job_id}")
    again_after_restart, images, cells = shown_round(browser)
    assert again_after_restart == again

    log_picks = []
    current = again
    for _ in range(3):  # the 3 rounds the job asks for
        chosen = person.pick(images, 3)
        click_picks(cells, chosen)
        if not log_picks:  # a step size from the slider goes with the answer
            slider = browser.find_element(By.ID, "step")
            browser.execute_script("arguments[0].value = -3; arguments[0].dispatchEvent(new Event('input'))", slider)
        if len(log_picks) == 2:
            DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
            shot = tmp_path / "rounds_page.png"
            browser.save_screenshot(str(shot))
            if os.environ.get("GANSTEER_DOCS_SCREENSHOT"):
                shutil.copy(shot, DOCS_SCREENSHOT)
        log_picks.append(chosen)
        browser.find_element(By.ID, "next").click()
        if len(log_picks) < 3:
            current, images, cells = shown_round(browser, after=current)

    WebDriverWait(browser, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result img"))
    log = client.interactions(job_id)
    assert [entry.action for entry in log] == ["none_good", "pick", "undo", "pick", "pick", "pick"]
    assert log[1].choice == tuple(picks)  # the double click recorded once, repeats kept
    assert [list(entry.choice or ()) for entry in log[3:]] == log_picks
    assert log[3].step_size == pytest.approx(0.125)
    assert len({entry.rater for entry in log}) == 1 and all(entry.latency_s > 0 for entry in log)
    assert all(entry.idempotency_key.endswith(":web") for entry in log)
    assert client.get_job(job_id).state.value == "succeeded"


def test_a_person_compares_pairs_for_human_nes_in_the_browser(
    stack: tuple[Client, Front], browser: webdriver.Chrome
) -> None:
    """The pairwise view: two images a pair, a graded slider with a tie, keyboard answers, sides as the server drew
    them; the answers reach the log with what was shown where, and the tuned generator comes back as a new version."""
    client, front = stack
    browser.get(front.url)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    Select(browser.find_element(By.ID, "kind")).select_by_value("human_nes")
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("scenes-gen-step300@1")
    for field, value in (("rounds", "1"), ("images", "2"), ("pairs", "2"), ("rater", "pat")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "start").click()
    WebDriverWait(browser, 90, poll_frequency=0.1).until(
        lambda d: d.execute_script("return !document.getElementById('pairview').hidden && state.round !== null")
    )
    job_id = browser.execute_script("return state.job")
    body = browser.find_element(By.TAG_NAME, "body")
    shown = []
    for key in ("1", "t", Keys.ARROW_RIGHT):  # left much better, a tie, right a little better
        left = browser.find_element(By.ID, "leftImg").get_attribute("data-item-id") or ""
        right = browser.find_element(By.ID, "rightImg").get_attribute("data-item-id") or ""
        assert {left[-1], right[-1]} == {"+", "-"}  # x + Delta on one side, x - Delta on the other
        shown.append((left, right))
        body.send_keys(key)
        body.send_keys(Keys.ENTER)
    body.send_keys(Keys.BACKSPACE)  # back to the third pair: the slider remembers its answer
    assert browser.find_element(By.ID, "gradeText").text == "right better (0.5)"
    body.send_keys(Keys.ENTER)
    shown.append(
        tuple(browser.find_element(By.ID, side).get_attribute("data-item-id") or "" for side in ("leftImg", "rightImg"))
    )
    body.send_keys("5")  # right much better
    if os.environ.get("GANSTEER_DOCS_SCREENSHOT"):
        browser.save_screenshot(str(DOCS_SCREENSHOT.with_name("pairs_page.png")))
    body.send_keys(Keys.ENTER)  # the last pair: the answers go to the server

    WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result img"))
    (entry,) = client.interactions(job_id)
    assert entry.pairwise == (1.0, 0.0, -0.5, -1.0)
    assert [(entry.items[a].item_id, entry.items[b].item_id) for a, b in entry.pairs] == shown
    assert entry.idempotency_key.endswith(":web:pat") and entry.latency_s > 0
    assert client.get_result(job_id).models == ["scenes-gen-step300@2"]

"""End to end: `rlhf label` in a real headless browser (Debian's chromium, driven by Playwright).

Five prompts, on the tiny pipeline's policy and reward model (`shared_pipeline`): the first is
ranked by dragging and keys, the second (an HTML-injection prompt, which must show as text) with
a tie, the third after a reload of the page in the middle of ranking it (the page resumes on the
same prompt and answers). The server is then killed (SIGKILL) and a torn last line left in the
output; a new server drops that line and continues at the fourth prompt, which is skipped, and the
fifth, which is flagged. The chat tab's regenerate, thumbs up and thumbs down write pairwise rows.
Finally `rlhf run reward` trains on the files as they were written.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, rlhf_command
from test_pipeline import shared_pipeline

pytestmark = pytest.mark.e2e

HTML_PROMPT = "<img src=x onerror=alert(1)><b>bold</b>"
CHAT_PROMPT = [{"role": "user", "content": "What sound does a cow make?"}]
PROMPTS = ["How many legs do three chickens have?", HTML_PROMPT, CHAT_PROMPT,
           "How many legs do two spiders have?", "Where does a rabbit live?"]
BROWSER_FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 120_000  # sampling on a busy 2-core machine can take a while


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    return shared_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not installed; `make test` installs it with apt-get "
                    "when run as root")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        # Playwright's own browser download is not used: the system's chromium is.
        browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_FLAGS)
        yield browser
        browser.close()


class Server:
    """`rlhf label … --port 0` in a subprocess; `url` once it listens."""

    def __init__(self, home: Path, logs: Path, *args: str):
        self.stdout, self.stderr = logs.with_suffix(".out"), logs.with_suffix(".err")
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                rlhf_command(home, "label", *args, "--port", "0", "--max-new-tokens", "16"),
                cwd=ROOT, env=cli_env(), stdout=out, stderr=err)
        self.banner = self._banner()
        self.url = re.search(r"http://\S+/", self.banner).group(0)

    def _banner(self, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while "serving" not in self.stdout.read_text():
            if self.process.poll() is not None or time.time() > deadline:
                self.process.kill()
                raise AssertionError(f"rlhf label did not start:\n{self.stderr.read_text()}")
            time.sleep(0.1)
        return self.stdout.read_text()

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.url + path.lstrip("/"), headers=headers or {})
        return fetch(request)

    def post(self, path: str, body: dict, content_type: str = "application/json"):
        request = urllib.request.Request(self.url + path.lstrip("/"), method="POST",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": content_type})
        return fetch(request)

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)


def fetch(request) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@contextmanager
def label_server(home: Path, logs: Path, *args: str):
    server = Server(home, logs, *args)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def shown_answers(server: Server) -> list[str]:
    """The answers of the prompt on screen, as the server holds them (asking again samples
    nothing new)."""
    return json.loads(server.get("/api/next")[2])["answers"]


def wait_for_prompt(page, text: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#prompt")).to_have_text(text, timeout=WAIT_MS)
    page.wait_for_selector("#pool .card", timeout=WAIT_MS)


def press(page, *keys: str) -> None:
    for key in keys:
        page.keyboard.press(key)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rank_reload_crash_resume_chat_and_train(outcome, browser, tmp_path, capsys):
    from playwright.sync_api import expect

    from pipeline.registry import Registry

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "labels.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    chat_pairs = tmp_path / "labels.chat.jsonl"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    args = ("--policy", "ppo:latest", "--prompts", str(prompts), "--out", str(out))
    expected = []  # (answers, ranking) of each submitted prompt

    first = tmp_path / "first"
    with label_server(outcome.home, first, *args, "--reward", "reward:latest") as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, headers, _ = server.get("/")
        assert status == 200 and "default-src 'none'" in headers["content-security-policy"]
        assert server.get("/api/stats", {"Host": "evil.example"})[0] == 400
        assert server.post("/api/rank", {"index": 0}, content_type="text/plain")[0] == 415
        page.goto(server.url)

        # 1: two answers dragged (the second dropped above the first), the rest placed by keys.
        wait_for_prompt(page, PROMPTS[0])
        expect(page.locator("#who")).to_be_hidden()  # one labeler alone is not asked a name
        answers = shown_answers(server)
        count = len(answers)
        assert count >= 3, answers  # K = 4 different answers, or nearly
        assert page.locator("#pool .card .text").all_text_contents() == answers
        page.locator('#pool .card[data-index="1"]').drag_to(page.locator("#ranked"))
        page.locator('#pool .card[data-index="0"]').drag_to(
            page.locator('#ranked .card[data-index="1"]'), target_position={"x": 30, "y": 4})
        press(page, *[str(index + 1) for index in reversed(range(2, count))])
        page.click("#submit")
        expected.append((answers, [0, 1, *reversed(range(2, count))]))
        # With --reward the scores and the agreement show once the ranking is in.
        expect(page.locator("#result")).to_be_visible()
        expect(page.locator("#ranked .score")).to_have_count(count)
        expect(page.locator("#agreement")).to_contain_text("pairs")
        press(page, "Enter")

        # 2: HTML in a prompt is text, not markup; answers 2 and 1 tie for first place.
        wait_for_prompt(page, HTML_PROMPT)
        assert page.locator("#prompt").text_content() == HTML_PROMPT
        assert page.locator("#prompt img, #prompt b").count() == 0
        answers = shown_answers(server)
        press(page, "2", "1", "t", *[str(index + 1) for index in range(2, len(answers))])
        expect(page.locator("#ranked .card.tied")).to_have_count(1)
        press(page, "Enter")
        expected.append((answers, [[0, 1], *range(2, len(answers))]))
        expect(page.locator("#result")).to_be_visible()
        page.screenshot(path=str(tmp_path / "ranked.png"), full_page=True)
        page.click("#next")

        # 3: a reload in the middle of the ranking shows the same prompt and answers, unranked.
        wait_for_prompt(page, "user:" + CHAT_PROMPT[0]["content"])
        answers = shown_answers(server)
        press(page, "1")
        expect(page.locator("#ranked .card")).to_have_count(1)
        page.reload()
        wait_for_prompt(page, "user:" + CHAT_PROMPT[0]["content"])
        expect(page.locator("#progress")).to_contain_text("Prompt 3 of 5")
        expect(page.locator("#ranked .card")).to_have_count(0)
        assert page.locator("#pool .card .text").all_text_contents() == answers
        press(page, "3", "1", "2", *[str(index + 1) for index in range(3, len(answers))])
        page.click("#submit")
        expected.append((answers, [2, 0, 1, *range(3, len(answers))]))
        expect(page.locator("#result")).to_be_visible()

        stats = json.loads(server.get("/api/stats")[2])
        assert stats["counts"]["ranked"] == 3 and stats["record_ms"]["n"] == 3
        assert stats["agreement"]["prompts"] == 3
        # A crash at any moment loses nothing already submitted: here the worst kind, a kill
        # just as a fourth row was half written.
        server.stop(signal.SIGKILL)
    with out.open("ab") as handle:
        handle.write(b'{"prompt": "How many legs do two spi')

    with label_server(outcome.home, tmp_path / "second", *args) as server:
        assert "3 of 5 prompts done" in server.banner
        assert "dropped an unfinished last line" in server.stderr.read_text()
        page.goto(server.url)
        wait_for_prompt(page, PROMPTS[3])
        expect(page.locator("#progress")).to_contain_text("Prompt 4 of 5")
        press(page, "s")
        wait_for_prompt(page, PROMPTS[4])
        page.fill("#flag-note", "not a question")
        page.click("#flag")
        expect(page.locator("#finished")).to_be_visible()
        expect(page.locator("#finished-counts")).to_contain_text("3 ranked, 1 skipped, 1 flagged")
        chat_answers = chat_on(page)
        assert server.stop() == 0
    page.close()

    rows = read_rows(out)
    assert [row["prompt"] for row in rows] == PROMPTS[:3]
    assert [(row["responses"], row["ranking"]) for row in rows] == expected
    set_aside = read_rows(out.with_name(out.name + ".progress"))
    assert set_aside == [{"action": "skipped", "prompt": PROMPTS[3]},
                         {"action": "flagged", "prompt": PROMPTS[4], "note": "not a question"}]
    first, second = chat_answers
    assert read_rows(chat_pairs) == [
        {"prompt": [{"role": "user", "content": "How many legs do two cows have?"}],
         "chosen": first[1], "rejected": first[0]},
        {"prompt": [{"role": "user", "content": "How many legs do two cows have?"},
                    {"role": "assistant", "content": first[1]},
                    {"role": "user", "content": "And three ducks?"}],
         "chosen": second[1], "rejected": second[0]}]
    assert not dialogs

    trained = train_reward(outcome.home, tmp_path / "trained", [out, chat_pairs], capsys)
    assert trained["status"] == "completed"
    summary = Registry(tmp_path / "trained", create=False).get(trained["run"]).summary
    assert summary["train_prompts"] + summary["eval_prompts"] == 5  # 3 rankings, 2 chat pairs


def chat_on(page) -> list[list[str]]:
    """Two turns: regenerate then thumbs up, and thumbs down (which regenerates) then the next
    message. Returns each turn's answers, in the order sampled."""
    from playwright.sync_api import expect

    page.click("#tab-chat")
    ready = ".message.assistant .tools .up:not([disabled])"
    answers = []
    for turns, (message, reject) in enumerate((("How many legs do two cows have?", ".regenerate"),
                                               ("And three ducks?", ".down")), start=1):
        page.fill("#chat-input", message)
        press(page, "Enter")
        expect(page.locator(".message.assistant")).to_have_count(turns)
        page.wait_for_selector(ready)
        turn = [page.locator(".message.assistant .text").last.text_content()]
        page.click(f".message.assistant .tools {reject}")
        expect(page.locator(".message.assistant .tools .which")).to_have_text("2/2")
        page.wait_for_selector(ready)
        turn.append(page.locator(".message.assistant .text").last.text_content())
        answers.append(turn)
        if reject == ".regenerate":
            page.click(ready)  # thumbs up: keep the second answer
            expect(page.locator(".tools .saved")).to_contain_text("1 pair saved")
    page.fill("#chat-input", "Thanks!")  # going on keeps the second answer of the last turn
    press(page, "Enter")
    expect(page.locator(".message.assistant")).to_have_count(3)
    page.wait_for_selector(ready)
    return answers


def train_reward(home: Path, target: Path, files: list[Path], capsys) -> dict:
    """`rlhf run reward` on the labeled files, a few steps from the shared SFT model."""
    from pipeline.commands.cli import main
    from pipeline.registry import Registry

    sft = Registry(home, create=False).lookup("sft:latest").model_path
    capsys.readouterr()
    code = main(["--home", str(target), "run", "reward", "--config",
                 str(ROOT / "configs/tiny/reward.yaml"), f"model.source={sft}",
                 f"data.train_files=[{','.join(map(str, files))}]", "train.max_steps=2",
                 "train.batch_size=2", "train.warmup_steps=1", "checkpoint.every_steps=2",
                 "normalize.prompts=1", "normalize.max_new_tokens=8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_a_team_needs_the_token_and_its_labelers_rows_are_told_apart(outcome, browser, tmp_path):
    """Served beyond localhost: nothing is read or written without the link's token; with it,
    two labelers (two browsers) rank the same prompt, each row names its labeler, and the page
    and /api/stats report how often they agree."""
    from playwright.sync_api import expect

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "team.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    args = ("--policy", "ppo:latest", "--prompts", str(prompts), "--out", str(out), "--k", "3",
            "--host", "0.0.0.0", "--rankings-per-prompt", "2")
    with label_server(outcome.home, tmp_path / "team", *args) as server:
        token = re.search(r"\?token=([\w-]+)", server.banner).group(1)
        base = server.url.replace("0.0.0.0", "127.0.0.1")
        server.url = base
        assert token not in server.stderr.read_text()  # printed once, in the link, never logged
        # Without the token (or with a wrong one) nothing is read or written.
        assert server.get("/")[0] == 403
        assert server.get("/api/stats")[0] == 403
        assert server.get("/api/next", {"X-Label-Token": token[:-1] + "x"})[0] == 403
        refused = server.post("/api/rank", {"index": 0, "ranking": [[0], [1], [2]],
                                            "labeler": "eve"})
        assert refused[0] == 403 and not out.exists()
        page = browser.new_page()
        page.goto(base)
        assert "secret token" in page.content()
        page.close()
        # Before the script has wired the name form, it is not there to submit (a plain submit
        # would reload the page): seen with the script off.
        context = browser.new_context(java_script_enabled=False)
        page = context.new_page()
        page.goto(f"{base}?token={token}")
        expect(page.locator("#start")).to_be_hidden()
        context.close()

        rankings = {}
        for name, order in (("ann", "best first"), ("bob", "worst first")):
            context = browser.new_context()  # a labeler's own browser: cookies, stored name
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{base}?token={token}")
            expect(page.locator("#who")).to_be_visible()
            assert "token" not in page.url  # the link's token left the address bar
            page.fill("#labeler-name", name)
            page.click("#start")
            wait_for_prompt(page, PROMPTS[0])
            count = page.locator("#pool .card").count()
            keys = [str(i + 1) for i in range(count)]
            press(page, *(keys if order == "best first" else reversed(keys)))
            press(page, "Enter")
            expect(page.locator("#progress")).to_contain_text(f"{name} · ")
            rankings[name] = count
            if name == "bob":
                expect(page.locator("#team")).to_contain_text("Labelers agree on 0% of")
            context.close()
        stats = json.loads(server.get("/api/stats", {"X-Label-Token": token})[2])

    rows = read_rows(out)
    assert [row["labeler"] for row in rows] == ["ann", "bob"]
    assert rows[0]["responses"] == rows[1]["responses"]  # the same answers to compare
    pairs = rankings["ann"] * (rankings["ann"] - 1) // 2
    assert stats["team"] and stats["labelers"]["prompts"] == 1
    assert stats["labelers"]["pairs"] == pairs and stats["labelers"]["agreement"] == 0.0

"""persona_demo: the Gradio API on loopback (per-session history, persona resets) and the page in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import free_port

gr = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e .[demo]")
gradio_client = pytest.importorskip("gradio_client")

from persona_demo import build_demo  # noqa: E402
from persona_generation import generate_replies  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSONA = ["i love cats.", "i am a nurse."]
DECODING = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 8, "greedy": True}


@pytest.fixture(scope="module")
def demo_url(tiny_model_and_tokenizer, synthetic_data):
    model, tokenizer = tiny_model_and_tokenizer
    personas = [d["personality"] for d in synthetic_data["valid"]]
    demo = build_demo(model.eval(), tokenizer, personas=personas, persona=PERSONA, seed=0)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:")  # loopback only unless --host says otherwise
        yield demo.local_url
    finally:
        demo.close()


def text(message: dict) -> str:
    """A chat message's text (Gradio 6 returns content as a list of typed parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p.get("type") == "text")


def send(client, message, persona):
    _, chat = client.predict(message, "\n".join(persona), **DECODING, api_name="/send")
    return chat


def test_api_replies_with_the_chat_api_and_keeps_history_per_session(demo_url, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    alice = gradio_client.Client(demo_url, verbose=False)
    bob = gradio_client.Client(demo_url, verbose=False)
    chat = send(alice, "hi , how are you ?", PERSONA)
    # Same reply as persona_chat's own API on the same context (no second generation code path).
    (expected,) = generate_replies(
        model, tokenizer, [(PERSONA, ["hi , how are you ?"])], no_sample=True, max_new_tokens=8, min_length=1
    )
    assert [m["role"] for m in chat] == ["user", "assistant"] and expected
    assert text(chat[1]) == expected
    chat = send(alice, "what do you do ?", PERSONA)
    assert [text(m) for m in chat][::2] == ["hi , how are you ?", "what do you do ?"]
    # Bob's session starts empty: no cross-talk.
    assert [text(m) for m in send(bob, "hello", PERSONA)][::2] == ["hello"]
    # Alice's history went on with her own turns.
    assert len(send(alice, "nice .", PERSONA)) == 6


def test_api_persona_change_and_reset_clear_the_chat(demo_url):
    client = gradio_client.Client(demo_url, verbose=False)
    send(client, "hi", PERSONA)
    assert len(send(client, "hello again", PERSONA)) == 4
    assert client.predict(api_name="/set_persona") == []
    assert len(send(client, "hi", ["i am a pilot."])) == 2
    client.predict(api_name="/reset")
    assert len(send(client, "hi", ["i am a pilot."])) == 2
    persona = client.predict(api_name="/random_persona").splitlines()
    assert len(persona) >= 1 and all(s.endswith((".", "!", "?")) for s in persona)


def test_api_sends_with_ranking_and_repetition_control(demo_url, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    client = gradio_client.Client(demo_url, verbose=False)
    persona = "\n".join(PERSONA)
    options = {"no_repeat_ngram_size": 3, "repetition_penalty": 1.3}
    _, chat = client.predict("hi , how are you ?", persona, **DECODING, **options, api_name="/send")
    (expected,) = generate_replies(
        model, tokenizer, [(PERSONA, ["hi , how are you ?"])], no_sample=True, max_new_tokens=8, **options
    )
    assert text(chat[1]) == expected
    # Sampling 4 candidates for the multiple-choice head to rank: a reply comes, the session goes on.
    sampled = {**DECODING, "greedy": False, "num_ranked": 4, **options}
    _, chat = client.predict("what do you do ?", persona, **sampled, api_name="/send")
    assert len(chat) == 4 and text(chat[3])


def test_send_calls_the_generation_api_with_the_session_turns(demo_url, monkeypatch):
    """Each message is one call of `generate_replies` on the session's turns (the bot's own counted by the repetition
    options), with the page's decoding options: no bot object is built per message."""
    import persona_generation

    calls = []
    generate_replies = persona_generation.generate_replies

    def spy(model, tokenizer, contexts, **kwargs):
        calls.append((contexts, kwargs))
        return generate_replies(model, tokenizer, contexts, **kwargs)

    monkeypatch.setattr(persona_generation, "generate_replies", spy)
    client = gradio_client.Client(demo_url, verbose=False)
    first = text(send(client, "hi , how are you ?", PERSONA)[1])
    sampled = {**DECODING, "greedy": False, "num_ranked": 3, "no_repeat_ngram_size": 2}
    _, chat = client.predict("what do you do ?", "\n".join(PERSONA), **sampled, api_name="/send")
    assert len(calls) == 2 and text(chat[3])
    (contexts, kwargs) = calls[1]
    assert contexts == [(PERSONA, ["hi , how are you ?", first, "what do you do ?"])]
    assert kwargs["own_turns"] == [[first]] and kwargs["max_history"] == 2
    assert (kwargs["num_ranked"], kwargs["no_sample"], kwargs["no_repeat_ngram_size"]) == (3, False, 2)
    assert calls[0][1]["num_ranked"] == 1 and calls[0][1]["no_sample"] is True  # greedy: nothing to rank


@pytest.mark.slow
def test_missing_checkpoint_gives_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "persona_demo.py"), "--model_name_or_path", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"persona-demo: error: --model_name_or_path {tmp_path / 'nope'}: no such folder " \
        "(Hub ids look like 'org/name')."  # fmt: skip


def test_too_long_message_or_persona_is_refused_and_the_session_goes_on(demo_url):
    client = gradio_client.Client(demo_url, verbose=False)
    send(client, "hi", PERSONA)
    with pytest.raises(Exception, match="the limit is 2000"):
        send(client, "hello " * 400, PERSONA)
    with pytest.raises(Exception, match="the limits are 50 sentences"):
        send(client, "hi", [f"i like thing {i}." for i in range(51)])
    # A message under the limit but far over the model's window: the context is cut, the reply comes.
    chat = send(client, "hello " * 300, PERSONA)
    assert len(chat) == 4 and text(chat[-1])
    assert len(send(client, "and now ?", PERSONA)) == 6


def test_port_in_use_is_one_line_before_loading(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "persona_demo.py"), "--model_name_or_path", tiny_checkpoint,
             "--port", str(port)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith(f"persona-demo: error: --port {port}: cannot listen on 127.0.0.1:{port}")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Chromium not installed (Debian: apt-get install chromium chromium-driver)"
)
def test_browser_end_to_end(demo_url, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[demo])")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    artifacts = os.environ.get("PERSONA_TEST_ARTIFACTS", str(tmp_path))
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(demo_url)
        persona = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#persona textarea")))
        persona.clear()
        persona.send_keys("i love cats.\ni am a nurse.")
        # The new decoding options, set in the page: 4 candidates to rank (sampling), trigram blocking, a penalty.
        driver.find_element(By.CSS_SELECTOR, "#decoding .label-wrap, #decoding button").click()
        for elem_id, value in (("num-ranked", "4"), ("no-repeat-ngram-size", "3"), ("repetition-penalty", "1.2")):
            box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f"#{elem_id} input[type=number]")))
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(value, Keys.TAB)
            assert box.get_attribute("value") == value
        message = driver.find_element(By.CSS_SELECTOR, "#message textarea")
        message.send_keys("hi , do you have pets ?")
        driver.find_element(By.CSS_SELECTOR, "#send").click()
        bot_messages = "#chatbot .message-row.bot-row, #chatbot [data-testid='bot']"
        wait.until(lambda d: any(e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, bot_messages)))
        chat_text = driver.find_element(By.CSS_SELECTOR, "#chatbot").text
        assert "hi , do you have pets ?" in chat_text
        os.makedirs(artifacts, exist_ok=True)
        path = os.path.join(artifacts, "persona-demo.png")
        assert driver.save_screenshot(path) and os.path.getsize(path) > 10_000
    finally:
        driver.quit()


def test_port_0_serves_on_a_port_it_names_and_an_exposed_host_is_said(tiny_checkpoint):
    """--port 0: a free port is picked before Gradio starts, and the URL printed is the one that answers."""
    import re
    import urllib.request

    command = [sys.executable, os.path.join(ROOT, "persona_demo.py"), "--model_name_or_path", tiny_checkpoint,
               "--port", "0", "--host", "0.0.0.0"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"Running on local URL:\s+http://0\.0\.0\.0:(\d+)", line)
            if match:
                break
        assert match and int(match.group(1)) > 0, "".join(lines)
        warnings = [line for line in lines if "warning:" in line]
        assert len(warnings) == 1 and "--host 0.0.0.0" in warnings[0] and "network" in warnings[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/", timeout=30) as page:
            assert page.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)

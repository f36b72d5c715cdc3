"""`spqr serve`: the OpenAI-compatible server (``spqr_cli.runtime.serve``) on docs-llama-3m, on 127.0.0.1.

Clients: the ``openai`` package (what users point at the server) for well-formed requests, raw HTTP for the
malformed ones a library client would refuse to send. Greedy output is checked against ``run_model`` (what
``spqr run`` prints), which loads the model by itself.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from spqr_cli.runtime.serve import FALLBACK_STOPS, StopFilter, render_chat

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "docs-llama-3m"
NAME = "docs-3m"

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/models/docs-llama-3m not available")


@pytest.fixture(scope="module")
def loaded(one_thread) -> tuple[Any, Any]:
    from spqr_cli.runtime.loader import load_any_model

    return load_any_model(str(MODEL), "fp16", "cpu")


@contextlib.contextmanager
def _serving(model: Any, tokenizer: Any, handler: type | None = None) -> Iterator[tuple[str, int]]:
    """A server on a free port of 127.0.0.1, running in a thread; ``handler`` replaces its request handler."""
    from spqr_cli.runtime.serve import make_server

    srv = make_server(model, tokenizer, NAME, "127.0.0.1", 0)
    if handler is not None:
        srv.RequestHandlerClass = handler
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[0], srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(loaded: tuple[Any, Any]) -> Iterator[tuple[str, int]]:
    with _serving(*loaded) as address:
        yield address


@pytest.fixture(scope="module")
def client(server: tuple[str, int]) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://{server[0]}:{server[1]}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _raw(server: tuple[str, int], method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*server, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _greedy_reference(prompt: str, max_new_tokens: int) -> str:
    from spqr_cli.runtime.generation import run_model

    return run_model(str(MODEL), prompt, device="cpu", max_new_tokens=max_new_tokens, do_sample=False).text


def test_models_list(client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_greedy_completion_equals_spqr_run(client: Any) -> None:
    prompt, n = "The kernel", 24
    expected = _greedy_reference(prompt, n)
    assert expected  # the model does produce text for this prompt
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0)
    assert full.choices[0].text == expected
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == n
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason == "length"


def test_twenty_concurrent_streams(client: Any) -> None:
    """20 streaming requests at once (chat and completions, greedy and sampled) all finish, each well-formed;
    the greedy ones equal the same request answered alone."""
    prompts = [f"Item {i}: the file" for i in range(20)]

    def one(i: int) -> tuple[list[Any], str]:
        greedy = i % 2 == 0
        extra = {"temperature": 0} if greedy else {"temperature": 0.9, "seed": i}
        if i % 4 < 2:
            stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=12, stream=True, **extra)
            chunks = list(stream)
            return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        chunks = list(client.completions.create(model=NAME, prompt=prompts[i], max_tokens=12, stream=True, **extra))
        return chunks, "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    for i, (chunks, _text) in enumerate(results):
        assert len(chunks) >= 2, i
        assert len({c.id for c in chunks}) == 1, i
        assert chunks[-1].choices[0].finish_reason in ("stop", "length"), i
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1]), i
        if i % 4 < 2:
            assert chunks[0].choices[0].delta.role == "assistant", i
    for i in (0, 2):  # greedy chat, greedy completion: same text as alone
        if i % 4 < 2:
            alone = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompts[i]}],
                                                   max_tokens=12, temperature=0).choices[0].message.content
        else:
            alone = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=12,
                                              temperature=0).choices[0].text
        assert results[i][1] == alone


def test_sampling_is_seeded(client: Any) -> None:
    texts = [client.completions.create(model=NAME, prompt="A pipe", max_tokens=16, temperature=1.0, seed=s)
             .choices[0].text for s in (7, 7, 8)]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_stream_is_server_sent_events(server: tuple[str, int]) -> None:
    body = json.dumps({"model": NAME, "prompt": "The kernel", "max_tokens": 5, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    status, headers, data = _raw(server, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = data.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] == 5 and payloads[-1]["choices"] == []
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == _greedy_reference("The kernel", 5)


def test_stop_strings(client: Any) -> None:
    expected = _greedy_reference("The kernel", 24)
    stop = expected[6:9]
    assert stop.strip()
    cut = expected[: expected.index(stop)]
    full = client.completions.create(model=NAME, prompt="The kernel", max_tokens=24, temperature=0, stop=[stop])
    assert full.choices[0].text == cut and full.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt="The kernel", max_tokens=24, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": NAME, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 3]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 512}, 400, "max_tokens"),  # + prompt > 512
    ("/v1/completions", {"model": NAME, "prompt": "hi " * 600}, 400, "prompt"),  # the prompt fills the context
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream": True, "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("/v1/embeddings", {"model": NAME, "input": "x"}, 404, None),
])
def test_malformed_requests_get_json_4xx(server: tuple[str, int], path: str, body: Any, status: int,
                                         param: str | None) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, data = _raw(server, "POST", path, raw, {"Content-Type": "application/json"})
    assert got == status, data
    assert headers["Content-Type"] == "application/json"
    error = json.loads(data)["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert "Traceback" not in error["message"]


def test_other_methods_and_sizes(server: tuple[str, int]) -> None:
    for method, path, body, headers, status in [
        ("GET", "/v1/completions", None, {}, 405),
        ("GET", "/nowhere", None, {}, 404),
        ("GET", "/v1/models/other", None, {}, 404),
        ("HEAD", "/v1/models", None, {}, 405),
        ("POST", "/v1/completions", b"[" * 100000 + b"]" * 100000, {}, 400),
        ("DELETE", "/v1/models", None, {}, 405),
        ("POST", "/v1/completions", b"{}", {"Content-Length": str(10**9)}, 413),
        ("POST", "/v1/completions", b"{}", {"Content-Length": "abc"}, 400),
    ]:
        got, resp_headers, data = _raw(server, method, path, body, headers)
        assert got == status, (method, path, data)
        assert method == "HEAD" or json.loads(data)["error"]["message"]  # a reply to HEAD has no body
    for raw in (b"GARBAGE\r\n\r\n", b"FOO /v1/models HTTP/1.1\r\n\r\n", b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(server, timeout=30) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        if reply.startswith(b"HTTP/"):
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.split()[1] in (b"400", b"405", b"414"), reply[:200]
        else:  # a request line without a version is HTTP/0.9: the reply is the body alone
            body = reply
        assert json.loads(body)["error"]["message"]
    status, _, data = _raw(server, "GET", "/v1/models")  # still serving
    assert status == 200 and json.loads(data)["data"][0]["id"] == NAME


def test_error_before_the_body_does_not_poison_keep_alive(server: tuple[str, int]) -> None:
    """A request refused before its body is read (unknown route) closes the connection, so the unread body is never
    parsed as the next request: pipelined, the second request gets no reply at all rather than a bogus 400."""
    body = json.dumps({"model": NAME, "prompt": "The kernel", "max_tokens": 2, "temperature": 0}).encode()

    def post(path: str) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    with socket.create_connection(server, timeout=30) as sock:
        sock.sendall(post("/v1/nope") + post("/v1/completions"))
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 404") and b"Connection: close" in reply
    assert reply.count(b"HTTP/1.1") == 1
    conn = http.client.HTTPConnection(*server, timeout=30)  # a keep-alive client reconnects and is served
    for path, status in (("/v1/nope", 404), ("/v1/completions", 200)):
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == status and json.loads(resp.read())
    conn.close()


def test_client_leaving_mid_stream(server: tuple[str, int], client: Any) -> None:
    """A client that closes its connection during a stream ends that generation; the server keeps serving."""
    body = json.dumps({"model": NAME, "prompt": "The kernel", "max_tokens": 400, "temperature": 0,
                       "stream": True}).encode()
    with socket.create_connection(server, timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    expected = _greedy_reference("The kernel", 8)
    assert client.completions.create(model=NAME, prompt="The kernel", max_tokens=8,
                                     temperature=0).choices[0].text == expected


def test_a_client_that_does_not_read_holds_no_one_up(loaded: tuple[Any, Any]) -> None:
    """A streaming client that stops reading delays only its own stream: its generation still ends, so the next
    request is answered at once (it used to wait for the stalled client's socket timeout, 300 s); read at last, the
    stalled stream is whole. Small socket buffers on both ends make the server's writes block after a few KB."""
    from spqr_cli.runtime.serve import Handler

    class SmallSendBuffer(Handler):
        def setup(self) -> None:
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            super().setup()

    body = json.dumps({"model": NAME, "prompt": "The", "max_tokens": 500, "temperature": 0, "stream": True}).encode()
    with _serving(*loaded, handler=SmallSendBuffer) as address, socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(60)
        stalled.connect(address)
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
                        b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        reply = stalled.recv(12)  # the status line: the stream has started, its generation holds the lock
        started = time.monotonic()
        status, _, data = _raw(address, "POST", "/v1/completions", json.dumps(
            {"model": NAME, "prompt": "The kernel", "max_tokens": 4, "temperature": 0}).encode(), timeout=30)
        assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 4
        assert time.monotonic() - started < 30
        while chunk := stalled.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert len(reply) > 40_000  # far more than the socket buffers hold: the server's writes did block
    assert b'"finish_reason": "length"' in reply or b'"finish_reason": "stop"' in reply


def test_openai_client_sees_errors(client: Any) -> None:
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=100000)


def test_chat_prompt_rendering() -> None:
    from transformers import PreTrainedTokenizerFast

    from spqr_cli.core.models import load_tokenizer
    from spqr_cli.runtime.serve import RequestError

    tok = load_tokenizer(str(MODEL))
    assert not getattr(tok, "chat_template", None)  # the fallback transcript
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is "},
                                             {"type": "text", "text": "a pipe?"}]}]
    text, special, stops = render_chat(tok, messages)
    assert text == "System: Be brief.\nUser: What is a pipe?\nAssistant:" and special
    assert stops == list(FALLBACK_STOPS)

    templated = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    templated.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    text, special, stops = render_chat(templated, messages)
    assert text == "<s><|system|>Be brief.<|user|>What is a pipe?<|assistant|>" and not special and stops == []
    with pytest.raises(RequestError):
        render_chat(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_stop_filter_holds_back_partial_stops() -> None:
    f = StopFilter(["END"])
    assert f.feed("abc E") == ("abc ", False)  # "E" could start "END"
    assert f.feed("x") == ("Ex", False)
    assert f.feed(" EN") == (" ", False)
    assert f.feed("D tail") == ("", True) and f.text == "abc Ex "
    g = StopFilter([])
    assert g.feed("E") == ("E", False) and g.flush() == ""


def test_cli_serve_subprocess(tmp_path: Path) -> None:
    """`spqr serve` itself: prints its address, answers, and stops cleanly on Ctrl-C (SIGINT)."""
    env = {**os.environ, "SPQR_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spqr_cli", "serve", str(MODEL), "--port", "0", "--device", "cpu",
                             "--name", "cli-model"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert "serving 'cli-model' on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, _, data = _raw(("127.0.0.1", port), "POST", "/v1/completions", json.dumps(
            {"model": "cli-model", "prompt": "The kernel", "max_tokens": 6, "temperature": 0}).encode())
        assert status == 200 and json.loads(data)["choices"][0]["text"] == _greedy_reference("The kernel", 6)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_taken_port_is_reported_before_the_model_loads(tmp_path: Path) -> None:
    from spqr_cli.core.errors import SpQRError
    from spqr_cli.runtime.serve import serve_model

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SpQRError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_model(tmp_path / "no-model-here", port=port, device="cpu")  # never loaded: the port fails first

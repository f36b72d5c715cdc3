"""`spqr serve`: an OpenAI-compatible HTTP endpoint over the generation path of `spqr run`.

Existing clients (the ``openai`` package, LangChain, curl scripts) then talk to a compressed model unchanged:
``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, each with ``"stream": true``
(server-sent events: ``data: {json}\\n\\n`` per text piece, then ``data: [DONE]``) or without.

Why the standard library's ``ThreadingHTTPServer`` and no web framework: the server has three routes, one model and
one generation at a time; a framework (FastAPI + uvicorn + pydantic) would add three dependencies to do what ~300
lines do here, and none of them would run the model any faster. Each connection gets a thread; generations are
serialized by one lock on the model (one model, one device: running two at once would only interleave them), so
concurrent requests queue and are answered in turn. A streamed generation runs in a worker thread that hands its
text to the connection's thread through a queue: a client that reads slowly (or not at all) delays only its own
stream, never the lock, and the generation ends within its max_tokens whatever the client does. Fields and types
are checked before a request waits for the lock, so a malformed request is answered at once (only the prompt-length
check, which needs the tokenizer, waits for its turn) with a 4xx and an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}``; nothing a client sends leads to a traceback.

Chat prompts: the tokenizer's chat template when it has one (``apply_chat_template`` with the generation prompt);
otherwise a plain transcript, one ``Role: content`` line per message and a final ``Assistant:``, with
``"\\nUser:"`` and ``"\\nSystem:"`` as extra stop strings so the model does not write the next user turn.
"""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from spqr_cli.core.errors import SpQRError

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body larger than this is refused (413) before it is read
MAX_STOP = 4  # OpenAI's limit on stop sequences
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_DEFAULT_TOKENS = 256  # chat has no fixed default upstream; capped by the context left after the prompt
FALLBACK_STOPS = ("\nUser:", "\nSystem:")
GREEDY_BELOW = 1e-3  # temperatures below this decode greedily (dividing logits by ~0 overflows to inf/nan)
ROLES = ("system", "user", "assistant", "developer", "tool")


class RequestError(Exception):
    """A client error: answered with ``status`` and an OpenAI-style JSON error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Stop(Exception):
    """Raised from the text callback to end a generation early (a stop string, or the client went away)."""


@dataclass
class GenRequest:
    """A validated completion or chat request."""

    prompt: str
    max_tokens: int | None  # None: the endpoint's default, capped by the context left
    default_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stream: bool
    stop: list[str]
    chat: bool
    include_usage: bool
    add_special_tokens: bool = True
    hidden_stops: list[str] = field(default_factory=list)  # the fallback chat transcript's turn markers


# ---------------------------------------------------------------- validation


def _field(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any = None, required: bool = False
           ) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise RequestError(f"missing required parameter: {name!r}", name)
        return default
    value = body[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = "a number" if float in types else " or ".join(_JSON_TYPES[t] for t in types)
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise RequestError(f"{name!r} must be {wanted}, got {got}", name)
    return value


_JSON_TYPES = {str: "a string", list: "an array", dict: "an object", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool = False
            ) -> float:
    value = float(_field(body, name, (int, float), default))
    if not (low < value if low_open else low <= value) or value > high:
        raise RequestError(f"{name!r} must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return value


def parse_request(body: Any, chat: bool, served_name: str, tokenizer: Any, context: int | None) -> GenRequest:
    """Check a request body's fields and types (OpenAI's names and ranges); ``RequestError`` says what is wrong.

    Supported: model, prompt (completions: a string or a list of one string) / messages (chat), max_tokens
    (chat also max_completion_tokens), temperature (below ``GREEDY_BELOW``, e.g. 0: greedy), top_p, top_k (an
    extension), n (1 only), stream, stream_options.include_usage, stop, seed. Other fields (user,
    presence_penalty, ...) are accepted and ignored, as many clients send them by default."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = _field(body, "model", (str,), required=True)
    if model != served_name:
        raise RequestError(f"the model {model!r} does not exist; this server serves {served_name!r}", "model",
                           status=404, code="model_not_found")
    if chat:
        prompt, add_special, hidden = render_chat(tokenizer, _field(body, "messages", (list,), required=True))
    else:
        raw = _field(body, "prompt", (str, list), required=True)
        if isinstance(raw, list):
            if len(raw) != 1 or not isinstance(raw[0], str):
                raise RequestError("'prompt' must be a string or a list of one string (batches and token-id "
                                   "prompts are not supported)", "prompt")
            raw = raw[0]
        prompt, add_special, hidden = raw, True, []
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, key, (int,))
    if max_tokens is not None and (max_tokens < 1 or (context is not None and max_tokens > context)):
        raise RequestError(f"{key!r} must be between 1 and the model's context of {context} tokens, got "
                           f"{max_tokens}", key)
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise RequestError("only 'n': 1 is supported", "n")
    if _field(body, "logprobs", (bool, int)) not in (None, False) or _field(body, "echo", (bool,), False):
        raise RequestError("'logprobs' and 'echo' are not supported", "logprobs")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    seed = _field(body, "seed", (int,))
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise RequestError("'seed' must fit in 64 bits", "seed")
    options = _field(body, "stream_options", (dict,), {})
    return GenRequest(
        prompt=prompt, max_tokens=max_tokens, default_tokens=CHAT_DEFAULT_TOKENS if chat else
        COMPLETION_DEFAULT_TOKENS, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), top_k=_top_k(body),
        seed=seed if seed is not None else secrets.randbelow(2**31), stream=_field(body, "stream", (bool,), False),
        stop=stop, chat=chat, include_usage=bool(_field(options, "include_usage", (bool,), False)),
        add_special_tokens=add_special, hidden_stops=hidden)


def _top_k(body: dict[str, Any]) -> int:
    top_k = _field(body, "top_k", (int,), 0)
    if top_k < 0:
        raise RequestError(f"'top_k' must be >= 0 (0 = off), got {top_k}", "top_k")
    return top_k


def _message_text(message: Any, i: int) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
    if isinstance(content, list):  # content parts: only text parts can be served by a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError(f"messages[{i}].content parts must be text parts", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string", "messages")
    return role, content


def render_chat(tokenizer: Any, messages: list[Any]) -> tuple[str, bool, list[str]]:
    """The prompt text for ``messages``, whether tokenizing must add special tokens, and extra stop strings.

    With a chat template: the template's text (it carries BOS itself) and no extra stops. Without: the plain
    transcript described in the module docstring."""
    if not messages:
        raise RequestError("'messages' must not be empty", "messages")
    turns = [_message_text(m, i) for i, m in enumerate(messages)]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 (jinja raises TemplateError for turns a template refuses)
            raise RequestError(f"the model's chat template refused these messages: {e}", "messages") from None
        return text, False, []
    lines = [f"{role.capitalize()}: {content}" for role, content in turns]
    return "\n".join(lines) + "\nAssistant:", True, list(FALLBACK_STOPS)


# ---------------------------------------------------------------- generation


class StopFilter:
    """Passes text on while holding back any tail that could start a stop string; finds the first stop string.

    ``feed`` returns the text that is safe to send and whether a stop string ended the output (the text is then
    cut before it, as OpenAI does)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, False
        start = max(0, self.sent - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.sent = self.text[self.sent:end], end
            self.text = self.text[:end]
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class Outcome:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class ModelServer:
    """One loaded model behind a lock; ``complete`` runs one request through ``generation.generate``."""

    def __init__(self, model: Any, tokenizer: Any, name: str, compile: bool = True,
                 on_status: Callable[[str], None] | None = None) -> None:
        self.model, self.tokenizer, self.name, self.compile = model, tokenizer, name, compile
        self.on_status = on_status
        self.lock = threading.Lock()
        self.created = int(time.time())

    @property
    def context(self) -> int | None:
        from spqr_cli.runtime.generation import context_limit

        return context_limit(self.model)

    def complete(self, req: GenRequest, on_text: Callable[[str], None] | None = None,
                 on_start: Callable[[], None] | None = None) -> Outcome:
        """Generate for ``req`` (waits for the model's lock). ``on_start`` runs once the request is known to fit
        the context, before the first token (``stream`` announces the stream's start there); ``on_text`` gets the
        output piece by piece, stop strings cut off. Both run under the lock: they must not wait on a client."""
        from spqr_cli.runtime.generation import check_context, generate, prompt_ids

        with self.lock:
            n_prompt = prompt_ids(self.tokenizer, req.prompt, req.add_special_tokens).shape[1]
            context = self.context
            if req.max_tokens is None:
                left = context - n_prompt if context is not None else req.default_tokens
                if left < 1:
                    raise RequestError(f"the prompt ({n_prompt} tokens) fills the model's context of {context} "
                                       "tokens", "messages" if req.chat else "prompt")
                max_tokens = min(req.default_tokens, left)
            else:
                max_tokens = req.max_tokens
                try:
                    check_context(self.model, n_prompt, max_tokens, flag="max_tokens")
                except SpQRError as e:
                    raise RequestError(str(e), "max_tokens") from None
            if on_start is not None:
                on_start()
            stops = StopFilter(req.stop + req.hidden_stops)
            stopped = False

            def emit(piece: str) -> None:
                nonlocal stopped
                out, hit = stops.feed(piece)
                if out and on_text is not None:
                    on_text(out)
                if hit:
                    stopped = True
                    raise _Stop

            result = None
            try:
                result = generate(self.model, self.tokenizer, req.prompt, max_new_tokens=max_tokens,
                                  do_sample=req.temperature >= GREEDY_BELOW,
                                  temperature=req.temperature if req.temperature >= GREEDY_BELOW else 1.0,
                                  top_p=req.top_p, top_k=req.top_k, seed=req.seed, on_text=emit,
                                  compile=self.compile, on_status=self.on_status,
                                  add_special_tokens=req.add_special_tokens)
            except _Stop:
                pass
            if not stopped:
                rest = stops.flush()
                if rest and on_text is not None:
                    with contextlib.suppress(_Stop):  # a cancelled stream's consumer is gone: nothing to send
                        on_text(rest)
            text = stops.text
            if result is not None and not stopped:
                new, finish = result.new_tokens, "length" if result.new_tokens >= max_tokens else "stop"
            else:
                new, finish = len(self.tokenizer(text, add_special_tokens=False).input_ids), "stop"
            return Outcome(text=text, prompt_tokens=n_prompt, completion_tokens=new, finish_reason=finish)

    def stream(self, req: GenRequest) -> Iterator[tuple[str, Any]]:
        """``complete`` for a streaming client, which must not hold the lock: the generation runs in a worker
        thread and never waits on the client; its events come here through a queue, to be written at the client's
        pace: ``("start", None)`` once the request fits the context, ``("text", piece)`` ..., then ``("done",
        Outcome)``. An exception of ``complete`` is raised here. Closing the iterator early (the client went away)
        ends the generation at its next piece; a client that stalls only delays its own writes."""
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        cancelled = threading.Event()

        def on_text(piece: str) -> None:
            if cancelled.is_set():
                raise _Stop
            events.put(("text", piece))

        def work() -> None:
            try:
                events.put(("done", self.complete(req, on_text, on_start=lambda: events.put(("start", None)))))
            except BaseException as e:  # noqa: BLE001 (handed to the handler thread, which answers it)
                events.put(("error", e))

        threading.Thread(target=work, name="spqr-generate", daemon=True).start()
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            cancelled.set()


# ---------------------------------------------------------------- HTTP


def _completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def _chunk(req: GenRequest, cid: str, created: int, name: str, text: str | None, finish: str | None,
           first: bool = False) -> dict[str, Any]:
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
            {"content": text} if text is not None else {})
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [choice]}
    return {"id": cid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def _usage(out: Outcome) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


class Handler(BaseHTTPRequestHandler):
    """Routes ``/v1/...`` to the ``ModelServer`` on ``self.server.model_server``."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client (httpx) expects; streams use chunked bodies
    server_version = "spqr-serve"
    timeout = 300  # an idle keep-alive connection frees its thread after this many seconds

    @property
    def ms(self) -> ModelServer:
        return self.server.model_server  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        log = getattr(self.server, "log", None)
        if log is not None:
            log(f"{self.address_string()} {format % args}")

    # ---- responses

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:  # e.g. an error before the body was read: the client must not reuse the socket
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: RequestError) -> None:
        self._send_json(err.status, err.body())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's error page (a request line or header it cannot parse, an unknown method) as JSON too;
        an unknown method is 405 rather than its 501, as the client is at fault."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command!r} is not supported"
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "error"
        err = RequestError(message or phrase, status=code, code=phrase.lower().replace(" ", "_"),
                           type_="invalid_request_error" if code < 500 else "server_error")
        self.close_connection = True
        data = json.dumps(err.body()).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _sse(self, payload: Any) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self._write_chunk(f"data: {text}\n\n".encode())

    # ---- routing

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        model = {"id": self.ms.name, "object": "model", "created": self.ms.created, "owned_by": "spqr"}
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif path == f"/v1/models/{self.ms.name}":
            self._send_json(200, model)
        elif path.startswith("/v1/models/"):
            self._send_error(RequestError(f"the model {path.removeprefix('/v1/models/')!r} does not exist",
                                          "model", 404, code="model_not_found"))
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif path in ("/v1/completions", "/v1/chat/completions"):
            self._send_error(RequestError(f"{path} takes POST", status=405, code="method_not_allowed"))
        else:
            self._send_error(RequestError(f"no route {path!r}: use /v1/models, /v1/completions or "
                                          "/v1/chat/completions", status=404, code="not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path not in ("/v1/completions", "/v1/chat/completions"):
                self.close_connection = True  # the body is not read: the connection cannot be reused
                raise RequestError(f"no route {path!r}: use /v1/completions or /v1/chat/completions", status=404,
                                   code="not_found")
            body = self._read_body()
            req = parse_request(body, path.endswith("chat/completions"), self.ms.name, self.ms.tokenizer,
                                self.ms.context)
            if req.stream:
                self._stream(req)
            else:
                self._complete(req)
        except RequestError as e:
            self._send_error(e)
        except SpQRError as e:  # a generation setting refused by ``generate`` (checked here first; kept as a net)
            self._send_error(RequestError(str(e)))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 (a bug or a device error: answer 500 in JSON, keep serving)
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            self.close_connection = True
            try:
                self._send_error(RequestError(f"internal error: {type(e).__name__}: {e}", status=500,
                                              type_="server_error"))
            except OSError:
                pass

    def _read_body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported: send Content-Length", status=411)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise RequestError("bad Content-Length header") from None
        if length < 0:
            self.close_connection = True
            raise RequestError("bad Content-Length header")
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError("the request body is nested too deeply") from None

    def _complete(self, req: GenRequest) -> None:
        cid, created = _completion_id(req.chat), int(time.time())
        out = self.ms.complete(req)
        if req.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out.text},
                                      "logprobs": None, "finish_reason": out.finish_reason}
            body = {"id": cid, "object": "chat.completion", "created": created, "model": self.ms.name,
                    "choices": [choice], "usage": _usage(out)}
        else:
            body = {"id": cid, "object": "text_completion", "created": created, "model": self.ms.name,
                    "choices": [{"index": 0, "text": out.text, "logprobs": None,
                                 "finish_reason": out.finish_reason}], "usage": _usage(out)}
        self._send_json(200, body)

    def _stream(self, req: GenRequest) -> None:
        cid, created, name = _completion_id(req.chat), int(time.time()), self.ms.name
        started = False
        try:
            with contextlib.closing(self.ms.stream(req)) as events:
                for kind, value in events:
                    if kind == "done":
                        out = value
                        break
                    try:
                        if kind == "start":
                            started = True
                            self._start_stream(req, cid, created, name)
                        else:
                            self._sse(_chunk(req, cid, created, name, value, None))
                    except OSError:  # the client went away: closing ``events`` ends its generation
                        self.close_connection = True
                        return
        except RequestError:
            if started:  # cannot happen today (checks precede on_start); keep the stream well-formed anyway
                self._end_stream()
                return
            raise
        except Exception as e:  # noqa: BLE001 (after the headers, an error can only be reported in the stream)
            if not started:
                raise
            self.log_error("internal error while streaming: %s: %s", type(e).__name__, e)
            self._sse(RequestError(f"internal error: {type(e).__name__}: {e}", status=500,
                                   type_="server_error").body())
            self._end_stream()
            return
        self._sse(_chunk(req, cid, created, name, None if req.chat else "", out.finish_reason))
        if req.include_usage:
            self._sse({"id": cid, "object": "chat.completion.chunk" if req.chat else "text_completion",
                       "created": created, "model": name, "choices": [], "usage": _usage(out)})
        self._end_stream()

    def _start_stream(self, req: GenRequest, cid: str, created: int, name: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if req.chat:
            self._sse(_chunk(req, cid, created, name, None, None, first=True))

    def _end_stream(self) -> None:
        self._sse("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive after shutdown
    allow_reuse_address = True


def make_server(model: Any, tokenizer: Any, name: str, host: str = "127.0.0.1", port: int = 8000,
                compile: bool = True, log: Callable[[str], None] | None = None,
                on_status: Callable[[str], None] | None = None) -> Server:
    """A bound, not yet running server (``serve_forever`` runs it; ``port=0`` picks a free port, read it from
    ``server.server_address``)."""
    return _attach(_bind(host, port), model, tokenizer, name, compile, log, on_status)


def _bind(host: str, port: int) -> Server:
    try:
        return Server((host, port), Handler)
    except OSError as e:
        raise SpQRError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host"
                        ) from None


def _attach(server: Server, model: Any, tokenizer: Any, name: str, compile: bool,
            log: Callable[[str], None] | None, on_status: Callable[[str], None] | None) -> Server:
    server.model_server = ModelServer(model, tokenizer, name, compile=compile, on_status=on_status)  # type: ignore
    server.log = log  # type: ignore[attr-defined]
    return server


def serve_model(path: str | Path, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
                device: str = "auto", verify: bool = True, compile: bool = True,
                on_ready: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None) -> None:
    """Load ``path`` (packed or dense, as ``spqr run`` does) and serve it until interrupted (Ctrl-C)."""
    from spqr_cli.core.models import resolve_device
    from spqr_cli.runtime.generation import load_for_generation

    if not 0 <= port <= 65535:
        raise SpQRError(f"--port must be in 0..65535, got {port}")
    resolve_device(device)
    name = name or Path(str(path).rstrip("/")).name or str(path)
    # bound before the load: a taken port is reported at once, not after minutes of loading (connections made
    # meanwhile wait in the listen queue until serving starts)
    server = _bind(host, port)
    try:
        model, tokenizer = load_for_generation(path, device, verify)
        _attach(server, model, tokenizer, name, compile, log, log)
    except BaseException:
        server.server_close()
        raise
    bound_host, bound_port = server.server_address[:2]
    if on_ready is not None:
        on_ready(f"serving {name!r} on http://{bound_host}:{bound_port}/v1 (OpenAI API: /v1/models, "
                 "/v1/completions, /v1/chat/completions; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

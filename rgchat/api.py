"""OpenAI's wire format, as rgchat serves it: requests checked and turned into plain values, responses and
stream chunks built as OpenAI sends them, errors in OpenAI's shape. No model, no HTTP: rgchat/server.py
does those."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time

from rgchat.settings import DEFAULTS, SettingError, Settings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as OpenAI; the chat's own limit is higher, but here every slot waits for each check


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param)


@dataclasses.dataclass(frozen=True)
class Call:
    """One checked request: the conversation (chat) or the text (completions), and how to answer."""

    model: str | None
    messages: tuple[tuple[str, str], ...] | None  # (role, text), roles normalised to system/user/assistant
    prompt: str | None
    settings: Settings
    stream: bool
    include_usage: bool

    @property
    def chat(self) -> bool:
        return self.messages is not None


def parse_json(data: bytes) -> dict:
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad(None, "the request body is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise bad(None, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    return body


# Fields that would change the answer and that rgchat does not do: each with the values that mean "off".
UNSUPPORTED = {
    "n": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]),
}


def parse_chat(body: dict) -> Call:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list")
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    return _call(body, messages=parsed, prompt=None)


def parse_completion(body: dict) -> Call:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "prompt must be a non-empty string (one prompt per request)")
    return _call(body, messages=None, prompt=_text(prompt, "prompt"))


def _message(i: int, message) -> tuple[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad(where, f"{where} must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role", f"{where}.role must be one of system, user, assistant (got {role!r}); "
                                   "tools are not supported")
    for field in ("tool_calls", "function_call", "audio"):
        if message.get(field) not in (None, []):
            raise bad(f"{where}.{field}", f"{where}.{field} is not supported")
    content = message.get("content")
    if isinstance(content, str):
        return ROLES[role], _text(content, f"{where}.content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", f"{where}.content[{j}] must be a text part "
                                                   '({"type": "text", "text": ...}); images and audio are not supported')
            texts.append(_text(part["text"], f"{where}.content[{j}]"))
        return ROLES[role], "".join(texts)
    raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts")


def _text(text: str, param: str) -> str:
    """`text` if it is valid Unicode: JSON can spell a lone surrogate (\\ud800), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, f"{param} is not valid Unicode (it holds a lone surrogate)") from None
    return text


def _call(body: dict, messages, prompt) -> Call:
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise bad(name, f"{name}={json.dumps(body[name])[:80]} is not supported by rgchat")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "model must be a string")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", "stream must be true or false")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad("stream_options", "stream_options must be an object, and only with stream: true")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage", "stream_options.include_usage must be true or false")
    return Call(model, messages, prompt, _settings(body), stream, include_usage)


def _settings(body: dict) -> Settings:
    values = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
        if body.get(name) is not None:
            values[name] = body[name]
    limits = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    if limits:
        values["max_tokens"] = body[limits[0]]
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOPS:
            raise bad("stop", f"stop must be a string or a list of at most {MAX_STOPS} strings")
        values["stop"] = tuple(stop) if all(isinstance(s, str) for s in stop) else stop
    try:
        return DEFAULTS.replace(**values)
    except SettingError as e:
        param = limits[0] if e.name == "max_tokens" else e.name
        raise bad(param, f"{param}{str(e).removeprefix(e.name)}") from None


# --- responses ---------------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Response:
    """The pieces of one answer in OpenAI's shapes: whole, or as stream chunks sharing one id and time."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id, self.created = new_id(chat), int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, used: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": used}

    def chunk(self, text: str | None = None, *, role: bool = False, finish_reason: str | None = None,
              with_usage: bool = False) -> dict:
        """A stream chunk: the role (first, chat only), a piece of text, or the finish reason (last)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if finish_reason else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, used: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": used}


def sse(payload: dict | str) -> bytes:
    """One Server-Sent Event: `data: JSON` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()

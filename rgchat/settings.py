"""Generation settings, declared once: the CLI flags' defaults and help, `/set` in the chat, the settings a
state file keeps and the server's request fields are all read from `Settings` and checked by `validate`."""

from __future__ import annotations

import dataclasses
import math

SEED_MAX = 2**64 - 1  # what torch's generator takes
REPEAT_WINDOW = 64  # the repetition penalty looks at this many recent tokens (bounded, as llama.cpp's last_n)
MAX_STOPS = 64  # stop strings per answer (OpenAI allows 4; each is checked after every token)
MAX_STOP_CHARS = 4096

# (lowest, highest or None) of every number a user can set.
RANGES: dict[str, tuple[float, float | None]] = {
    "temperature": (0.0, None), "top_k": (0, None), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
    "repeat_penalty": (0.01, None), "seed": (0, SEED_MAX), "max_tokens": (1, None),
}
INTEGERS = ("top_k", "seed", "max_tokens")

HELP = {
    "temperature": "0 is greedy.",
    "top_k": "Sample from the k likeliest tokens (0: all).",
    "top_p": "Nucleus sampling mass (1: off).",
    "min_p": "Drop tokens less likely than this times the likeliest (0: off).",
    "repeat_penalty": f"Penalise tokens repeated from the answer's last {REPEAT_WINDOW} tokens (1: off).",
    "seed": "Seed: the same seed and input give the same output.",
    "max_tokens": "Most tokens per answer.",
    "stop": "End the answer at this text (repeatable).",
}


class SettingError(ValueError):
    """A value a setting cannot take; the message begins with the setting's name."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.name = name


def validate(name: str, value):
    """`value` if the setting `name` can take it, else SettingError saying why (NaN and infinities too)."""
    if name == "stop":
        return _stops(value)
    if name == "seed" and value is None:
        return None
    kind = int if name in INTEGERS else float
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise SettingError(name, f"must be {'an integer' if kind is int else 'a number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(name, "must be a finite number")
    if kind is float and isinstance(value, int) and abs(value) > 2**1000:  # float() of it would overflow
        raise SettingError(name, "must be a finite number")
    low, high = RANGES[name]
    if value < low or (high is not None and value > high):
        raise SettingError(name, f"must be between {low} and {high}" if high is not None else f"must be at least {low}")
    return kind(value)


def _stops(value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise SettingError("stop", "must be a list of strings")
    if len(value) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in value):
        raise SettingError("stop", f"takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
    return tuple(s for s in value if s)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How one answer is generated. Defaults are close to what llama.cpp and ollama ship."""

    temperature: float = 0.8  # 0 means greedy
    top_k: int = 40  # 0 means no limit
    top_p: float = 0.95  # 1 means no limit
    min_p: float = 0.05  # drop tokens less likely than min_p times the likeliest; 0 means no limit
    repeat_penalty: float = 1.0  # > 1 makes recently seen tokens less likely; 1 means off (Gemma needs none)
    seed: int | None = None  # None: fresh entropy
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in NAMES:
            object.__setattr__(self, name, validate(name, getattr(self, name)))

    def replace(self, **changes) -> Settings:
        """A copy with `changes`, each validated (ValueError names a bad one)."""
        unknown = set(changes) - set(NAMES)
        if unknown:
            raise SettingError(sorted(unknown)[0], f"is not a setting; one of: {', '.join(NAMES)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {name: list(value) if name == "stop" else value for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> Settings:
        """Settings from a dict such as `to_dict` wrote; missing names keep their defaults."""
        if not isinstance(values, dict):
            raise ValueError("settings must be a mapping")
        return cls().replace(**{k: tuple(v) if k == "stop" and isinstance(v, list) else v for k, v in values.items()})


NAMES = tuple(f.name for f in dataclasses.fields(Settings))
DEFAULTS = Settings()


def parse(name: str, text: str):
    """A setting's value from what a user typed (`/set NAME VALUE`), validated."""
    text = text.strip()
    if name == "seed" and text.lower() == "none":
        return None
    if name == "stop":
        return validate(name, [text] if text else [])
    try:
        value = int(text) if name in INTEGERS else float(text)
    except ValueError:
        raise SettingError(name, f"must be {'an integer' if name in INTEGERS else 'a number'}") from None
    return validate(name, value)

"""Sampling parameters of a LightLLM `parameters` dict (LightLLM §3.1, DESIGN.md), validated strictly.

Differences from LightLLM, on purpose (LightLLM §16.5, DESIGN.md):

* Unknown names are rejected (with a "did you mean" hint), except the names in
  `IGNORED_PARAMS` that LightLLM/TGI clients commonly send and that we accept and ignore.
* `do_sample=false` does not hide invalid `temperature`/`top_p`/`top_k`: they are validated anyway.
* `frequency_penalty`/`presence_penalty` may be negative (OpenAI's range [-2, 2]).
* `repetition_penalty` may be any finite value > 0; values < 1 *encourage* repetition.
* `max_new_tokens` defaults to None, meaning "up to the server's length limit".
* `best_of` defaults to `n` (and `n` to `best_of`); the two must be equal.
* `seed` is optional; `-1` (LightLLM v26's "no seed") is accepted and means unseeded.
* `stop` (TGI's name) is accepted as an alias of `stop_sequences`.
* Integers may be sent as integral floats (`17.0`); `1.5` or `true` is rejected.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_SEQUENCES = 16
MAX_STOP_LEN = 256  # characters for a string, ids for a token sequence
MAX_BEST_OF = 8
MAX_SEED = 2**63 - 1
MAX_ABS_FREQ_PRES = 2.0
GREEDY_TEMPERATURE = 1e-5  # do_sample with a temperature below this samples greedily

# Names LightLLM or TGI clients send that we do not implement: accepted and ignored.
IGNORED_PARAMS: frozenset[str] = frozenset(
    {
        "details",  # TGI: we always return the details the API defines
        "watermark",
        "truncate",
        "return_full_text",
        "decoder_input_details",
        "typical_p",
        "top_n_tokens",
        "grammar",  # TGI
        "adapter_id",  # TGI
        "regular_constraint",  # needs a grammar engine
        "guided_grammar",
        "guided_json",
        "allowed_token_ids",
        "image_max_patch_num",  # multimodal
        "max_time",
        "return_details",  # the server pops it; tolerated here
        "return_routed_experts",  # v26, popped by LightLLM's API layer
        "group_request_id",
        "suffix",
        "prompt_logprobs",  # v26, needs --enable_prompt_logprobs
        "logit_bias",  # v26 (treated there as a ban list)
    }
)

# Keys of generation_config.json used as defaults when the request omits them.
GEN_DEFAULT_KEYS: tuple[str, ...] = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
)


class ParamError(ValueError):
    """An invalid sampling parameter; `str(e)` names the field and the rule."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid parameter '{field}': {message}")
        self.field = field
        self.message = message


@dataclass
class SamplingParams:
    """Validated sampling parameters of one request (LightLLM §3.1, DESIGN.md)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    input_penalty: bool = False
    max_new_tokens: int | None = None  # None = up to the server's length limit
    min_new_tokens: int = 1
    ignore_eos: bool = False
    stop_strings: list[str] = field(default_factory=list)
    stop_token_seqs: list[list[int]] = field(default_factory=list)
    exponential_decay_length_penalty: tuple[int, float] = (1, 1.0)
    best_of: int = 1
    n: int = 1
    seed: int | None = None
    skip_special_tokens: bool = True
    add_special_tokens: bool = True
    add_spaces_between_special_tokens: bool = True
    print_eos_token: bool = False

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax."""
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """True when the repetition/frequency/presence penalties change any logit."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


# ---------------------------------------------------------------- value checkers


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ParamError(name, f"must be a boolean (true/false), got {v!r}")
    return v


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ParamError(name, f"must be an integer, got {v!r}")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise ParamError(name, f"must be an integer, got {v!r}")
        return int(v)
    return v


def _float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ParamError(name, f"must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ParamError(name, f"must be a finite number, got {v!r}")
    return f


def _temperature(v: Any) -> float:
    t = _float("temperature", v)
    if t <= 0.0:
        raise ParamError("temperature", f"must be > 0.0, got {t}")
    return t


def _top_p(v: Any) -> float:
    p = _float("top_p", v)
    if not 0.0 < p <= 1.0:
        raise ParamError("top_p", f"must be in (0.0, 1.0], got {p}")
    return p


def _top_k(v: Any) -> int:
    k = _int("top_k", v)
    if k != -1 and k < 1:
        raise ParamError("top_k", f"must be -1 (whole vocabulary) or >= 1, got {k}")
    return k


def _repetition(v: Any) -> float:
    r = _float("repetition_penalty", v)
    if r <= 0.0:
        raise ParamError("repetition_penalty", f"must be > 0.0 (1.0 = off), got {r}")
    return r


def _freq_pres(name: str) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        f = _float(name, v)
        if abs(f) > MAX_ABS_FREQ_PRES:
            raise ParamError(name, f"must be in [-2.0, 2.0], got {f}")
        return f

    return check


def _positive_int(name: str) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        i = _int(name, v)
        if i < 1:
            raise ParamError(name, f"must be >= 1, got {i}")
        return i

    return check


def _seed(v: Any) -> int | None:
    s = _int("seed", v)
    if s == -1:
        return None  # LightLLM v26's "no seed"
    if not 0 <= s <= MAX_SEED:
        raise ParamError("seed", f"must be in [0, 2**63 - 1] (or -1 for none), got {s}")
    return s


def _decay(v: Any) -> tuple[int, float]:
    name = "exponential_decay_length_penalty"
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise ParamError(name, f"must be a list [start, factor], got {v!r}")
    start = _int(name, v[0])
    factor = _float(name, v[1])
    if start < 0:
        raise ParamError(name, f"start must be >= 0, got {start}")
    if factor < 1.0:
        raise ParamError(name, f"factor must be >= 1.0, got {factor}")
    return (start, factor)


def _stops(name: str, v: Any) -> tuple[list[str], list[list[int]]]:
    """Normalise str | list[str | list[int]] into (strings, token sequences)."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list | tuple):
        raise ParamError(name, f"must be a string or a list of strings/token-id lists, got {v!r}")
    if len(items) > MAX_STOP_SEQUENCES:
        raise ParamError(name, f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(items)}")
    strings: list[str] = []
    seqs: list[list[int]] = []
    for item in items:
        if isinstance(item, str):
            if not item or len(item) > MAX_STOP_LEN:
                raise ParamError(name, f"each stop string must have 1..{MAX_STOP_LEN} characters")
            strings.append(item)
        elif isinstance(item, list | tuple):
            if not item or len(item) > MAX_STOP_LEN:
                raise ParamError(name, f"each stop token list must have 1..{MAX_STOP_LEN} ids")
            ids = []
            for t in item:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ParamError(name, f"token ids must be integers >= 0, got {t!r}")
                ids.append(t)
            seqs.append(ids)
        else:
            raise ParamError(
                name, f"each stop sequence must be a string or a list of token ids, got {item!r}"
            )
    return strings, seqs


_SIMPLE: dict[str, Callable[[Any], Any]] = {
    "do_sample": lambda v: _bool("do_sample", v),
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": _top_k,
    "repetition_penalty": _repetition,
    "frequency_penalty": _freq_pres("frequency_penalty"),
    "presence_penalty": _freq_pres("presence_penalty"),
    "input_penalty": lambda v: _bool("input_penalty", v),
    "max_new_tokens": _positive_int("max_new_tokens"),
    "min_new_tokens": _positive_int("min_new_tokens"),
    "ignore_eos": lambda v: _bool("ignore_eos", v),
    "exponential_decay_length_penalty": _decay,
    "best_of": _positive_int("best_of"),
    "n": _positive_int("n"),
    "seed": _seed,
    "skip_special_tokens": lambda v: _bool("skip_special_tokens", v),
    "add_special_tokens": lambda v: _bool("add_special_tokens", v),
    "add_spaces_between_special_tokens": lambda v: _bool("add_spaces_between_special_tokens", v),
    "print_eos_token": lambda v: _bool("print_eos_token", v),
}
STOP_NAMES: tuple[str, ...] = ("stop_sequences", "stop")  # "stop" is TGI's name
KNOWN_PARAMS: frozenset[str] = frozenset(_SIMPLE) | frozenset(STOP_NAMES)


def _gen_defaults(gen_defaults: Mapping[str, object]) -> dict[str, Any]:
    """The usable generation_config.json defaults; invalid ones fall back to ours."""
    out: dict[str, Any] = {}
    for key in GEN_DEFAULT_KEYS:
        v = gen_defaults.get(key)
        if v is None:
            continue
        if key == "top_k" and v == 0 and not isinstance(v, bool):
            v = -1  # HF: top_k=0 disables top-k
        try:
            out[key] = _SIMPLE[key](v)
        except ParamError:
            continue  # a bad model config must not make every request fail
    return out


def parse_sampling_params(
    parameters: dict[str, Any] | None, *, gen_defaults: Mapping[str, object] = {}
) -> SamplingParams:
    """Validate a LightLLM `parameters` dict; JSON null means "the default"."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise ParamError("parameters", f"must be a JSON object, got {type(parameters).__name__}")
    values: dict[str, Any] = _gen_defaults(gen_defaults)
    stop_value: tuple[str, Any] | None = None
    for name, raw in parameters.items():
        if not isinstance(name, str):
            raise ParamError(str(name), "parameter names must be strings")
        if name in IGNORED_PARAMS:
            continue
        if name not in KNOWN_PARAMS:
            hint = difflib.get_close_matches(name, sorted(KNOWN_PARAMS), n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ParamError(name, f"unknown parameter '{name}'{extra}")
        if raw is None:
            continue
        if name in STOP_NAMES:
            if stop_value is not None:
                raise ParamError(name, "give only one of 'stop_sequences' and 'stop'")
            stop_value = (name, raw)
            continue
        values[name] = _SIMPLE[name](raw)

    p = SamplingParams(**values)
    if stop_value is not None:
        p.stop_strings, p.stop_token_seqs = _stops(*stop_value)
    _check_cross_field(p, parameters)
    return p


def _check_cross_field(p: SamplingParams, given: dict[str, Any]) -> None:
    """Rules that involve several fields; fills n/best_of from each other."""
    if p.max_new_tokens is not None and p.min_new_tokens > p.max_new_tokens:
        raise ParamError(
            "min_new_tokens",
            f"must be <= max_new_tokens ({p.max_new_tokens}), got {p.min_new_tokens}",
        )
    has_n = given.get("n") is not None
    has_best_of = given.get("best_of") is not None
    if has_n and not has_best_of:
        p.best_of = p.n
    elif has_best_of and not has_n:
        p.n = p.best_of
    if p.best_of > MAX_BEST_OF:
        field_name = "best_of" if has_best_of else "n"
        raise ParamError(field_name, f"must be in [1, {MAX_BEST_OF}], got {p.best_of}")
    if p.n > p.best_of:
        raise ParamError("n", f"must be in [1, best_of={p.best_of}], got {p.n}")
    if p.n != p.best_of:
        raise ParamError("n", f"must equal best_of ({p.best_of}), got {p.n}")

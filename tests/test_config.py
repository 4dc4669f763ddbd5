"""The strict config tree: unknown keys and wrong types name their full path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import ConfigError
from pipelines.config import load_config, parse_config

MINIMAL = {"run": {"name": "t"}, "data": {"input": {"paths": ["x"]}}}


def test_quickstart_config_loads() -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / "quickstart.yaml")
    assert cfg.data is not None and cfg.data.dedup.threshold == 0.8


def test_unknown_key_names_its_path() -> None:
    bad = {**MINIMAL, "data": {"input": {"paths": ["x"]}, "dedup": {"treshold": 0.7}}}
    with pytest.raises(ConfigError, match=r"data\.dedup\.treshold: Extra inputs are not permitted"):
        parse_config(bad, "c.yaml")


def test_wrong_type_names_its_path_and_value() -> None:
    bad = {**MINIMAL, "data": {"input": {"paths": ["x"]}, "pack": {"seq_len": "long"}}}
    with pytest.raises(ConfigError, match=r"(?s)c.yaml: invalid config.*data\.pack\.seq_len: .*'long'"):
        parse_config(bad, "c.yaml")


def test_ranges_and_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match=r"data\.dedup\.threshold"):
        parse_config({**MINIMAL, "data": {"input": {"paths": ["x"]}, "dedup": {"threshold": 1.5}}})
    with pytest.raises(ConfigError, match="num_bands and rows_per_band are set together"):
        parse_config({**MINIMAL, "data": {"input": {"paths": ["x"]}, "dedup": {"num_bands": None}}})
    # Found in review: both were accepted, then failed (or did nothing) after Ray had started.
    with pytest.raises(ConfigError, match=r"pretrain\.seed: Input should be greater than or equal to 0"):
        parse_config({**MINIMAL, "pretrain": {"seed": -1}})
    ppo = {"prompts": "p.jsonl", "reward_function": "m:f", "kl_coef": 0.0, "kl_target": 0.1}
    with pytest.raises(ConfigError, match=r"ppo: .*kl_target adapts kl_coef by multiplying it"):
        parse_config({**MINIMAL, "ppo": ppo})
    ppo = {"prompts": "p.jsonl", "reward_function": "m:f", "max_prompt_tokens": 64, "max_response_tokens": 32,
           "rollout": {"engine": {"max_model_len": 80}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"rollout.engine.max_model_len \(80\) is shorter than max_prompt_tokens"):
        parse_config({**MINIMAL, "ppo": ppo})
    # Found in review: vLLM refused a long prompt mid-evaluation, and cut shorter ones' responses.
    with pytest.raises(ConfigError, match=r"eval: .*engine.max_model_len \(64\) is shorter than max_prompt_tokens"):
        parse_config({**MINIMAL, "eval": {"engine": {"max_model_len": 64}}})
    assert parse_config({**MINIMAL, "eval": {"engine": {"max_model_len": 160}}}).eval is not None


def test_rlhf_section_is_reward_model_only() -> None:
    rl = {"prompts": "p.jsonl", "advantage": "grpo"}
    with pytest.raises(ConfigError, match="rlhf.reward_model must be set and rlhf.reward_function null"):
        parse_config({**MINIMAL, "rlhf": {**rl, "reward_model": "rm", "reward_function": "m:f"}})
    with pytest.raises(ConfigError, match=r"(?s)rlhf.*give reward_model, reward_function or both"):
        parse_config({**MINIMAL, "rlhf": {**rl, "reward_function": None}})
    cfg = parse_config({**MINIMAL, "rlhf": {**rl, "reward_model": "rm", "reward_function": None}})
    assert cfg.rlhf is not None and cfg.stage_section("rlhf")[1].name == "rlhf"


def test_quickstart_rlhf_config_adds_only_rlhf() -> None:
    """configs/quickstart-rlhf.yaml is the quickstart plus RL on the reward model alone: after the
    quickstart it runs rlhf (after GRPO) and eval only."""
    from pipelines.cli import STAGES

    configs = Path(__file__).parents[1] / "configs"
    quickstart, with_rlhf = load_config(configs / "quickstart.yaml"), load_config(configs / "quickstart-rlhf.yaml")
    assert quickstart.rlhf is None and with_rlhf.rlhf is not None and with_rlhf.rlhf.reward_function is None
    assert with_rlhf.rlhf.reward_model == str(with_rlhf.run.dir / "reward_model" / "model")
    for section in STAGES:
        if section != "rlhf" and getattr(quickstart, section) is not None:
            assert quickstart.digest(section) == with_rlhf.digest(section), section
    order = list(STAGES)
    assert order.index("reward_model") < order.index("grpo") < order.index("rlhf") < order.index("eval")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_extends_lays_a_file_over_another(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "run: {name: base}\n"
        "data: {input: {paths: [a], text_field: body}, dedup: {threshold: 0.7}}\n"
        "eval: {samples_per_prompt: 4}\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\ndata: {dedup: {ngram: 3}}\n")
    (tmp_path / "sub" / "top.yaml").write_text("extends: mid.yaml\ndata: {input: {paths: [b]}}\neval: null\n")
    cfg = load_config(tmp_path / "sub" / "top.yaml")
    assert cfg.run.name == "base" and cfg.eval is None  # null drops a section it extends
    assert cfg.data is not None and cfg.data.input.paths == ["b"] and cfg.data.input.text_field == "body"
    assert (cfg.data.dedup.threshold, cfg.data.dedup.ngram) == (0.7, 3)  # mappings merge at every depth

    # Errors name the file and every file it extends; loops and a non-path are refused.
    (tmp_path / "bad.yaml").write_text("extends: base.yaml\ndata: {dedup: {treshold: 0.7}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml \(extends .*base\.yaml\).*\n.*data\.dedup\.treshold: Extra"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: extends a\.yaml makes a loop"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: [base.yaml]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: extends must be the path of another config file"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read config"):
        load_config(tmp_path / "d.yaml")


def test_digest_tracks_section_changes() -> None:
    a = parse_config(MINIMAL)
    b = parse_config({**MINIMAL, "data": {"input": {"paths": ["y"]}}})
    assert a.digest("data") == parse_config(MINIMAL).digest("data") != b.digest("data")


def test_eval_section_is_strict() -> None:
    cfg = parse_config({"run": {"name": "t"}, "eval": {}})
    assert cfg.eval is not None and cfg.eval.samples_per_prompt == 8 and cfg.eval.engine.dtype == "float32"
    with pytest.raises(ConfigError, match=r"eval\.samples_per_promt: Extra inputs are not permitted"):
        parse_config({"run": {"name": "t"}, "eval": {"samples_per_promt": 4}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"eval\.engine\.dtyp: Extra inputs are not permitted"):
        parse_config({"run": {"name": "t"}, "eval": {"engine": {"dtyp": "float32"}}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"eval\.metric_function: Value error, expected 'module:function'"):
        parse_config({"run": {"name": "t"}, "eval": {"metric_function": "no_colon"}}, "c.yaml")



@pytest.mark.parametrize("name", [".", "..", "..."])
def test_a_run_name_of_dots_is_refused(name: str) -> None:
    """"." made the run's folder the runs root (each stage folder another run's whole folder: the
    report stage replaced a run named "report"); ".." left the root."""
    with pytest.raises(ConfigError, match=rf"run\.name: Value error, '{re.escape(name)}' names no folder of its own"):
        parse_config({"run": {"name": name}}, "c.yaml")
    assert parse_config({"run": {"name": ".hidden.run"}}, "c.yaml").run.name == ".hidden.run"


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"root": "s3://bucket/runs"}, r"run\.root: Value error, run\.root is a folder on the machine the driver runs on"),
        ({"root": "~/runs"}, r"run\.root: Value error, '~' is not expanded in run\.root"),
        ({"storage_path": "~/ckpt"}, r"run\.storage_path: Value error, a local run\.storage_path must be an absolute"),
        ({"storage_path": "ckpt"}, r"run\.storage_path: Value error, a local run\.storage_path must be an absolute"),
    ],
)
def test_run_locations_kiln_and_ray_train_would_read_differently_are_refused(run: dict[str, str], message: str) -> None:
    """Path() folded s3://bucket/runs into a local folder "s3:"; Ray Train expands "~" in
    storage_path where kiln did not (so --force cleaned one folder and training resumed from
    another), and refuses a relative one only once training starts."""
    with pytest.raises(ConfigError, match=message):
        parse_config({"run": {"name": "t", **run}}, "c.yaml")
    ok = parse_config({"run": {"name": "t", "root": "runs", "storage_path": "/shared/ckpt"}}, "c.yaml")
    assert ok.run.dir == Path("runs/t") and ok.run.storage_path == "/shared/ckpt"


def test_kiln_run_serve_without_a_model_is_an_error_line_not_a_traceback(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"run:\n  name: t\n  root: {tmp_path / 'runs'}\n")
    assert main(["run", str(config), "--serve"]) == 1
    err = capsys.readouterr().err  # Ray's own lines too, when an earlier test started it in this process
    assert "Traceback" not in err, err
    assert any(line.startswith("kiln run: error: serve.model is not set and the run has no final model yet")
               for line in err.splitlines()), err


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    """The duplicate-key check leaves YAML's << merges alone (the quickstart's grpo section is one)."""
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: x\nppo: &rl\n  prompts: p.jsonl\n  reward_function: m:f\n  max_steps: 7\n"
                    "grpo:\n  <<: *rl\n  advantage: grpo\n  max_steps: 9\n")
    config = load_config(path)
    assert config.ppo.max_steps == 7 and config.grpo.max_steps == 9 and config.grpo.prompts == "p.jsonl"

def test_errors_name_the_file_and_line_that_wrote_the_key(tmp_path: Path) -> None:
    """A key path alone leaves the user to find it; in an extends chain, also the file it is in."""
    base = tmp_path / "base.yaml"
    base.write_text("run:\n  name: x\npretrain:\n  learning_rate: -1\n  model:\n    hidden_size: big\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nrun:\n  bogus: 1\ndata:\n  input:\n    format: auto\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{child} (extends {base}): invalid config (4 problem(s))"
    assert f"  {child}:3: run.bogus: Extra inputs are not permitted" in lines
    assert f"  {base}:4: pretrain.learning_rate: Input should be greater than 0 (got -1)" in lines
    assert f"  {base}:6: pretrain.model.hidden_size: Input should be a valid integer (got 'big')" in lines
    assert f"  {child}:5: data.input.paths: Field required" in lines  # missing: where its mapping is
    with pytest.raises(ConfigError, match=r"^<config>: invalid config .*\n  run\.name: Field required$"):
        parse_config({"run": {}})  # no file: the key path alone

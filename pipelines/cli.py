"""The ``kiln`` command line: one subcommand per stage, plus ``run`` for all of them in order."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from cluster.config import RayConfig
from cluster.runtime import configure_output, init_ray, ray_log_dir
from cluster.submit import SubmitError, job_env_vars, submit
from core.config import ConfigError, format_errors
from core.jsonl import read_jsonl
from core.rundir import StageConfigChanged, atomic_write_text
from pipelines.config import KilnConfig, dump_config, load_config
from pipelines.report import write_report
from serving.app import build_app
from serving.config import ServeConfig
from serving.server import serve_forever

# Each stage's driver is imported when its command runs: importing them all (torch, Ray Train,
# transformers, DeepSpeed) would cost seconds on every `kiln --help`.


def _generate(cfg: KilnConfig, force: bool) -> None:
    from pipelines.quickstart import generate as quickstart_data

    if cfg.generate is None:
        raise ConfigError("config has no 'generate' section")
    summary = quickstart_data.generate(cfg.generate)
    print(f"kiln generate: wrote {cfg.generate.out_dir}: {summary}")


def _data(cfg: KilnConfig, force: bool) -> None:
    from pipelines.data import stage as data

    data.run(cfg, force=force)


def _pretrain(cfg: KilnConfig, force: bool) -> None:
    from pipelines.train import pretrain

    pretrain.run(cfg, force=force)


def _sft(cfg: KilnConfig, force: bool) -> None:
    from pipelines.train import sft

    sft.run(cfg, force=force)


def _preferences(cfg: KilnConfig, force: bool) -> None:
    from pipelines.rlhf import preferences

    preferences.run(cfg, force=force)


def _reward_model(cfg: KilnConfig, force: bool) -> None:
    from pipelines.train import reward_model

    reward_model.run(cfg, force=force)


def _dpo(cfg: KilnConfig, force: bool) -> None:
    from pipelines.train import dpo

    dpo.run(cfg, force=force)


def _ppo(cfg: KilnConfig, force: bool) -> None:
    from pipelines.rlhf import ppo

    ppo.run(cfg, force=force)


def _grpo(cfg: KilnConfig, force: bool) -> None:
    from pipelines.rlhf import ppo

    ppo.run(cfg, force=force, stage="grpo")


def _rlhf(cfg: KilnConfig, force: bool) -> None:
    from pipelines.rlhf import ppo

    ppo.run(cfg, force=force, stage="rlhf")


def _eval(cfg: KilnConfig, force: bool, models: list[str] | None = None) -> None:
    from pipelines.eval import stage as evaluation

    evaluation.run(cfg, force=force, models=models)


# Stages in pipeline order; `kiln run` runs those whose section the config has.
STAGES: dict[str, Callable[[KilnConfig, bool], None]] = {
    "generate": _generate,
    "data": _data,
    "pretrain": _pretrain,
    "sft": _sft,
    "preferences": _preferences,
    "reward_model": _reward_model,
    "dpo": _dpo,
    "ppo": _ppo,
    "grpo": _grpo,
    "rlhf": _rlhf,
    "eval": _eval,
}


def _report(cfg: KilnConfig, force: bool) -> None:
    print(f"kiln report: wrote {write_report(cfg.run.dir)}")


def _first_prompt(cfg: KilnConfig) -> str:
    """A prompt to show the served model off: the first held-out PPO prompt, if there is one."""
    if cfg.ppo is not None and cfg.ppo.eval_prompts and Path(cfg.ppo.eval_prompts).is_file():
        prompt = next(read_jsonl(cfg.ppo.eval_prompts), (0, {}))[1].get("prompt")
        if isinstance(prompt, str):
            return prompt
    return "Hello! Who are you?"


# Stages whose output is a servable (generative) model, latest first.
_MODEL_STAGES = ("ppo", "sft", "pretrain")


def final_model_dir(cfg: KilnConfig) -> Path:
    """The run's model to serve: PPO's, else SFT's, else pretraining's (``<run>/<stage>/model``).
    GRPO's, RL on the reward model's and DPO's are served by naming them in ``serve.model``.

    Raises:
        ConfigError: no stage of the run has written a model yet.
    """
    for stage in _MODEL_STAGES:
        candidate = cfg.run.dir / stage / "model"
        if (candidate / "config.json").is_file():
            return candidate
    looked = ", ".join(str(cfg.run.dir / s / "model") for s in _MODEL_STAGES)
    raise ConfigError(f"serve.model is not set and the run has no final model yet (looked in {looked})")


def resolve_serve_target(target: Path) -> tuple[RayConfig, ServeConfig]:
    """Ray and serve settings for a model directory or a kiln config file."""
    if target.is_dir():
        return RayConfig(), ServeConfig(model=str(target))
    cfg = load_config(target)
    serve_cfg = cfg.serve or ServeConfig()
    if serve_cfg.model is None:
        serve_cfg = serve_cfg.model_copy(update={"model": str(final_model_dir(cfg))})
    return cfg.ray, serve_cfg


def adapter_flags(items: list[str], configured: dict[str, str]) -> dict[str, str]:
    """``--adapter name=dir ...`` added to the config's ``serve.adapters``.

    Raises:
        ConfigError: an item is not ``name=dir``, or its name is already taken; the message quotes it.
    """
    adapters = dict(configured)
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--adapter: {item!r} is not name=dir (e.g. ppo-lora=runs/x/ppo/model/adapter)")
        if name in adapters:
            raise ConfigError(f"--adapter: {item!r}: an adapter named {name!r} is already served")
        adapters[name] = directory
    return adapters


def _serve_target(target: Path, host: str | None = None, port: int | None = None, first_prompt: str | None = None,
                  adapters: list[str] | None = None, ingress: str | None = None) -> None:  # fmt: skip
    """Serve a model directory (or a config's ``serve:`` model) and its adapters until interrupted."""
    ray_cfg, cfg = resolve_serve_target(target)
    flags = {"host": host, "port": port, "ingress": ingress}
    overrides: dict[str, object] = {k: v for k, v in flags.items() if v is not None}
    if adapters:
        overrides["adapters"] = adapter_flags(adapters, cfg.adapters)
    if overrides:
        # Re-validate: an override is held to the same rules as the config file (and its
        # errors, like the file's, never show the API key).
        try:
            cfg = ServeConfig.model_validate({**cfg.model_dump(), **overrides})
        except ValidationError as e:
            raise ConfigError(format_errors(e, "kiln serve --host/--port/--ingress/--adapter", ServeConfig)) from None
    app = build_app(cfg)  # validates the model directory before anything starts
    init_ray(ray_cfg)
    serve_forever(app, cfg, first_prompt)


def _link_ray_logs(cfg: KilnConfig) -> None:
    """Point ``<run>/logs/ray`` at this Ray session's log directory (every worker's output)."""
    logs = ray_log_dir()
    if logs is None:
        return
    link = cfg.run.dir / "logs" / "ray"
    try:  # called on the way out of a failed stage too: it must not hide that stage's error
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():  # a real folder (a run copied with its logs): kept
            print(f"kiln: Ray worker logs (vLLM, DeepSpeed) in {logs} ({link} is a folder; left as it is)",
                  file=sys.stderr)  # fmt: skip
            return
        link.symlink_to(Path(logs).resolve(), target_is_directory=True)
    except OSError as e:
        print(f"kiln: Ray worker logs (vLLM, DeepSpeed) in {logs} (could not link {link}: {e.strerror})", file=sys.stderr)
        return
    print(f"kiln: Ray worker logs (vLLM, DeepSpeed) in {link}", file=sys.stderr)


def _save_config(cfg: KilnConfig) -> str | None:
    """Write the run's ``config.yaml`` (secrets redacted); returns what it held before (None: nothing)."""
    path = cfg.run.dir / "config.yaml"
    before = path.read_text(encoding="utf-8") if path.is_file() else None
    atomic_write_text(path, dump_config(cfg))
    return before


def _run_all(cfg: KilnConfig, force: bool) -> None:
    todo = [name for name in STAGES if getattr(cfg, name) is not None]
    print(f"kiln run: {cfg.run.dir} stages: {' -> '.join(todo)}")
    for name in todo:
        STAGES[name](cfg, force)
    _report(cfg, force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "generate": "write the deterministic quickstart corpus and task data",
        "data": "clean, deduplicate, tokenize and pack a corpus",
        "pretrain": "pretrain a base model on the packed shards (Ray Train + DeepSpeed)",
        "sft": "fine-tune on chat data, loss on response tokens only",
        "preferences": "sample the SFT model and pair its accepted and rejected answers (a label function judges)",
        "reward-model": "train a scalar reward model on preference pairs (Bradley-Terry)",
        "dpo": "direct preference optimisation of the SFT model on preference pairs (sigmoid, IPO or cDPO loss)",
        "ppo": "RLHF: PPO (or GRPO) with vLLM rollouts, reward, reference, critic and learner actors",
        "grpo": "a second RL run from the SFT model with GRPO (the grpo: section, written to <run>/grpo/)",
        "rlhf": "RL from the reward model alone, no programmatic reward (the rlhf: section, written to <run>/rlhf/)",
        "eval": "measure every stage's model on held-out prompts (accuracy with CIs, pass@k, reward, KL, perplexity)",
        "run": "every stage the config has, in order (finished stages are skipped), then the report",
        "report": "write <run>/report.md with PNG plots from what the stages wrote",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("config", type=Path, help="YAML config file")
        p.add_argument("--force", action="store_true", help="redo finished stages")
        p.add_argument("--verbose", action="store_true",
                       help="show Ray workers' output (vLLM, DeepSpeed) here too (it is always in <run>/logs/ray)")
    sub.choices["eval"].add_argument(
        "--models", nargs="+", action="extend", metavar="NAME=PATH",
        help="evaluate these Hugging Face model directories, in this order, instead of the run's stage models",
    )  # fmt: skip
    sub.choices["run"].add_argument("--serve", action="store_true", help="then serve the final model (Ctrl-C stops)")
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (Ray Serve + vLLM)")
    p.add_argument("target", type=Path, help="a Hugging Face model directory, or a config with a serve: section")
    p.add_argument("--host", help="interface to bind (overrides serve.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (overrides serve.port; default 8000)")
    p.add_argument("--ingress", choices=["proxy", "haproxy"],
                   help="what answers HTTP: Serve's proxy actor or its HAProxy ingress (overrides serve.ingress)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="also serve this PEFT LoRA adapter of the model as model NAME (repeatable; adds to serve.adapters)")
    p = sub.add_parser("submit", help="run `kiln run CONFIG` as a Ray job on a running cluster and follow its logs")
    p.add_argument("config", type=Path, help="YAML config file, inside the working directory")
    p.add_argument("--address", required=True,
                   help="the cluster's Ray dashboard: https://HEAD:8265, or http:// through a tunnel to 127.0.0.1")
    p.add_argument("--working-dir", type=Path, help="directory uploaded as the job's working directory (default: the kiln project)")
    p.add_argument("--no-follow", action="store_true", help="return once the job is submitted")
    p.add_argument("--insecure", action="store_true",
                   help="allow a plain http:// address to another machine (the Ray token travels unencrypted)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    try:
        _serve_target(args.target, host=args.host, port=args.port, adapters=args.adapter, ingress=args.ingress)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"kiln serve: error: {e}", file=sys.stderr)
        return 1
    return 0


def _submit(args: argparse.Namespace) -> int:
    try:
        return submit(args.config, args.address, working_dir=args.working_dir, follow=not args.no_follow,
                      insecure=args.insecure)
    except (ConfigError, SubmitError) as e:
        print(f"kiln submit: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "submit":
        return _submit(args)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 2
    saved_before = _save_config(cfg)
    configure_output(args.verbose)
    # DeepSpeed's accelerator follows the config (cuda when a section trains on GPUs), for this
    # process and, through init_ray's worker environment, for every Ray worker.
    os.environ.setdefault("DS_ACCELERATOR", job_env_vars(cfg)["DS_ACCELERATOR"])
    action = {"run": _run_all, "report": _report}.get(args.command) or STAGES[args.command.replace("-", "_")]
    if args.command == "eval":
        action = functools.partial(_eval, models=args.models)
    try:
        action(cfg, args.force)
    except (ConfigError, FileNotFoundError, ValueError, StageConfigChanged) as e:
        _link_ray_logs(cfg)
        # An error raised inside a Ray task arrives wrapped; the user needs the cause's message
        # (file and line), not the remote traceback.
        cause = getattr(e, "cause", None) or e
        print(f"kiln {args.command}: error: {cause}", file=sys.stderr)
        if isinstance(e, StageConfigChanged) and saved_before is not None:
            # Refused: the run's record stays the config its finished stages were made with.
            atomic_write_text(cfg.run.dir / "config.yaml", saved_before)
        return 1
    _link_ray_logs(cfg)
    if args.command == "run" and args.serve:
        try:
            _serve_target(args.config, first_prompt=_first_prompt(cfg))
        except (ConfigError, FileNotFoundError, ValueError) as e:  # as `kiln serve` says them
            print(f"kiln run: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

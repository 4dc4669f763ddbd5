"""The root of kiln's one typed config tree, loaded from YAML.

Each section lives beside the code that uses it and imports only the strict base
(``core.config.Section``); this module imports every section and hangs it on :class:`KilnConfig`.
Unknown keys and wrong types are rejected with the key's full path
(``data.dedup.threshold: Input should be a valid number``). Values are never silently rewritten;
cross-field rules (divisibility, ranges) are checked where they are defined.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cluster.config import RayConfig
from core.config import ConfigError, PathOrUri, Section, format_errors, redacted_dump
from core.locations import join
from pipelines.data.config import DataConfig
from pipelines.eval.config import EvalConfig
from pipelines.quickstart.config import GenerateConfig
from pipelines.rlhf.config import PpoConfig, PreferencesConfig
from pipelines.train.config import DpoConfig, PretrainConfig, RewardModelConfig, SftConfig
from serving.config import ServeConfig

__all__ = ["ConfigError", "KilnConfig", "RunConfig", "config_files", "dump_config", "load_config", "parse_config"]


class RunConfig(Section):
    """Where a run writes. All stages of one run share ``<root>/<name>/``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    root: str = "runs"
    # Shared storage for checkpoints: a path every node mounts, or an object-store URI
    # (s3://bucket/kiln). Required on multi-node clusters, where a node's local disk is not seen
    # by the others (``kiln submit`` refuses a remote cluster without it); null: under root.
    storage_path: PathOrUri | None = None

    @field_validator("root")
    @classmethod
    def _local_root(cls, root: str) -> str:
        # Path() would fold s3://bucket/runs into a local folder named "s3:"; "~" is not expanded.
        if "://" in root:
            raise ValueError("run.root is a folder on the machine the driver runs on (on a cluster: a shared "
                             "mount); object storage (s3://, gs://) goes in run.storage_path")  # fmt: skip
        if root.startswith("~"):
            raise ValueError("'~' is not expanded in run.root; give the folder's absolute path (or a relative one)")
        return root

    @field_validator("storage_path")
    @classmethod
    def _absolute_storage(cls, path: str | None) -> str | None:
        # Ray Train expands "~" and refuses a relative path; kiln would clean up and write elsewhere.
        if path is not None and "://" not in path and not os.path.isabs(path):
            raise ValueError("a local run.storage_path must be an absolute path (with no '~'), the same on every "
                             "node, or a URI such as s3://bucket/kiln")  # fmt: skip
        return path

    @field_validator("name")
    @classmethod
    def _not_dots(cls, name: str) -> str:
        # "." would make the run's folder the root itself, each stage folder another run's whole
        # folder (a run named "report" lost to the report); ".." would leave the root.
        if set(name) == {"."}:
            raise ValueError(f"{name!r} names no folder of its own; use letters or digits")
        return name

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name

    def stage_storage(self, stage: str) -> str | None:
        """Ray Train storage of one stage's checkpoints: ``<storage_path>/<name>/<stage>``, or None."""
        if self.storage_path is None:
            return None
        return join(self.storage_path, self.name, stage)  # a URI's query stays at its end


class KilnConfig(Section):
    """The root of the tree: one file describes a whole run."""

    run: RunConfig
    ray: RayConfig = RayConfig()
    generate: GenerateConfig | None = None
    data: DataConfig | None = None
    pretrain: PretrainConfig | None = None
    sft: SftConfig | None = None
    # Preference pairs of the SFT model's own answers, labelled by a function (written to <run>/preferences/).
    preferences: PreferencesConfig | None = None
    reward_model: RewardModelConfig | None = None
    # Direct preference optimisation of the SFT model on the reward model's pairs (written to <run>/dpo/).
    dpo: DpoConfig | None = None
    ppo: PpoConfig | None = None
    # A second RL run from the same SFT model with GRPO (the same schema as ppo; written to <run>/grpo/).
    grpo: PpoConfig | None = None
    # RL from the reward model alone, as RLHF was first described: no programmatic reward
    # (the same schema as ppo; written to <run>/rlhf/).
    rlhf: PpoConfig | None = None
    eval: EvalConfig | None = None
    serve: ServeConfig | None = None

    @model_validator(mode="after")
    def _grpo_is_grpo(self) -> "KilnConfig":
        if self.grpo is not None and self.grpo.advantage != "grpo":
            raise ValueError("grpo.advantage must be grpo (the grpo section is the GRPO run; PPO goes in ppo)")
        return self

    @model_validator(mode="after")
    def _rlhf_is_reward_model_only(self) -> "KilnConfig":
        if self.rlhf is not None and (self.rlhf.reward_model is None or self.rlhf.reward_function is not None):
            raise ValueError("rlhf.reward_model must be set and rlhf.reward_function null (the rlhf section is RL "
                             "from the reward model alone; a programmatic reward goes in ppo or grpo)")
        return self

    def stage_section(self, stage: str) -> tuple[Any, Path, str]:
        """A stage's section, its absolute run-directory folder and its config digest.

        Raises:
            ValueError: the config has no section for ``stage``.
        """
        section = getattr(self, stage)
        if section is None:
            raise ValueError(f"config has no '{stage}' section")
        return section, (self.run.dir / stage).resolve(), self.digest(stage)

    def digest(self, section: str) -> str:
        """A stable hash of one section, recorded with a finished stage to detect config drift."""
        payload = json.dumps(getattr(self, section).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_config(data: Any, source: str = "<config>", files: list[Path] | None = None) -> KilnConfig:
    """Validate a plain mapping (as loaded from YAML) into the typed tree.

    Raises:
        ConfigError: naming ``source`` and each offending key's path, and where ``files`` (the
            YAML it was read from, the file itself first) wrote it, as ``file:line``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return KilnConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, KilnConfig, _locator(files) if files else None)) from None


def _locator(files: list[Path]) -> Callable[[tuple[Any, ...]], str | None]:
    """``file:line`` of the deepest part of a key's path that one of ``files`` writes (on a tie the
    earlier file: it overrides the ones it extends). Each file is parsed again only on an error."""
    tables: dict[Path, dict[tuple[Any, ...], int]] = {}

    def locate(loc: tuple[Any, ...]) -> str | None:
        best: tuple[int, Path, int] | None = None
        for file in files:
            table = tables.setdefault(file, _key_lines(file))
            depth = next((d for d in range(len(loc), 0, -1) if loc[:d] in table), 0)
            if depth and (best is None or depth > best[0]):
                best = (depth, file, table[loc[:depth]])
        return f"{best[1]}:{best[2]}" if best else None

    return locate


def _key_lines(path: Path) -> dict[tuple[Any, ...], int]:
    """The line of every mapping key and list item of a YAML file, by its path in the tree."""
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[Any, ...]) -> None:
        items: list[tuple[Any, yaml.Node, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):  # a << merge's keys are found where they were written
            items = [(k.value, k, v) for k, v in node.value
                     if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"]  # fmt: skip
        elif isinstance(node, yaml.SequenceNode):
            items = [(i, v, v) for i, v in enumerate(node.value)]
        for key, mark_node, value in items:
            lines[(*prefix, key)] = mark_node.start_mark.line + 1
            walk(value, (*prefix, key))

    try:
        walk(yaml.compose(path.read_text(encoding="utf-8"), Loader=_Loader), ())
    except (OSError, ValueError, yaml.YAMLError):
        pass  # read and parsed once already; no lines is no worse than before
    return lines


def load_config(path: str | Path) -> KilnConfig:
    """Read and validate a YAML config file.

    A file may start from another: ``extends: quickstart.yaml`` (a path relative to the file) reads
    that file first and lays this one over it, mapping by mapping; any other value (a list, a
    number, ``null`` to drop a section) replaces the one it extends. Chains are allowed, cycles not.

    Raises:
        ConfigError: a file is missing, is not YAML, or the result does not match the tree.
    """
    path = Path(path)
    chain = _config_chain(path)
    data = chain[-1][1]
    for _, child in reversed(chain[:-1]):
        data = _overlay(data, child)
    if isinstance(data, dict):
        data.pop("extends", None)
    files = [f for f, _ in chain]
    source = str(path) if len(files) == 1 else f"{path} (extends {', '.join(str(f) for f in files[1:])})"
    return parse_config(data, source, files)


def config_files(path: str | Path) -> list[Path]:
    """The config file and, in order, every file it extends (``extends:``).

    Raises:
        ConfigError: a file is unreadable or not YAML, ``extends`` is not a path, or the chain loops.
    """
    return [f for f, _ in _config_chain(Path(path))]


def _config_chain(path: Path) -> list[tuple[Path, Any]]:
    """Each file of the ``extends`` chain with its parsed YAML, each read once."""
    chain = [(path, _read_yaml(path))]
    while True:
        last, data = chain[-1]
        parent = data.get("extends") if isinstance(data, dict) else None
        if parent is None:
            return chain
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{last}: extends must be the path of another config file, got {parent!r}")
        nxt = last.parent / parent
        files = [f for f, _ in chain]
        if nxt.resolve() in {f.resolve() for f in files}:
            raise ConfigError(f"{last}: extends {parent} makes a loop: {' -> '.join(str(f) for f in [*files, nxt])}")
        chain.append((nxt, _read_yaml(nxt)))


class _Loader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (the second replaced the first
    without a word: a second ``serve:`` block dropped the first one's ``api_key``). Keys that a
    ``<<`` merge brings in may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the constructor below names it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"key {key!r} given twice", key_node.start_mark)  # fmt: skip
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as e:
        # A tag's own constructor failing (``!!int sk-...``): its message quotes the value, which
        # may be a secret, and names no line. Only the kind of failure is shown.
        raise ConfigError(f"{path}: not valid YAML: a tagged value that is not of its tag's form, "
                          f"or nesting too deep ({type(e).__name__})") from None  # fmt: skip
    except yaml.YAMLError as e:
        # The problem and its position, not yaml's whole message: that quotes the offending line,
        # which may hold a secret.
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = ": ".join(p for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
        raise ConfigError(f"{path}{where}: not valid YAML: {what or type(e).__name__}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _overlay(base: Any, top: Any) -> Any:
    """``top`` laid over ``base``: mappings merge key by key (recursively), anything else replaces."""
    if not isinstance(base, dict) or not isinstance(top, dict):
        return top
    merged = {**base}
    for key, value in top.items():
        merged[key] = _overlay(base[key], value) if key in base else value
    return merged


def dump_config(config: KilnConfig) -> str:
    """The config as YAML, every default made explicit and every secret (``serve.api_key``)
    replaced by ``***``: what is saved into the run directory."""
    return yaml.safe_dump(redacted_dump(config), sort_keys=False)

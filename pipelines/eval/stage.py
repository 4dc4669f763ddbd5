"""``kiln eval CONFIG [--models name=path ...]``: every stage's model on the same held-out prompts,
each number with its uncertainty, and paired tests between consecutive stages.

Read top to bottom:

  0. inputs — the models (the run's ``base``, ``sft``, ``ppo``, ``grpo``, ``rlhf``, ``dpo`` that exist, or
     ``--models``), the prompts, metric and reward functions, reward model and preference pairs:
     all checked before any actor starts;
  1. actors — ``num_replicas`` vLLM generators sharing the prompts (``pipelines.eval.generation``),
     reused across models of one architecture, and with a reward model PPO's own ``RewardScorer`` (the scores PPO trained on);
  2. per model — the generator answers every prompt greedily and samples k responses to each;
     meanwhile this controller grades the previous model: metric and reward functions on the
     responses, the reward model's score, log-probs under the model and the reference (KL), and
     perplexity on the validation sequences pretraining read (pretrain.shards, else the data stage's);
  3. statistics — Wilson and t intervals, pass@k, McNemar's exact test between consecutive
     stages, the reward model's pairwise accuracy (``pipelines.eval.summary``, ``stats``);
  4. outputs — ``eval/summary.json``; ``eval/responses.jsonl`` (per model and prompt: the greedy
     response and its grade, the k samples and how many are right, reward, RM score); ``stage.json``;
     a table on stdout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from transformers import PreTrainedModel

from actors.reward import RewardScorer, load_function
from cluster.runtime import init_ray
from core.config import ConfigError
from core.jsonl import json_safe
from core.rundir import (
    STAGE_MARKER,
    StageConfigChanged,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    finished_summary,
    input_stamps,
    mark_finished,
    run_key,
    stamp,
    unmark,
)
from pipelines.config import KilnConfig
from pipelines.data.storage import shard_files
from pipelines.data.tokenizer import load_tokenizer
from pipelines.eval.config import EvalConfig
from pipelines.eval.generation import GeneratorPool, Responses, engine_key, merge, sample_seeds
from pipelines.eval.inputs import (
    STAGE_MODELS,
    Target,
    parse_models,
    pretraining_data,
    read_preferences,
    stage_models,
    validation_sequences,
)
from pipelines.eval.scoring import grade, load_causal_lm, perplexity, response_logprobs, reward
from pipelines.eval.summary import ModelScores, comparison, comparison_pairs, model_entry, pairwise_entry
from pipelines.eval.table import format_table
from pipelines.rlhf.config import PpoConfig
from pipelines.rlhf.prompts import PromptRecord, prompt_ids, read_prompts
from pipelines.train.modeling import check_model_dir, check_reward_model, model_config

STAGE = "eval"
# The reward scorer runs one small forward pass per model: a quarter CPU keeps it beside the
# generator on a 2-CPU machine.
SCORER_CPUS = 0.25


# --- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The ``eval:`` inputs with their fallbacks resolved (to ``ppo:``, to the run directory)."""

    prompts: Path
    metric_function: str | None
    reward_function: str | None
    reward_model: Path | None
    preferences: Path | None


def resolve_inputs(cfg: KilnConfig) -> Inputs:
    """``eval:``'s inputs, unset ones taken from ``ppo:`` and ``<run>/reward_model/model``.

    Raises:
        ConfigError: no prompts file is set in ``eval:`` or ``ppo:``.
        FileNotFoundError: an explicitly set reward model is not a model directory.
    """
    e, p = cfg.eval, cfg.ppo
    assert e is not None
    prompts = e.prompts or (p.eval_prompts if p else None)
    if prompts is None:
        raise ConfigError("eval.prompts is not set and there is no ppo.eval_prompts to fall back on")
    if e.reward_model is not None:
        reward_model: Path | None = check_reward_model(check_model_dir(Path(e.reward_model).resolve()),
                                                       "eval.reward_model")  # fmt: skip
    else:
        default = (cfg.run.dir / "reward_model" / "model").resolve()
        reward_model = default if (default / "config.json").is_file() else None
    return Inputs(
        prompts=Path(prompts),
        metric_function=e.metric_function or (p.metric_function if p else None),
        reward_function=e.reward_function or (p.reward_function if p else None),
        reward_model=reward_model,
        preferences=Path(e.preferences) if e.preferences else None,
    )


def _mtime_stamp(model_dir: Path) -> int:
    """The newest modification time of a model's config and weights: the models' stamp in the
    digest kiln wrote before it was portable (``eval_digest(portable=False)``)."""
    files = [model_dir / "config.json", *model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")]
    return max(f.stat().st_mtime_ns for f in files if f.is_file())


def function_source(spec: str) -> Path | None:
    """The source file of a ``module:function``'s module (None: none on disk, e.g. a built-in)."""
    found = importlib.util.find_spec(spec.split(":")[0])
    return Path(found.origin) if found is not None and found.origin and Path(found.origin).is_file() else None


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def eval_digest(cfg: KilnConfig, inputs: Inputs, targets: list[Target], custom: bool, portable: bool = True) -> str:
    """What makes a finished evaluation stale, as ``<set-up>-<models>-<data>``: the set-up is the
    ``eval:`` section, the resolved inputs and whether the models were given (``--models``) or are
    the run's stage models; the models part is each model's name, directory and stamp, and the
    reward model's; the data part is what the prompts file, the preference pairs, the metric and
    reward functions' source files, pretraining's validation shards and their tokenizer hold
    (``core.rundir.stamp``).

    Paths inside the run directory are written by their place there (``core.rundir.run_key``) and
    models stamped like any input (by content up to 64 MiB), so a run directory moved or copied
    elsewhere keeps its evaluation. ``portable=False``: the digest kiln wrote before (absolute
    paths, the weights' modification times), which an older run directory's record holds."""
    where: Callable[[Path], str] = (lambda p: run_key(cfg.run.dir, str(p))) if portable else str
    model_stamp: Callable[[Path], Any] = stamp if portable else _mtime_stamp
    setup = {
        "eval": cfg.digest(STAGE),
        "inputs": {k: where(v) if v is not None else None for k, v in vars(inputs).items()},
        "custom": custom,
    }
    models = {
        "reward_model": model_stamp(inputs.reward_model) if inputs.reward_model else None,
        "models": [[t.name, where(t.path), model_stamp(t.path)] for t in targets],
    }
    # The metric and reward functions' source: a fixed grader makes the old grades stale.
    code = [function_source(f) for f in (inputs.metric_function, inputs.reward_function) if f] if portable else []
    shards, vocabulary = pretraining_data(cfg)  # the validation shards and the tokenizer they were written with
    tokenizer = [vocabulary / "tokenizer.json"] if portable else []
    files = [inputs.prompts, inputs.preferences, *code, *tokenizer, *shard_files(shards, "validation")]
    data = input_stamps(str(f) for f in files if f is not None)
    if portable:
        data = {where(Path(f)): s for f, s in data.items()}
    return f"{_hash(setup)}-{_hash(models)}-{_hash(data)}"


def _adopt_older_record(stage_dir: Path, digest: str, older: Callable[[], str]) -> None:
    """A finished evaluation recorded under ``older()``, the digest kiln wrote before it was
    portable (``eval_digest(portable=False)``) for this very set-up, models and data: re-keyed to
    ``digest`` in place, so that upgrading kiln neither refuses nor redoes it. ``older`` (which
    stamps the inputs again) is computed only when the record holds another digest."""
    marker = stage_dir / STAGE_MARKER
    if not marker.exists():
        return
    try:
        info = json.loads(marker.read_bytes())
    except ValueError:
        return  # finished_summary names an unreadable record
    recorded = info.get("config_digest") if isinstance(info, dict) else None
    if recorded is not None and recorded != digest and recorded == older():
        atomic_write_json(marker, {**info, "config_digest": digest})


def _redo_without_force(stage_dir: Path, digest: str, custom: bool) -> bool:
    """Whether a stale finished evaluation is redone without ``--force``: its set-up is the same
    and only the data changed (an edited prompts file, new validation shards), or the run's own
    stage models changed (a stage added, e.g. by a config that extends this one, or a model
    retrained). Another set-up, or another ``--models`` list, needs ``--force``."""
    recorded = str(json.loads((stage_dir / STAGE_MARKER).read_text()).get("config_digest", "")).split("-")
    setup, models = digest.split("-")[:2]
    return recorded[0] == setup and (not custom or recorded[1:2] == [models])


def _same_vocabulary(a: Path, b: Path) -> bool:
    """Whether two tokenizer directories share ``tokenizer.json`` (so token ids mean the same)."""
    mine, theirs = a / "tokenizer.json", b / "tokenizer.json"
    return mine.is_file() and theirs.is_file() and mine.read_bytes() == theirs.read_bytes()


# --- actors ----------------------------------------------------------------------------------------


def start_generators(e: EvalConfig, model_dir: Path, max_model_len: int) -> GeneratorPool:
    """``e.num_replicas`` new vLLM generator actors for ``model_dir``'s architecture, engines in-process."""
    return GeneratorPool(model_dir, e.engine, max_model_len, e.num_cpus, e.num_gpus, e.num_replicas)


def start_scorer(reward_model: Path, prompts: Path) -> Any:
    """PPO's reward scorer over ``reward_model`` alone, so its scores are the ones PPO trained on.

    ``RewardScorer`` is built from a ``ppo:`` section; this one has the reward model with weight 1
    and no reward function, so ``Scores.model`` is the model's raw score.
    """
    section = PpoConfig(prompts=str(prompts), reward_model=str(reward_model))
    return RewardScorer.options(num_cpus=SCORER_CPUS).remote(section, str(reward_model))


@dataclass
class Generation:
    """One model's pending responses: greedy (one per prompt) and sampled (k per prompt), each as
    one ref per engine's shard of the prompts."""

    engine: str  # "started" or "reloaded"
    loads: list[ray.ObjectRef]
    greedy: list[ray.ObjectRef]
    sampled: list[ray.ObjectRef]

    def get(self) -> tuple[Responses, Responses]:
        """Wait for the responses. A failed in-place load raises here, never yields the old model's."""
        ray.get(self.loads)
        return merge(ray.get(self.greedy)), merge(ray.get(self.sampled))


class Generators:
    """The live engines: kept (weights loaded in place) while consecutive models share an
    ``engine_key``, replaced by new actors when the key changes."""

    def __init__(self, e: EvalConfig, max_model_len: int) -> None:
        self.e, self.max_model_len = e, max_model_len
        self.pool: GeneratorPool | None = None
        self.key: str | None = None

    def submit(self, target: Target, ids: list[list[int]]) -> Generation:
        """Queue ``target``'s greedy and sampled responses; returns at once."""
        e, key = self.e, engine_key(target.path)
        loads = []
        if self.pool is not None and key == self.key:
            loads, engine = self.pool.load_weights(target.path), "reloaded"
        else:
            self.close()
            self.pool, self.key, engine = start_generators(e, target.path, self.max_model_len), key, "started"
        n, positions = e.samples_per_prompt, range(len(ids))
        greedy = self.pool.submit(ids, 1, 0.0, e.max_response_tokens, sample_seeds(e.seed, positions, 1))
        sampled = self.pool.submit(ids, n, e.temperature, e.max_response_tokens, sample_seeds(e.seed, positions, n))
        return Generation(engine, loads, greedy, sampled)

    def close(self) -> None:
        """Kill the live engines (each goes with its actor's process), if there are any."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None


# --- grading one model -----------------------------------------------------------------------------


@dataclass
class Context:
    """What every model is graded with."""

    e: EvalConfig
    inputs: Inputs
    prompts: list[PromptRecord]
    metric: Callable[..., Any] | None
    reward_fn: Callable[..., Any] | None
    scorer: Any  # the RewardScorer actor, or None
    reference: Target | None
    reference_model: PreTrainedModel | None
    sequences: np.ndarray | None  # (N, L) validation token ids
    run_vocabulary: Path | None  # the tokenizer the validation shards were written with


def grade_model(ctx: Context, t: Target, ids: list[list[int]], greedy: Responses, sampled: Responses,
                engine: str) -> tuple[ModelScores, list[dict[str, Any]]]:  # fmt: skip
    """Every measurement of one model, and its responses.jsonl rows."""
    e, prompts, k = ctx.e, ctx.prompts, ctx.e.samples_per_prompt
    texts = [r[0] for r in greedy.texts]
    # The reward model scores in its actor while the functions and log-probs run here.
    rm_ref = None
    if ctx.scorer is not None:
        rm_ref = ctx.scorer.score.remote([q.prompt for q in prompts], texts, [q.fields for q in prompts])
    correct, sampled_correct, rewards = None, None, None
    if ctx.metric is not None:
        spec = ctx.inputs.metric_function
        limit = e.function_timeout_s
        correct = [grade(ctx.metric, spec, q, text, limit) for q, text in zip(prompts, texts)]
        sampled_correct = [
            sum(grade(ctx.metric, spec, q, s, limit) for s in samples) for q, samples in zip(prompts, sampled.texts)
        ]
    if ctx.reward_fn is not None:
        rewards = [reward(ctx.reward_fn, ctx.inputs.reward_function, q, text, e.function_timeout_s)
                   for q, text in zip(prompts, texts)]  # fmt: skip

    # KL(model || reference), k1 per response: sum_t log p_model(y_t) - log p_ref(y_t) on the model's
    # own samples, averaged per prompt. 0 by definition for the reference itself.
    model, kl = None, None
    if ctx.reference is not None and _same_vocabulary(t.path, ctx.reference.path):
        if t.name == ctx.reference.name:
            kl = [0.0] * len(prompts)
        else:
            model = load_causal_lm(t.path)
            flat_prompts = [p for p, samples in zip(ids, sampled.token_ids) for _ in samples]
            flat_responses = [r for samples in sampled.token_ids for r in samples]
            own = response_logprobs(model, flat_prompts, flat_responses, e.temperature)
            ref = response_logprobs(ctx.reference_model, flat_prompts, flat_responses, e.temperature)
            kl = (own - ref).view(len(prompts), k).mean(1).tolist()  # (P,)

    # Perplexity only where the validation token ids mean the same to the model.
    ppl = None
    if ctx.sequences is not None and (ctx.run_vocabulary is None or _same_vocabulary(t.path, ctx.run_vocabulary)):
        if model is None:
            model = ctx.reference_model if ctx.reference and t.name == ctx.reference.name else load_causal_lm(t.path)
        ppl = perplexity(model, ctx.sequences)

    rm_scores = ray.get(rm_ref).model.tolist() if rm_ref is not None else None
    scores = ModelScores(
        t.name, str(t.path), len(prompts), correct, sampled_correct, k, rewards, rm_scores, kl, ppl, engine
    )

    def at(values: list[Any] | None, i: int) -> Any:
        return values[i] if values is not None else None

    rows = [
        {"model": t.name, "index": i, "where": q.where, "prompt": q.prompt, "fields": q.fields, "response": texts[i],
         "correct": at(correct, i), "sampled_correct": at(sampled_correct, i), "k": k, "reward": at(rewards, i),
         "rm_score": at(rm_scores, i), "samples": sampled.texts[i]}
        for i, q in enumerate(prompts)
    ]  # fmt: skip
    return scores, rows


def measure(ctx: Context, targets: list[Target], ids_by_model: dict[str, list[list[int]]],
            max_model_len: int) -> tuple[list[ModelScores], list[dict[str, Any]]]:  # fmt: skip
    """Generate for each model in turn and grade it while the generator works on the next one."""
    generators = Generators(ctx.e, max_model_len)
    scores, rows = [], []
    try:
        pending = generators.submit(targets[0], ids_by_model[targets[0].name])
        for i, t in enumerate(targets):
            greedy, sampled = pending.get()
            engine = pending.engine
            if i + 1 < len(targets):
                pending = generators.submit(targets[i + 1], ids_by_model[targets[i + 1].name])
            s, r = grade_model(ctx, t, ids_by_model[t.name], greedy, sampled, engine)
            scores.append(s)
            rows += r
            print(f"kiln eval: {t.name} measured ({engine} engine)", flush=True)
    finally:
        generators.close()
    return scores, rows


# --- the stage -------------------------------------------------------------------------------------


def run(cfg: KilnConfig, force: bool = False, models: list[str] | None = None) -> dict[str, Any]:
    """Evaluate (or skip if finished with the same config and models); returns the stage summary.

    Args:
        cfg: the run's config; needs an ``eval:`` section.
        force: evaluate again even if finished.
        models: ``name=path`` items (``--models``) replacing the run's stage models.
    """
    if cfg.eval is None:
        raise ConfigError("config has no 'eval' section (`eval: {}` evaluates with the defaults)")
    e = cfg.eval
    stage_dir = (cfg.run.dir / STAGE).resolve()

    # 0. Inputs, every one checked before any actor starts.
    targets = parse_models(models) if models is not None else stage_models(cfg.run.dir)
    if not targets:
        looked = ", ".join(str(cfg.run.dir / folder / "model") for _, folder in STAGE_MODELS)
        raise FileNotFoundError(f"no model to evaluate: none of {looked} exists (or pass --models name=path)")
    for t in targets:
        check_model_dir(t.path)
    inputs = resolve_inputs(cfg)
    prompts = read_prompts(inputs.prompts)
    pairs = read_preferences(inputs.preferences) if inputs.preferences else []
    metric = load_function(inputs.metric_function) if inputs.metric_function else None
    reward_fn = load_function(inputs.reward_function) if inputs.reward_function else None
    max_model_len = e.engine.max_model_len or e.max_prompt_tokens + e.max_response_tokens
    for t in targets:
        positions = model_config(t.path).get("max_position_embeddings", max_model_len)
        if max_model_len > positions:
            raise ValueError(f"eval: a context of {max_model_len} tokens (max_prompt_tokens + max_response_tokens) "
                             f"exceeds {t.name}'s max_position_embeddings ({positions}) in {t.path}")  # fmt: skip
    # Each model reads the prompts with its own tokenizer; a prompt too long for any of them is left
    # out for all, so that every model answers the same prompts (McNemar's test pairs them).
    ids_by_model = {t.name: prompt_ids(load_tokenizer(t.path), prompts) for t in targets}
    keep = [i for i in range(len(prompts)) if all(len(ids[i]) <= e.max_prompt_tokens for ids in ids_by_model.values())]
    if not keep:
        raise ValueError(
            f"eval: every prompt of {inputs.prompts} is longer than max_prompt_tokens ({e.max_prompt_tokens})"
        )
    skipped = len(prompts) - len(keep)
    prompts = [prompts[i] for i in keep]
    ids_by_model = {name: [ids[i] for i in keep] for name, ids in ids_by_model.items()}
    custom = models is not None
    digest = eval_digest(cfg, inputs, targets, custom)
    if not force:
        _adopt_older_record(stage_dir, digest, lambda: eval_digest(cfg, inputs, targets, custom, portable=False))
    try:
        if (done := finished_summary(stage_dir, STAGE, digest, force)) is not None:
            return done
    except StageConfigChanged:
        # The run's own models changed under the same set-up: their evaluation is redone (it is
        # derived from the models alone); another set-up or model list needs --force.
        if _redo_without_force(stage_dir, digest, custom):
            print(f"kiln eval: the models or the data changed since {stage_dir} was written (a stage added, a "
                  "model retrained, a prompts or data file edited); evaluating again", flush=True)  # fmt: skip
            unmark(stage_dir)  # as --force: an evaluation that fails now leaves no finished stale one
        else:
            raise StageConfigChanged(
                f"{stage_dir} holds an evaluation of other models (another --models list) or under another eval "
                f"config; rerun with --force to evaluate again"
            ) from None
    if pairs and inputs.reward_model is None:
        print(f"kiln eval: no reward model; the pairs of {inputs.preferences} are not scored", flush=True)
    if all(t.name != e.reference for t in targets):
        print(f"kiln eval: the KL reference {e.reference!r} is not among the models; no KL is measured", flush=True)
    print(f"kiln eval: {', '.join(t.name for t in targets)} on {len(prompts)} prompts of {inputs.prompts} "
          f"({skipped} over max_prompt_tokens left out), {e.samples_per_prompt} samples each", flush=True)  # fmt: skip

    # 1. Actors, torn down however the evaluation ends.
    shards, vocabulary = pretraining_data(cfg)
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    scorer = start_scorer(inputs.reward_model, inputs.prompts) if inputs.reward_model else None
    try:
        pair_refs = (
            [scorer.score.remote([p.prompt for p in pairs], [getattr(p, side) for p in pairs], [{}] * len(pairs))
             for side in ("chosen", "rejected")]
            if scorer and pairs else []
        )  # fmt: skip
        reference = next((t for t in targets if t.name == e.reference), None)
        ctx = Context(
            e=e, inputs=inputs, prompts=prompts, metric=metric, reward_fn=reward_fn, scorer=scorer,
            reference=reference, reference_model=load_causal_lm(reference.path) if reference else None,
            sequences=validation_sequences(shards, e.perplexity_sequences),
            run_vocabulary=vocabulary if vocabulary.is_dir() else None,
        )  # fmt: skip
        # 2. Every model, in order.
        scores, rows = measure(ctx, targets, ids_by_model, max_model_len)
        chosen, rejected = [ray.get(ref).model.tolist() for ref in pair_refs] if pair_refs else ([], [])
    finally:
        if scorer is not None:
            ray.kill(scorer)

    # 3. Statistics.
    by_name = {s.name: s for s in scores}
    comparisons = (
        [comparison(by_name[a], by_name[b]) for a, b in comparison_pairs(list(by_name), custom=models is not None)]
        if metric else []
    )  # fmt: skip
    reward_model = None
    if inputs.reward_model is not None:
        reward_model = {"path": str(inputs.reward_model), "preferences": str(inputs.preferences) if pairs else None,
                        **pairwise_entry(chosen, rejected, [p.same_format for p in pairs])}  # fmt: skip
    seconds = round(time.perf_counter() - t0, 1)
    summary = {
        "models": [model_entry(s) for s in scores],
        "reward_model": reward_model,
        "comparisons": comparisons,
        "reference": e.reference,
        "k": e.samples_per_prompt,
        "temperature": e.temperature,
        "prompts": {"path": str(inputs.prompts), "n": len(prompts), "skipped_too_long": skipped},
        "metric_function": inputs.metric_function,
        "reward_function": inputs.reward_function,
        "seconds": seconds,
    }

    # 4. Outputs: the folder is built aside and renamed into place; stage.json last.
    with atomic_dir(stage_dir) as tmp:
        atomic_write_json(tmp / "summary.json", summary)
        # NaN (a reward model's score) as null: Python's bare NaN is not JSON (jq, JSON.parse refuse it).
        atomic_write_text(tmp / "responses.jsonl", "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows))
    report = {"seconds": seconds, "models": [s.name for s in scores], "prompts": len(prompts),
              "summary": str(stage_dir / "summary.json")}  # fmt: skip
    mark_finished(stage_dir, STAGE, digest, report)
    print(format_table(summary), flush=True)
    return report

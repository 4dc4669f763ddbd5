"""``kiln preferences CONFIG``: preference pairs of the policy's own answers, labelled by a function.

A reward model learns the mistakes its pairs show it. InstructGPT's labellers ranked the SFT
model's own samples, so its reward model saw the errors PPO would then push on; pairs written
beforehand show other errors. This stage collects such comparisons, a function standing in for
the labeller. Read top to bottom:

  0. inputs — the policy (the SFT model by default), the prompts, the label function: checked
     before any actor starts; prompts longer than ``max_prompt_tokens`` are skipped and counted;
  1. sampling — ``num_replicas`` vLLM actors (the evaluation's generators) sample
     ``samples_per_prompt`` responses to every prompt, each actor a contiguous share of the prompts
     in one batch, the file's prompt ``i`` (from 0) from seed ``seed + i * samples_per_prompt``
     (``sample_seeds``: no two samples share a random stream, and skipping a prompt moves no
     other prompt's draws);
  2. labelling — the function accepts or rejects each distinct response once (empty ones are
     left out and counted: the reward model's reader refuses them);
  3. pairing — each prompt with both kinds gives up to ``pairs_per_prompt`` pairs, each a distinct
     rejected response under an accepted one (``comparison_pairs``, pure);
  4. output — ``<run>/preferences/pairs.jsonl`` (``{"prompt", "chosen", "rejected"}``, the reward
     model's format), written atomically, then the stage marker.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from actors.reward import load_function
from cluster.runtime import init_ray
from core.progress import summary_text
from core.rundir import (
    atomic_write_text,
    finished_summary,
    input_stamps,
    inputs_changed,
    mark_finished,
    record_inputs,
)
from pipelines.config import KilnConfig
from pipelines.data.tokenizer import load_tokenizer
from pipelines.eval.generation import GeneratorPool, sample_seeds
from pipelines.eval.scoring import grade
from pipelines.rlhf.prompts import prompt_ids, read_prompts
from pipelines.train.modeling import check_context, check_model_dir

STAGE = "preferences"
PAIRS_FILE = "pairs.jsonl"


def comparison_pairs(
    responses: list[str], accepted: list[bool], most: int, rng: random.Random
) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs from one prompt's responses and their labels.

    Each distinct rejected response (at most ``most`` of them, drawn at random) is paired with an
    accepted one drawn at random; no pair without both kinds. Deterministic for a seeded ``rng``.
    """
    good = sorted({r for r, ok in zip(responses, accepted, strict=True) if ok})
    bad = sorted({r for r, ok in zip(responses, accepted, strict=True) if not ok})
    if not good or not bad:
        return []
    return [(rng.choice(good), rejected) for rejected in rng.sample(bad, min(most, len(bad)))]


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Sample, label and pair (or skip if finished with the same section); returns the stage summary."""
    p, stage_dir, digest = cfg.stage_section(STAGE)
    # 0. Inputs.
    policy = check_model_dir(Path(p.policy or cfg.run.dir / "sft" / "model").resolve())
    label = load_function(p.label_function)
    prompts = read_prompts(Path(p.prompts))
    max_model_len = p.max_prompt_tokens + p.max_response_tokens
    check_context(policy, max_model_len, STAGE)
    ids = prompt_ids(load_tokenizer(policy), prompts)
    keep = [i for i, x in enumerate(ids) if len(x) <= p.max_prompt_tokens]
    if not keep:
        raise ValueError(f"preferences: every prompt of {p.prompts} is longer than max_prompt_tokens "
                         f"({p.max_prompt_tokens})")  # fmt: skip
    stamps = input_stamps([policy, Path(p.prompts)])
    if (done := finished_summary(stage_dir, STAGE, digest, force or inputs_changed(stage_dir, STAGE, stamps))) is not None:
        return done
    record_inputs(stage_dir, stamps)
    print(f"kiln preferences: {len(keep)} prompts ({len(prompts) - len(keep)} skipped as too long), "
          f"{p.samples_per_prompt} samples each from {policy}", flush=True)  # fmt: skip

    # 1. Sampling, the actor torn down however it ends.
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    pool = GeneratorPool(policy, p.engine, max_model_len, p.num_cpus, p.num_gpus, p.num_replicas)
    try:
        seeds = sample_seeds(p.seed, keep, p.samples_per_prompt)  # by the prompt's place in the file
        texts = pool.generate([ids[i] for i in keep], p.samples_per_prompt, p.temperature, p.max_response_tokens, seeds).texts
    finally:
        pool.close()

    # 2-3. Labels and pairs.
    rng = random.Random(p.seed)
    rows, distinct, accepted, prompts_paired, empty = [], 0, 0, 0, 0
    for i, responses in zip(keep, texts, strict=True):
        q = prompts[i]
        # An empty answer is left out: the reward model's reader refuses pairs with one (as DPO's).
        unique = sorted({r for r in responses if r.strip()})
        empty += sum(not r.strip() for r in responses)
        labels = [grade(label, p.label_function, q, r) for r in unique]
        pairs = comparison_pairs(unique, labels, p.pairs_per_prompt, rng)
        distinct, accepted = distinct + len(unique), accepted + sum(labels)
        prompts_paired += bool(pairs)
        rows += [{"prompt": q.prompt, "chosen": chosen, "rejected": rejected} for chosen, rejected in pairs]
    if not rows:
        raise ValueError(f"preferences: no prompt of {p.prompts} got both an accepted and a rejected response from "
                         f"{p.samples_per_prompt} samples; there is nothing to compare")  # fmt: skip

    # 4. Outputs.
    path = stage_dir / PAIRS_FILE
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    report = {"pairs": len(rows), "path": str(path), "prompts": len(keep), "skipped_too_long": len(prompts) - len(keep),
              "prompts_paired": prompts_paired, "distinct_responses": distinct, "accepted": accepted,
              "empty_responses": empty,
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    mark_finished(stage_dir, STAGE, digest, report)
    print(f"kiln preferences: done {summary_text(report)}", flush=True)
    return report

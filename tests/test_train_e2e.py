"""The three training stages end to end: real Ray Train, real DeepSpeed, a tiny Llama, 2 CPU workers.

One module-scoped run trains pretrain (ZeRO-2) → SFT (ZeRO-3) → reward model (ZeRO-1) on small
generated quickstart data; the assertions share it. The fault tests train the same pretrain
config again, interrupted, and compare step by step with the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.metrics import read_metrics
from pipelines.config import KilnConfig, parse_config
from pipelines.data.packing import Packer, ShardWriter
from pipelines.quickstart.config import GenerateConfig
from pipelines.quickstart.generate import generate
from pipelines.train.trainer import TrainingDiverged

pytestmark = pytest.mark.slow

_TRAIN_COMMON: dict[str, Any] = {
    "num_workers": 2,
    "cpus_per_worker": 1.0,
    "threads_per_worker": 1,
    "warmup_steps": 3,
    # A report waits for Ray Train's controller to take the previous one (its poll: 0.2 s in kiln).
    "log_every_steps": 5,
    "eval_every_steps": 10,
    "eval_batches": 2,
    "checkpoint_every_steps": 10,
    "keep_checkpoints": 2,
    "max_failures": 2,
}
# Head size 32: vLLM's CPU attention has no kernel for 16.
_TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
               "max_position_embeddings": 128}  # fmt: skip


def _pretrain_section(shards: Path, tokenizer: Path, **overrides: Any) -> dict[str, Any]:
    return {**_TRAIN_COMMON, "model": _TINY_MODEL, "shards": str(shards), "tokenizer": str(tokenizer),
            "zero_stage": 2, "sequences_per_step": 8, "micro_batch_per_worker": 2, "max_steps": 40,
            "learning_rate": 3.0e-3, **overrides}  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """Small quickstart task files and pretraining shards (seq_len 64) packed with the tiny tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    generate(GenerateConfig(out_dir=str(corpus), seed=3, num_documents=200, exact_duplicates=0, near_duplicates=0,
                            junk_documents=0, sft_examples=600, preference_pairs=800, ppo_prompts=10,
                            eval_prompts=10))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    texts = [json.loads(line)["text"] for f in sorted((corpus / "pretrain").glob("*.jsonl")) for line in f.read_text().splitlines()]
    shards = root / "shards"
    shards.mkdir()
    for split, docs in (("train", texts[:-10]), ("validation", texts[-10:])):
        packer, writer = Packer(64, tok.eos_token_id), ShardWriter(shards, split, 64, 512)
        writer.add(packer.add([np.array(tok(t)["input_ids"]) for t in docs]))
        writer.close()
    return {"root": root, "corpus": corpus, "shards": shards, "tokenizer": tiny_tokenizer_dir}


def _config(ws: dict[str, Path], name: str, **sections: Any) -> KilnConfig:
    return parse_config({"run": {"name": name, "root": str(ws["root"] / "runs")}, "ray": {"num_cpus": 2}, **sections})


@pytest.fixture(scope="module")
def trained(ray_local: None, workspace: dict[str, Path]) -> dict[str, Any]:
    """pretrain (ZeRO-2) → SFT (ZeRO-3) → reward model (ZeRO-1), each through its stage driver."""
    from pipelines.train import pretrain, reward_model, sft

    ws = workspace
    cfg = _config(
        ws,
        "e2e",
        pretrain=_pretrain_section(ws["shards"], ws["tokenizer"]),
        sft={**_TRAIN_COMMON, "data": str(ws["corpus"] / "sft.jsonl"), "seq_len": 96, "zero_stage": 3,
             "sequences_per_step": 16, "micro_batch_per_worker": 4, "max_steps": 25, "learning_rate": 2.0e-3},
        reward_model={**_TRAIN_COMMON, "data": str(ws["corpus"] / "preferences.jsonl"), "seq_len": 96,
                      "zero_stage": 1, "sequences_per_step": 16, "micro_batch_per_worker": 8, "max_steps": 60,
                      "learning_rate": 2.0e-3, "eval_every_steps": 30, "eval_batches": 10, "validation_fraction": 0.2,
                      "lm_loss_weight": 1.0},
    )  # fmt: skip
    out: dict[str, Any] = {"cfg": cfg, "seconds": {}}
    for stage, module in (("pretrain", pretrain), ("sft", sft), ("reward_model", reward_model)):
        t0 = time.perf_counter()
        out[stage] = module.run(cfg)
        out["seconds"][stage] = time.perf_counter() - t0
    print("stage seconds:", out["seconds"])
    return out


def _losses(stage_dir: Path) -> dict[int, float]:
    """Step → training loss of the last attempt that logged that step."""
    return {m["step"]: m["loss"] for m in read_metrics(stage_dir) if "loss" in m and "event" not in m}


def _assert_falls(stage_dir: Path, drop: float) -> None:
    losses = _losses(stage_dir)
    steps = sorted(losses)
    first, last = np.mean([losses[s] for s in steps[:3]]), np.mean([losses[s] for s in steps[-3:]])
    assert last < first - drop, f"loss did not fall: {first:.3f} -> {last:.3f}"


def test_pretrain_loss_falls_and_exports_a_hf_model(trained: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    stage_dir = trained["cfg"].run.dir / "pretrain"
    _assert_falls(stage_dir, drop=1.0)
    assert "val_perplexity" in trained["pretrain"] and trained["pretrain"]["steps"] == 40
    assert (stage_dir / "stage.json").exists() and any((stage_dir / "tensorboard").iterdir())
    # keep_checkpoints: 2 of the 4 (steps 10, 20, 30, 40) remain.
    assert sorted(p.name for p in (stage_dir / "ray" / "train").glob("step-*")) == ["step-00000030", "step-00000040"]
    model = AutoModelForCausalLM.from_pretrained(str(stage_dir / "model"))
    assert model.config.num_hidden_layers == 2 and (stage_dir / "model" / "tokenizer.json").exists()


def test_finished_stage_is_skipped_on_rerun(trained: dict[str, Any]) -> None:
    from pipelines.train import pretrain

    before = (trained["cfg"].run.dir / "pretrain" / "metrics.jsonl").read_text()
    t0 = time.perf_counter()
    assert pretrain.run(trained["cfg"]) == trained["pretrain"]
    assert time.perf_counter() - t0 < 5
    assert (trained["cfg"].run.dir / "pretrain" / "metrics.jsonl").read_text() == before


def test_compiled_pretrain_trains_as_the_eager_run(trained: dict[str, Any], workspace: dict[str, Path]) -> None:
    """``torch_compile: aot_eager`` (TorchDynamo and AOTAutograd trace the model inside DeepSpeed's
    engine, without inductor's code generation, which CPU CI cannot afford): the same losses as the
    eager run, step window by step window, and the export loads under the usual parameter names."""
    from transformers import AutoModelForCausalLM

    from pipelines.train import pretrain

    section = _pretrain_section(workspace["shards"], workspace["tokenizer"], torch_compile="aot_eager")
    cfg = _config(workspace, "compiled", pretrain=section)
    pretrain.run(cfg)
    stage_dir = cfg.run.dir / "pretrain"
    starts = [m for m in read_metrics(stage_dir) if m.get("event") == "start"]
    assert starts and all(m["compiled"] for m in starts), starts
    ours, ref = _losses(stage_dir), _losses(trained["cfg"].run.dir / "pretrain")
    assert sorted(ours) == sorted(ref)
    for step in ours:
        assert ours[step] == pytest.approx(ref[step], rel=1e-2), f"step {step}: {ours[step]} vs {ref[step]}"
    model = AutoModelForCausalLM.from_pretrained(str(stage_dir / "model"))
    eager = AutoModelForCausalLM.from_pretrained(str(trained["cfg"].run.dir / "pretrain" / "model"))
    assert model.state_dict().keys() == eager.state_dict().keys()


def test_sft_loss_falls_under_zero3(trained: dict[str, Any]) -> None:
    _assert_falls(trained["cfg"].run.dir / "sft", drop=0.5)
    assert trained["sft"]["truncated"] >= 0 and "val_loss" in trained["sft"]


_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys

    def main():
        from vllm import LLM, SamplingParams

        prompts = json.loads(sys.argv[2])
        llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", gpu_memory_utilization=0.3,
                  max_model_len=128, seed=0)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = [{str(t): lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]
        print("RESULT " + json.dumps(result), flush=True)

    if __name__ == "__main__":
        main()
    """
)


def test_exported_zero3_model_agrees_in_transformers_and_vllm(trained: dict[str, Any], tmp_path: Path) -> None:
    """The SFT export (consolidated from ZeRO-3 partitions) gives the same next-token log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = trained["cfg"].run.dir / "sft" / "model"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}], tokenize=True,
                                add_generation_prompt=True, return_dict=True)["input_ids"]
        for a, b in ((3, 4), (12, 30), (41, 8))
    ] + [tok("The quick brown fox")["input_ids"]]  # fmt: skip
    script = tmp_path / "vllm_logprobs.py"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(prompts)], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    vllm_logprobs = json.loads(lines[0][len("RESULT ") :])

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for ids, from_vllm in zip(prompts, vllm_logprobs):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        assert max(from_vllm.values()) == pytest.approx(logprobs.max().item(), abs=1e-6 + 2e-3)
        for token, lp in from_vllm.items():
            assert lp == pytest.approx(logprobs[int(token)].item(), abs=2e-3)


def test_reward_model_beats_chance_on_held_out_pairs(trained: dict[str, Any], workspace: dict[str, Path]) -> None:
    """Held-out pairwise accuracy: near perfect where the task is learnable, and the same in the export.

    A quarter of the quickstart's rejected answers are rambles without a number; the rest are
    wrong sums, which a model that cannot yet add (this tiny one) can only guess. So the rambling
    pairs carry the signal; the overall figure mostly measures whether the model can add.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from core.jsonl import read_jsonl
    from pipelines.train.datasets import preference_rows, prompt_key, split_validation

    summary = trained["reward_model"]
    losses = _losses(trained["cfg"].run.dir / "reward_model")
    assert np.mean([losses[s] for s in sorted(losses)[-3:]]) < losses[min(losses)], losses
    # The auxiliary next-token loss on the chosen responses (reward_model.lm_loss_weight) is logged
    # beside the Bradley-Terry loss, held out too, and falls.
    lm = [m["lm_loss"] for m in read_metrics(trained["cfg"].run.dir / "reward_model") if "lm_loss" in m]
    assert len(lm) >= 3 and all(math.isfinite(x) for x in lm) and lm[-1] < lm[0], lm
    assert math.isfinite(summary["val_lm_loss"])
    # The export is a standard one-label sequence-classification model.
    model_dir = trained["cfg"].run.dir / "reward_model" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    records = [(str(n), r) for n, r in read_jsonl(workspace["corpus"] / "preferences.jsonl")]
    _, held_out = split_validation(records, 0.2, key=prompt_key)  # as the stage holds them out

    def accuracy(pairs: list[tuple[str, dict[str, Any]]]) -> float:
        rows, _ = preference_rows(tok, pairs, seq_len=96, overlong="truncate")
        with torch.no_grad():
            chosen = model(torch.from_numpy(rows["chosen_ids"]).long()).logits[:, 0]  # (N,)
            rejected = model(torch.from_numpy(rows["rejected_ids"]).long()).logits[:, 0]
        return (chosen > rejected).float().mean().item()

    rambles = [(w, r) for w, r in held_out if not any(ch.isdigit() for ch in r["rejected"])]
    assert len(rambles) >= 20 and accuracy(rambles) >= 0.85, (len(rambles), accuracy(rambles))
    # The trainer's held-out figure (the held-out pairs, under ZeRO-1) is what the export reproduces.
    assert accuracy(held_out) == pytest.approx(summary["val_accuracy"], abs=0.02)


# --- faults -------------------------------------------------------------------------------------


def _latest_registered_step(stage_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train's controller has registered (0: none yet).

    A checkpoint is on disk when ``report`` returns, but the controller registers it only when it
    next polls the workers (every 2 s): a worker killed before that resumes from the one before.
    """
    snapshot = stage_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return 0
    return int(latest.get("checkpoint_dir_name", "step-0").split("-")[1])


def _kill_workers(stage_dir: Path, after_checkpoints: list[int], done: threading.Event, timeout: float = 400.0) -> None:
    """SIGKILL the current attempt's rank-0 worker as soon as each listed checkpoint is registered."""

    def watch() -> None:
        targets = list(after_checkpoints)
        deadline = time.time() + timeout
        killed_pid = None
        while targets and time.time() < deadline and not done.is_set():
            starts = [m for m in read_metrics(stage_dir) if m.get("event") in ("start", "resume")]
            if starts and starts[-1]["pid"] != killed_pid and _latest_registered_step(stage_dir) >= targets[0]:
                killed_pid = starts[-1]["pid"]
                os.kill(killed_pid, signal.SIGKILL)
                targets.pop(0)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def test_killed_worker_restarts_and_stopped_run_continues(trained: dict[str, Any], workspace: dict[str, Path]) -> None:
    """Kill 1: Ray Train restarts the workers from the latest checkpoint (max_failures: 1).
    Kill 2: failures exhausted, the run stops. Running the same command again finishes it.
    Every logged loss after each resume matches the uninterrupted run: same data, same weights.
    Checkpoints every 6 steps, metric lines every 5: a resume at 12 must carry steps 11 and 12
    into the line of step 15 (it averaged only 13-15 when the window was not saved).
    """
    import ray.train

    from pipelines.train import pretrain

    section = _pretrain_section(workspace["shards"], workspace["tokenizer"], max_failures=1, checkpoint_every_steps=6)
    cfg = _config(workspace, "fault", pretrain=section)
    stage_dir = cfg.run.dir / "pretrain"
    done = threading.Event()
    _kill_workers(stage_dir, after_checkpoints=[12, 24], done=done)
    try:
        with pytest.raises(ray.train.TrainingFailedError):
            pretrain.run(cfg)
    finally:
        done.set()
    assert not (stage_dir / "stage.json").exists() and not (stage_dir / "model").exists()
    summary = pretrain.run(cfg)  # the same command again

    events = [m for m in read_metrics(stage_dir) if "event" in m]
    resumes = [m["step"] for m in events if m["event"] == "resume"]
    assert resumes == [12, 24], events
    assert summary["steps"] == 40
    ours, ref = _losses(stage_dir), _losses(trained["cfg"].run.dir / "pretrain")
    assert sorted(ours) == sorted(ref) == [5, 10, 15, 20, 25, 30, 35, 40]
    for step in ours:  # the last attempt's value of each window
        assert ours[step] == pytest.approx(ref[step], rel=1e-3, abs=1e-3), f"step {step}: {ours[step]} vs {ref[step]}"
    assert summary["final_loss"] == pytest.approx(trained["pretrain"]["final_loss"], rel=1e-3)


def test_non_finite_loss_stops_with_a_clear_message(ray_local: None, workspace: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A model whose output weights hold an inf: the loss is NaN at step 1; training stops (no
    retries, no checkpoint after a bad step, no export) and says so."""
    from safetensors.torch import load_file, save_file

    from pipelines.train import pretrain

    model_dir = tmp_path / "poisoned"
    shutil.copytree(tiny_llama_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["lm_head.weight"][0, 0] = float("inf")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    section = _pretrain_section(workspace["shards"], workspace["tokenizer"], max_steps=3, checkpoint_every_steps=1)
    section["model"] = {**_TINY_MODEL, "path": str(model_dir)}
    cfg = _config(workspace, "diverged", pretrain=section)
    stage_dir = cfg.run.dir / "pretrain"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 1.*Last good checkpoint kept: none"):
        pretrain.run(cfg)
    assert not list((stage_dir / "ray" / "train").glob("step-*"))
    assert not (stage_dir / "model").exists() and not (stage_dir / "stage.json").exists()


def test_missing_inputs_fail_before_any_worker_starts(workspace: dict[str, Path], tmp_path: Path) -> None:
    from pipelines.train import pretrain, sft

    cfg = _config(workspace, "missing", pretrain=_pretrain_section(tmp_path / "no-shards", workspace["tokenizer"]),
                  sft={**_TRAIN_COMMON, "data": str(tmp_path / "absent.jsonl"), "init_from": str(tmp_path / "no-model")})  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no-shards"):
        pretrain.run(cfg)
    with pytest.raises(FileNotFoundError, match="no-model"):
        sft.run(cfg)
    model_dir = tmp_path / "model"
    shutil.copytree(workspace["tokenizer"], model_dir)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    cfg = _config(workspace, "missing", sft={**_TRAIN_COMMON, "data": str(tmp_path / "absent.jsonl"), "init_from": str(model_dir)})
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        sft.run(cfg)
    assert not (cfg.run.dir / "sft" / "ray").exists()

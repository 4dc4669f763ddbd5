"""PPO step benchmark: where a ``kiln ppo`` step spends its time, and how it compares, in one run.

Run from the repository root (2 CPUs; ``--quick`` takes about 3.5 minutes, the default about 4.5):

    .venv/bin/python -m bench.ppo_step --quick     # 2 measured steps per algorithm, 1 TRL round
    .venv/bin/python -m bench.ppo_step             # 5 measured steps, 2 TRL rounds
    .venv/bin/python -m bench.ppo_step --no-trl    # without the TRL comparison
    .venv/bin/python -m bench.ppo_step --layers 8 --hidden 256 --response-tokens 64

Everything runs on a model and data built here: the quickstart's ``ppo_prompts.jsonl`` ("What is
a + b?" with an ``answer`` field, ``pipelines.quickstart.generate``), a byte-level BPE tokenizer (vocab
4096) trained on the quickstart corpus, and a randomly initialised Llama (default 4 layers x 128
wide, 4 heads of 32, MLP 352: the quickstart's size) saved in Hugging Face format. The reward is the
quickstart's programmatic ``pipelines.quickstart.task:reward`` (no reward model). Batch: ``--prompts`` (16) x
``--samples`` (4) responses of at most ``--response-tokens`` (24) tokens, as in the quickstart.

What it measures, in this order, each baseline in the same run as the kiln figure it is compared to:

1. **Rollout throughput.** The first step's batch of prompts (same token ids, same samples per
   prompt, same number of new tokens), sampled at temperature 1 with no top-k/top-p, each
   sampled token's log-prob returned, by
   * vLLM: ``vllm.LLM`` with exactly the rollout actor's engine arguments (``actors/rollout.py``:
     float32, eager, ``processed_logprobs``, one seed per sample), engine core in its own process.
     Its CPU backend binds the model's OpenMP threads itself: on 2 cores, one thread on core 0,
     core 1 reserved for its scheduler;
   * ``transformers``: ``model.generate`` on the whole batch at once (left-padded, ``use_cache=True``,
     ``do_sample=True, top_k=0``, ``output_scores=True``), with 1 and with all torch threads; the
     faster is the baseline (on a busy 2-core machine a second OpenMP thread can make generation
     10x slower rather than faster).
   Equal lengths are forced: vLLM with ``ignore_eos=True, min_tokens=max_tokens=N``,
   ``transformers`` with ``min_new_tokens=max_new_tokens=N`` (EOS suppressed), so both generate
   exactly ``samples x N`` tokens (checked). One untimed warm-up call each, then the fastest of
   ``--repeats`` calls (the least disturbed by other jobs on a shared machine; every call's time
   is in the JSON). tokens/s = generated tokens / wall seconds. Goal: vLLM >= 10x.
2. **Step-time breakdown.** kiln's own actors (``pipelines.rlhf.ppo.start_actors``, the quickstart's
   resources: rollout 0.5 CPU, learner 0.5, critic 0.25, reference 0.25, reward 0.25, one torch
   thread each) on an embedded 2-CPU Ray cluster, driven by ``pipelines.rlhf.ppo.ppo_step``: one warm-up
   step, then ``--steps`` steps with ``advantage: gae`` (critic), then the same with ``advantage:
   grpo`` (no critic; same actors, critic left out). Mean seconds of each phase as ``ppo_step``
   records them (``time_generate_s``, ``time_score_s``, ``time_learn_s``, ``time_sync_s``,
   ``time_step_s``); weight sync's share of the step time. Goal: sync <= 5%. The rollout here stops
   at ``<|im_end|>`` as in training, so its tokens/s (also shown) counts the tokens it actually drew.
3. **One GRPO training step against TRL** (if ``trl`` imports; not a kiln dependency: ``pip
   install trl==1.16.0``). ``trl.GRPOTrainer`` (``use_vllm=False``: ``transformers`` generation, the
   CPU path) on the same model directory, prompts (conversational, same chat template), reward
   function and sampling, arranged to do the work of one kiln step: ``num_generations`` = samples
   per prompt, ``generation_batch_size`` = prompts x samples (``steps_per_generation`` 4 x
   ``per_device_train_batch_size`` 16), ``num_iterations`` = ``ppo_epochs`` (2),
   ``gradient_accumulation_steps`` 2, so one generation round = 2 passes x 2 optimizer steps of 32
   samples in micro-batches of 16, exactly kiln's ``ppo_epochs`` x ``minibatches_per_epoch`` with
   ``micro_batch_per_worker`` 16; ``beta`` = ``kl_coef`` (0.05, so TRL computes reference log-probs
   like kiln), ``epsilon`` = ``clip_eps``, same learning rate, AdamW betas and grad clip, float32,
   no gradient checkpointing, ``loss_type="bnpo"`` (token mean per micro-batch, as kiln). TRL runs
   in this process after kiln's actors are gone, with two torch threads: the two cores kiln's
   actors share between them (``--threads`` sets it). Its step time is the wall time of a whole generation round (4 optimizer steps, from the
   end of the round before), the first round dropped as warm-up. Responses end at a stop token in
   both (a random model rarely draws one): the mean response lengths are printed next to the
   times. Goal: kiln <= 0.5x TRL's time.

The machine is shared: the load average is printed with the results. Results also go to ``--out``
as JSON (default ``runs/bench/ppo_step.json``; ``runs/`` is not tracked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PHASES = ("generate", "score", "learn", "sync", "step")
ROLLOUT_GOAL = 10.0  # vLLM tokens/s >= 10x transformers generate
SYNC_GOAL = 0.05  # weight sync <= 5% of the step
TRL_GOAL = 0.5  # kiln's GRPO step <= 0.5x TRL's


# --- inputs ---------------------------------------------------------------------------------------


def build_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The quickstart's PPO prompts, a BPE tokenizer trained on its corpus, a random Llama: (model, prompts)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.data.config import TokenizerConfig
    from pipelines.data.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe
    from pipelines.quickstart.config import GenerateConfig
    from pipelines.quickstart.generate import generate

    data = work / "data"
    generate(GenerateConfig(out_dir=str(data), num_documents=300, exact_duplicates=0, near_duplicates=0,
                            junk_documents=0, sft_examples=10, preference_pairs=10, eval_prompts=10))  # fmt: skip
    files = sorted((data / "pretrain").glob("*.jsonl"))
    texts = [json.loads(line)["text"] for f in files for line in f.read_text().splitlines()]
    tok_dir = work / "tokenizer"
    save_hf_tokenizer(train_bpe(texts, TokenizerConfig(vocab_size=args.vocab)), tok_dir)
    tok = load_tokenizer(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // args.head_dim,
        num_key_value_heads=args.hidden // args.head_dim, max_position_embeddings=512,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = work / "model"
    LlamaForCausalLM(config).save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    return model_dir, data / "ppo_prompts.jsonl"


def ppo_section(model_dir: Path, prompts: Path, args: argparse.Namespace, advantage: str,
                gpu: bool = False) -> dict[str, Any]:  # fmt: skip
    """The ``ppo:`` config the benchmark runs: the quickstart's, with the function reward only.

    ``gpu`` (``bench.gpu_check``): learner and critic on a GPU each (DeepSpeed bf16, NCCL), the
    rollout engine on one in bfloat16, and the reference (which runs on CPU) with more threads.
    """
    model = {"micro_batch_per_worker": 16, "learning_rate": 3.0e-5}
    if gpu:
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        return {
            **ppo_section(model_dir, prompts, args, advantage),
            "learner": {**model, "cpus_per_worker": 1.0, "use_gpu": True},
            "critic": {**model, "cpus_per_worker": 1.0, "learning_rate": 5.0e-5, "use_gpu": True},
            "rollout": {"num_cpus": 1.0, "num_gpus": 1.0,
                        "engine": {"dtype": "bfloat16", "gpu_memory_utilization": 0.3}},
            "reference": {"num_cpus": 1.0, "threads": threads},
        }  # fmt: skip
    return {
        "policy": str(model_dir), "prompts": str(prompts), "reward_function": "pipelines.quickstart.task:reward",
        "max_prompt_tokens": 32, "max_response_tokens": args.response_tokens,
        "prompts_per_step": args.prompts, "samples_per_prompt": args.samples, "advantage": advantage,
        "kl_coef": 0.05, "clip_eps": 0.2, "ppo_epochs": 2, "minibatches_per_epoch": 2, "seed": 0,
        "learner": {**model, "cpus_per_worker": 0.5}, "critic": {**model, "cpus_per_worker": 0.25, "learning_rate": 5.0e-5},
        "rollout": {"num_cpus": 0.5, "engine": {"dtype": "float32", "gpu_memory_utilization": 0.3, "cpu_kv_cache_gib": 1}},
        "reference": {"num_cpus": 0.25}, "reward": {"num_cpus": 0.25},
    }  # fmt: skip


def first_batch(model_dir: Path, prompts_path: Path, p: Any) -> tuple[list[list[int]], int, int]:
    """Token ids of the prompts of step 0, exactly as ``ppo_step`` picks them; and (pad id, eos id)."""
    from pipelines.data.tokenizer import load_tokenizer
    from pipelines.rlhf.ppo import load_prompts, prompt_indices

    tok = load_tokenizer(model_dir)
    prompts, _ = load_prompts(prompts_path, tok, p.max_prompt_tokens)
    chosen = [prompts[i].ids for i in prompt_indices(0, p.prompts_per_step, len(prompts), p.seed)]
    return chosen, tok.pad_token_id, tok.eos_token_id


# --- 1. rollout throughput ------------------------------------------------------------------------


def rollout_vllm(model_dir: Path, prompt_ids: list[list[int]], p: Any, max_model_len: int, repeats: int) -> dict[str, Any]:
    """vLLM tokens/s with the rollout actor's engine arguments; exactly ``max_response_tokens`` per sample.

    The engine core runs in a process of its own (vLLM's default), where the rollout actor runs it
    in the actor's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): in this benchmark's process,
    after its other imports, vLLM 0.32's in-process engine fails at start-up (its CPU platform's
    triton kernel override). The step's own "generate" row is the real actor's."""
    from vllm import LLM, SamplingParams, TokensPrompt

    engine, n = p.rollout.engine, p.max_response_tokens
    # vLLM edits this process's environment for its workers (LD_PRELOAD=libgomp, thread counts); Ray
    # workers started later would inherit it and kiln's actors would run under it. Put it back.
    environ = dict(os.environ)
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), **{**engine.vllm_args(), "max_model_len": max_model_len},
              logprobs_mode="processed_logprobs")  # the rollout actor's own engine arguments
    startup = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in range(p.samples_per_prompt)]

    def once(seed: int) -> float:
        params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=n, min_tokens=n, ignore_eos=True,
                                 logprobs=0, seed=seed + i) for i in range(len(prompts))]  # fmt: skip
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        # The rollout actor's own post-processing: each sampled token's log-prob.
        logprobs = [[float(s[t].logprob) for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs]
        seconds = time.perf_counter() - start
        assert all(len(lp) == n for lp in logprobs), "vLLM did not generate exactly max_tokens per sample"
        return seconds

    try:
        once(10_000)  # warm-up
        times = [once(20_000 * (r + 1)) for r in range(repeats)]
    finally:
        llm.llm_engine.engine_core.shutdown()  # the engine's memory goes with ``llm`` on return
        os.environ.clear()
        os.environ.update(environ)
    tokens = len(prompts) * n
    return {"startup_s": startup, "seconds": min(times), "tokens": tokens, "tokens_per_s": tokens / min(times),
            "runs_s": times}  # fmt: skip


def rollout_transformers(model_dir: Path, prompt_ids: list[list[int]], p: Any, pad_id: int, eos_id: int,
                         repeats: int, thread_counts: list[int]) -> dict[str, Any]:  # fmt: skip
    """``model.generate`` tokens/s on the same batch, exactly ``max_response_tokens`` per sample.

    Measured with each of ``thread_counts`` torch threads; the fastest is the baseline (on a busy
    2-core machine a second OpenMP thread can make it 10x slower, not faster).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = [ids for ids in prompt_ids for _ in range(p.samples_per_prompt)]
    width, n = max(len(r) for r in rows), p.max_response_tokens
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, P), left-padded
    attention = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1

    @torch.no_grad()
    def once(seed: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=pad_id,
                             eos_token_id=eos_id, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        new = out.sequences[:, width:]  # (B, N)
        logprobs = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, N)
        seconds = time.perf_counter() - start
        assert new.shape == (len(rows), n) and logprobs.shape == new.shape, "generate did not produce N tokens per row"
        return seconds

    tokens = len(rows) * n
    by_threads = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        once(10_000)  # warm-up
        times = [once(20_000 * (r + 1)) for r in range(repeats)]
        seconds = min(times)
        by_threads[threads] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "runs_s": times}
        print(f"  transformers, {threads} thread(s): {by_threads[threads]['tokens_per_s']:,.0f} tokens/s", flush=True)
    best = max(by_threads, key=lambda t: by_threads[t]["tokens_per_s"])
    return {**by_threads[best], "tokens": tokens, "threads": best, "by_threads": by_threads}


# --- 2. kiln's step -------------------------------------------------------------------------------


def init_gpu_ray(p: Any) -> str:
    """An embedded Ray cluster on which kiln's PPO actors of ``p`` find their GPUs; how they are placed.

    Each learner and critic rank asks Ray for a whole GPU (``pipelines.rlhf.ppo.start_actors``), the
    rollout actor for ``rollout.num_gpus``. With fewer GPUs than they ask for, Ray is told of as
    many logical GPUs and leaves CUDA_VISIBLE_DEVICES alone, so that every actor shares GPU 0.
    """
    import math

    import ray
    import torch

    from cluster.runtime import worker_env

    noset = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
    wanted = p.learner.num_workers + p.critic.num_workers + math.ceil(p.rollout.num_gpus)
    physical = torch.cuda.device_count()
    env = worker_env()
    if physical < wanted:  # Ray's workers inherit it from this process, and get it in their runtime env
        os.environ[noset] = env[noset] = "1"
    ray.init(num_cpus=os.cpu_count(), num_gpus=max(wanted, physical), runtime_env={"env_vars": env},
             include_dashboard=False)  # fmt: skip
    if physical < wanted:
        return f"learner, critic and rollout share GPU 0 ({physical} GPU(s) for {wanted} GPU actors)"
    return "learner, critic and rollout on a GPU each"


def kiln_steps(model_dir: Path, prompts_path: Path, args: argparse.Namespace, gpu: bool = False) -> dict[str, Any]:
    """Warm-up + ``args.steps`` ``ppo_step`` calls with GAE, then the same with GRPO, on one set of actors.

    ``gpu``: the actors on the GPU(s) (``ppo_section``), on a cluster from :func:`init_gpu_ray`.
    """
    import ray

    from cluster.config import RayConfig
    from cluster.runtime import init_ray
    from pipelines.data.tokenizer import load_tokenizer
    from pipelines.rlhf.config import PpoConfig
    from pipelines.rlhf.ppo import State, load_prompts, ppo_step, start_actors

    configs = {a: PpoConfig.model_validate(ppo_section(model_dir, prompts_path, args, a, gpu)) for a in ("gae", "grpo")}
    p = configs["gae"]
    tokenizer = load_tokenizer(model_dir)
    prompts, _ = load_prompts(prompts_path, tokenizer, p.max_prompt_tokens)
    placement = init_gpu_ray(p) if gpu else init_ray(RayConfig(num_cpus=2))
    t0 = time.perf_counter()
    # The critic starts from the policy (there is no reward model here).
    actors = start_actors(p, model_dir, None, model_dir)
    ray.get([actors.rollout.policy_version.remote(), actors.reward.__ray_ready__.remote(),
             actors.reference.__ray_ready__.remote()])  # fmt: skip
    out: dict[str, Any] = {"startup_s": time.perf_counter() - t0, **({"placement": placement} if gpu else {})}
    state = State(kl_coef=p.kl_coef)
    try:
        for advantage in ("gae", "grpo"):
            # GRPO on the same actors: the same rollout, learner and reference, no critic.
            view = actors if advantage == "gae" else dataclasses.replace(actors, critic=None)
            records = []
            for i in range(args.warmup + args.steps):
                record = ppo_step(view, prompts, configs[advantage], state, tokenizer.pad_token_id)
                print(f"  kiln {advantage} step {i + 1}{' (warm-up)' if i < args.warmup else ''}: "
                      + " ".join(f"{k}={record[f'time_{k}_s']:.2f}s" for k in PHASES), flush=True)  # fmt: skip
                records.append(record)
            out[advantage] = summarize(records[args.warmup :], configs[advantage].samples_per_step)
            actors.version = view.version  # the view synced the rollout actor; keep the two in step
    finally:
        for actor in [actors.rollout, actors.reward, actors.reference, *actors.learner.ranks,
                      *(actors.critic.ranks if actors.critic else [])]:  # fmt: skip
            ray.kill(actor)
        ray.shutdown()
    return out


def summarize(records: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """Mean seconds per phase, sync share, rollout tokens/s in the loop, log-prob mismatch after sync."""
    mean = {k: statistics.mean(r[f"time_{k}_s"] for r in records) for k in PHASES}
    tokens = [r["response_length"] * samples for r in records]
    return {
        "steps": len(records),
        "mean_s": mean,
        "sync_share": sum(r["time_sync_s"] for r in records) / sum(r["time_step_s"] for r in records),
        "response_length": statistics.mean(r["response_length"] for r in records),
        "rollout_tokens_per_s": sum(tokens) / sum(r["time_generate_s"] for r in records),
        # Every measured step follows a sync: vLLM's log-probs against the learner's, same tokens.
        "logprob_mismatch_max": max(r["logprob_mismatch_max"] for r in records),
        "records": records,
    }


# --- 3. TRL -----------------------------------------------------------------------------------------


def trl_step(model_dir: Path, prompts_path: Path, p: Any, work: Path, rounds: int, threads: int) -> dict[str, Any]:
    """Seconds per generation round of TRL's GRPOTrainer doing one kiln step's work; or why it did not run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL warns that it was tested with older vLLM releases
            import trl
            from trl import GRPOConfig, GRPOTrainer
    except Exception as e:  # noqa: BLE001 - any import failure means the same: no TRL row
        return {"status": "not installed", "reason": f"{type(e).__name__}: {e}"}
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from pipelines.quickstart.task import reward

    torch.set_num_threads(threads)
    records = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    # Conversational prompts: TRL applies the same chat template (generation prompt included) as kiln.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in records])  # fmt: skip

    def task_reward(prompts: list[Any], completions: list[Any], answer: list[int], **_: Any) -> list[float]:
        return [reward(q, c[0]["content"], a) for q, c, a in zip(prompts, completions, answer)]

    micro, accum = 16, 2  # kiln: micro_batch_per_worker 16, mini-batch 32 = samples_per_step / minibatches_per_epoch
    minibatch = p.samples_per_step // p.minibatches_per_epoch
    assert minibatch == micro * accum, "the TRL arrangement assumes mini-batches of 32 samples"
    optimizer_steps = p.ppo_epochs * p.minibatches_per_epoch  # per generation round, as in one kiln step
    config = GRPOConfig(
        output_dir=str(work / "trl"), report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
        bf16=False, gradient_checkpointing=False, seed=p.seed, dataloader_num_workers=0,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        steps_per_generation=p.samples_per_step // micro, num_generations=p.samples_per_prompt,
        num_iterations=p.ppo_epochs, max_steps=optimizer_steps * (1 + rounds),
        max_completion_length=p.max_response_tokens, temperature=p.temperature, top_p=p.top_p, top_k=0,
        beta=p.kl_coef, epsilon=p.clip_eps, loss_type="bnpo", use_vllm=False,
        learning_rate=p.learner.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=p.learner.adam_beta1, adam_beta2=p.learner.adam_beta2, adam_epsilon=p.learner.adam_eps,
        weight_decay=p.learner.weight_decay, max_grad_norm=p.learner.grad_clip,
    )  # fmt: skip

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.step_end: dict[int, float] = {}
            self.lengths: dict[int, float] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_end[0] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_end[state.global_step] = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if logs and "completions/mean_length" in logs:
                self.lengths[state.global_step] = float(logs["completions/mean_length"])

    clock = Clock()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=task_reward, args=config, train_dataset=dataset,
                              callbacks=[clock])  # fmt: skip
    startup = time.perf_counter() - t0
    # TRL's generate + reward + old/reference log-probs, timed by wrapping its one method for it.
    generation: list[float] = []
    inner = trainer._generate_and_score_completions

    def timed(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            generation.append(time.perf_counter() - start)

    trainer._generate_and_score_completions = timed
    trainer.train()
    ends = clock.step_end
    round_s = [ends[optimizer_steps * (r + 1)] - ends[optimizer_steps * r] for r in range(1, 1 + rounds)]
    lengths = [v for step, v in clock.lengths.items() if step > optimizer_steps]
    return {
        "status": "ran", "version": trl.__version__, "startup_s": startup, "rounds": rounds,
        "step_s": statistics.mean(round_s), "rounds_s": round_s,
        "generate_score_s": statistics.mean(generation[1:]) if len(generation) > 1 else None,
        "response_length": statistics.mean(lengths) if lengths else None, "threads": threads,
    }  # fmt: skip


# --- report -----------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table(res: dict[str, Any]) -> str:
    a, s = res["args"], res["setup"]
    vllm, hf, kiln, trl = res["rollout_vllm"], res["rollout_transformers"], res["kiln"], res["trl"]
    gae, grpo = kiln["gae"], kiln["grpo"]
    lines = [
        f"model: Llama {a['layers']} layers x {a['hidden']} wide (head {a['head_dim']}, MLP {a['intermediate']}), "
        f"vocab {s['vocab']}, {s['parameters'] / 1e6:.2f}M parameters, float32; batch {a['prompts']} prompts x "
        f"{a['samples']} samples, <= {a['response_tokens']} response tokens; {s['cpus']} CPUs",
        "",
        f"step-time breakdown: kiln ppo_step, mean of {gae['steps']} steps after {a['warmup']} warm-up "
        "(2 epochs x 2 mini-batches of 32)",
        "",
        "| phase | PPO (GAE) s | share | GRPO s | share |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {"generate": "generate (vLLM rollout actor)", "score": "score ∥ reference ∥ old log-probs ∥ values",
              "learn": "learn (policy ∥ critic)", "sync": "weight sync", "step": "step total"}  # fmt: skip
    for k in PHASES:
        g, r = gae["mean_s"][k], grpo["mean_s"][k]
        g_share, r_share = g / gae["mean_s"]["step"], r / grpo["mean_s"]["step"]
        lines.append(f"| {labels[k]} | {g:.2f} | {g_share:.1%} | {r:.2f} | {r_share:.1%} |")
    lines += [
        "",
        f"in-loop rollout: {gae['rollout_tokens_per_s']:,.0f} tokens/s (GAE), {grpo['rollout_tokens_per_s']:,.0f} "
        f"(GRPO), mean response {gae['response_length']:.1f} / {grpo['response_length']:.1f} tokens; "
        "log-prob mismatch vLLM vs learner after sync: max "
        f"{max(gae['logprob_mismatch_max'], grpo['logprob_mismatch_max']):.1e}",
        "",
        "| measurement | kiln | baseline (same run) | ratio | goal | |",
        "|---|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    ratio = vllm["tokens_per_s"] / hf["tokens_per_s"]
    lines.append(f"| rollout tokens/s, {vllm['tokens']} tokens ({a['prompts'] * a['samples']} x {a['response_tokens']}) "
                 f"| vLLM {vllm['tokens_per_s']:,.0f} | transformers generate, {hf['threads']} thread(s), "
                 f"{hf['tokens_per_s']:,.0f} | {ratio:.1f}x "
                 f"| >= {ROLLOUT_GOAL:.0f}x | {_verdict(ratio >= ROLLOUT_GOAL)} |")  # fmt: skip
    for name, row in (("PPO (GAE)", gae), ("GRPO", grpo)):
        lines.append(f"| weight sync share of step, {name} | {row['sync_share']:.1%} ({row['mean_s']['sync'] * 1000:.0f} ms) "
                     f"| | | <= {SYNC_GOAL:.0%} | {_verdict(row['sync_share'] <= SYNC_GOAL)} |")  # fmt: skip
    if trl["status"] == "ran":
        r = grpo["mean_s"]["step"] / trl["step_s"]
        lines.append(f"| one GRPO step, s (mean response {grpo['response_length']:.1f} vs {trl['response_length'] or 0:.1f} "
                     f"tokens) | {grpo['mean_s']['step']:.2f} | TRL {trl['version']} GRPOTrainer, {trl['threads']} "
                     f"thread(s), {trl['step_s']:.2f} "
                     f"| {r:.2f}x | <= {TRL_GOAL}x | {_verdict(r <= TRL_GOAL)} |")  # fmt: skip
        if trl.get("generate_score_s"):
            kiln_gen = grpo["mean_s"]["generate"] + grpo["mean_s"]["score"]
            lines += ["", f"TRL round: generate + score + log-probs {trl['generate_score_s']:.2f} s "
                          f"(kiln GRPO: generate + score {kiln_gen:.2f} s)"]  # fmt: skip
    else:
        lines.append(f"| one GRPO step vs TRL | {grpo['mean_s']['step']:.2f} s | TRL {trl['status']} | | <= {TRL_GOAL}x | "
                     f"not measured: {trl['reason']} |")  # fmt: skip
    other = {int(t): v["tokens_per_s"] for t, v in hf["by_threads"].items() if int(t) != hf["threads"]}
    if other:
        lines += ["", "transformers generate with other thread counts: "
                  + ", ".join(f"{t} thread(s) {v:,.0f} tokens/s" for t, v in other.items())]  # fmt: skip
    lines += [
        "",
        f"start-up: offline vLLM {vllm['startup_s']:.0f} s, kiln actors {kiln['startup_s']:.0f} s"
        + (f", TRL trainer {trl['startup_s']:.0f} s" if trl["status"] == "ran" else "")
        + f"; wall time {res['wall_s']:.0f} s",
        "load average (1 min; 2 = both cores busy) at the start of each part: "
        + ", ".join(f"{k} {v}" for k, v in s["load_1min"].items()) + f"; at the end {res['load_end']} (1, 5, 15 min)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 measured steps per algorithm, 1 TRL round, 2 rollout repeats")  # fmt: skip
    parser.add_argument("--steps", type=int, help="measured ppo_step calls per algorithm (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured ppo_step calls first")
    parser.add_argument("--trl-rounds", type=int, help="measured TRL generation rounds (default 2; --quick 1)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--repeats", type=int, help="timed rollout calls per engine (default 3; --quick 2)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--response-tokens", type=int, default=24, help="most tokens per response")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=352)
    parser.add_argument("--head-dim", type=int, default=32, help="vLLM's CPU attention has no kernel for 16")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size (at most)")
    parser.add_argument("--threads", type=int, help="torch threads of the transformers and TRL baselines "
                        "(default: generate with 1 and with all CPUs, the faster counts; TRL with 2, the cores "
                        "kiln's actors share)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ppo_step.json"), help="JSON results")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 5)
    args.trl_rounds = args.trl_rounds or (1 if args.quick else 2)
    args.repeats = args.repeats or (2 if args.quick else 3)

    import safetensors.torch

    from pipelines.rlhf.config import PpoConfig

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-ppo-") as tmp:
        work = Path(tmp)
        model_dir, prompts_path = build_inputs(work, args)
        p = PpoConfig.model_validate(ppo_section(model_dir, prompts_path, args, "grpo"))
        prompt_ids, pad_id, eos_id = first_batch(model_dir, prompts_path, p)
        max_model_len = p.max_prompt_tokens + p.max_response_tokens
        config = json.loads((model_dir / "config.json").read_text())
        params = sum(t.numel() for t in safetensors.torch.load_file(str(model_dir / "model.safetensors")).values())
        res: dict[str, Any] = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "setup": {"vocab": config["vocab_size"], "parameters": params, "cpus": os.cpu_count()},
        }
        load = res["setup"]["load_1min"] = {}
        load["rollout"] = round(os.getloadavg()[0], 1)
        print(f"1/3 rollout: vLLM vs transformers generate, {len(prompt_ids)} prompts x {p.samples_per_prompt}", flush=True)
        res["rollout_vllm"] = rollout_vllm(model_dir, prompt_ids, p, max_model_len, args.repeats)
        print(f"  vLLM: {res['rollout_vllm']['tokens_per_s']:,.0f} tokens/s", flush=True)
        thread_counts = [args.threads] if args.threads else sorted({1, os.cpu_count() or 1})
        res["rollout_transformers"] = rollout_transformers(model_dir, prompt_ids, p, pad_id, eos_id, args.repeats,
                                                           thread_counts)  # fmt: skip
        load["kiln"] = round(os.getloadavg()[0], 1)
        print("2/3 kiln ppo_step: GAE then GRPO", flush=True)
        res["kiln"] = kiln_steps(model_dir, prompts_path, args)
        load["trl"] = round(os.getloadavg()[0], 1)
        print("3/3 TRL GRPOTrainer", flush=True)
        if args.no_trl:
            res["trl"] = {"status": "skipped", "reason": "--no-trl"}
        else:
            res["trl"] = trl_step(model_dir, prompts_path, p, work, args.trl_rounds, args.threads or 2)
    res["wall_s"] = time.perf_counter() - t0
    res["load_end"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = table(res)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**res, "table": text}, indent=1, default=float))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()

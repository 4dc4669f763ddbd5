"""DPO: the losses against hand computations, the rows (response masks from the chat template,
bad pairs named by file:line), the config, and the stage end to end on Ray Train + DeepSpeed.

The math and data tests use no Ray and no model; the end-to-end test trains a tiny real Llama
with two ZeRO-3 workers and checks the reference log-probs stored in the dataset against a direct
computation with the starting model.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from core.config import ConfigError
from core.jsonl import BadRecord
from core.metrics import read_metrics
from pipelines.config import load_config, parse_config
from pipelines.train.datasets import dpo_rows, write_dataset, write_rows
from pipelines.train.losses import IGNORE, dpo_loss, sequence_logps
from pipelines.train.rows import RowStream

# --- losses --------------------------------------------------------------------------------------

# One pair by hand: log π(y_w) = -2, log π(y_l) = -5, log π_ref(y_w) = -3, log π_ref(y_l) = -4, β = 0.5.
# h = (-2 + 3) - (-5 + 4) = 2; β h = 1; chosen reward β(-2 + 3) = 0.5, rejected β(-5 + 4) = -0.5.
_PAIR = [torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0])]


def test_dpo_sigmoid_loss_by_hand() -> None:
    losses, chosen, rejected = dpo_loss(*_PAIR, beta=0.5, loss="sigmoid")
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)  # -log σ(1) = 0.31326
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_dpo_conservative_loss_by_hand() -> None:
    losses, _, _ = dpo_loss(*_PAIR, beta=0.5, loss="cdpo", label_smoothing=0.1)
    # -(0.9) log σ(1) - 0.1 log σ(-1) = 0.9 · 0.313262 + 0.1 · 1.313262
    assert losses.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0)), abs=1e-6)
    assert losses.item() == pytest.approx(0.413262, abs=1e-6)
    sigmoid, _, _ = dpo_loss(*_PAIR, beta=0.5, loss="cdpo", label_smoothing=0.0)
    assert sigmoid.item() == pytest.approx(dpo_loss(*_PAIR, beta=0.5)[0].item())


def test_ipo_loss_by_hand() -> None:
    # (h - 1 / (2β))² = (2 - 1)² = 1; with β = 0.25 the target margin is 2 and the loss 0.
    assert dpo_loss(*_PAIR, beta=0.5, loss="ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(*_PAIR, beta=0.25, loss="ipo")[0].item() == pytest.approx(0.0, abs=1e-12)
    # At the reference (h = 0) DPO's loss is log 2 and IPO's (1 / 2β)².
    zero = [torch.zeros(3)] * 4
    assert dpo_loss(*zero, beta=0.1)[0].tolist() == pytest.approx([math.log(2)] * 3)
    assert dpo_loss(*zero, beta=0.1, loss="ipo")[0].tolist() == pytest.approx([25.0] * 3)


@pytest.mark.parametrize("loss", ["sigmoid", "cdpo", "ipo"])
def test_dpo_gradient_raises_chosen_and_lowers_rejected(loss: str) -> None:
    chosen, rejected = torch.tensor([-3.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-4.0]), beta=0.1, loss=loss,
                            label_smoothing=0.1 if loss == "cdpo" else 0.0)  # fmt: skip
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(chosen, rejected, chosen, rejected, beta=0.1, loss="hinge")  # type: ignore[arg-type]


def test_sequence_logps_sums_the_labelled_tokens_only() -> None:
    logits = torch.zeros(2, 4, 3)  # (B=2, T=4, V=3)
    logits[0, 1] = torch.tensor([0.0, 2.0, 0.0])  # position 1 predicts token 1 with p = e²/(e² + 2)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 0], [IGNORE, IGNORE, IGNORE, IGNORE]])
    got = sequence_logps(logits, labels)
    # Row 0: targets at t = 2 (token 1, from position 1) and t = 3 (token 0, from position 2, uniform).
    expected = (2.0 - math.log(math.exp(2.0) + 2.0)) + math.log(1 / 3)
    assert got[0].item() == pytest.approx(expected, abs=1e-6)
    assert got[1].item() == 0.0  # nothing labelled


# --- rows -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):  # noqa: ANN201 - a transformers tokenizer
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def _labelled(tok, ids: np.ndarray, labels: np.ndarray) -> str:  # noqa: ANN001
    return tok.decode([int(i) for i, label in zip(ids, labels) if label != IGNORE])


def test_dpo_rows_mask_everything_but_the_response(tok) -> None:  # noqa: ANN001
    plain = ("p.jsonl:1", {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."})
    chat = ("p.jsonl:2", {
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "What is 1 + 1?"}],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": "3",
    })  # fmt: skip
    rows, stats = dpo_rows(tok, [plain, chat], seq_len=64, overlong="truncate")
    assert set(rows) == {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}
    assert all(a.shape == (2, 64) and a.dtype == np.int32 for a in rows.values())
    assert _labelled(tok, rows["chosen_ids"][0], rows["chosen_labels"][0]) == "2 + 3 = 5.<|im_end|>"
    assert _labelled(tok, rows["rejected_ids"][0], rows["rejected_labels"][0]) == "2 + 3 = 6.<|im_end|>"
    # The earlier assistant turn of a chat prompt is context, not compared.
    assert _labelled(tok, rows["chosen_ids"][1], rows["chosen_labels"][1]) == "2<|im_end|>"
    assert _labelled(tok, rows["rejected_ids"][1], rows["rejected_labels"][1]) == "3<|im_end|>"
    # The ids are the chat template's own tokens, right-padded.
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    template = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert rows["chosen_ids"][0, : len(template)].tolist() == list(template)
    assert rows["chosen_ids"][0, -1] == tok.pad_token_id and rows["chosen_labels"][0, -1] == IGNORE
    assert stats.records == 2 and stats.truncated == 0 and stats.trained_tokens < stats.tokens


def test_dpo_rows_truncate_keeps_the_response_or_reject_names_the_line(tok) -> None:  # noqa: ANN001
    long = ("prefs.jsonl:7", {"prompt": "What is 4 + 4? " * 10, "chosen": "8", "rejected": "9"})
    rows, stats = dpo_rows(tok, [long], seq_len=20, overlong="truncate")
    assert stats.truncated == 2
    assert _labelled(tok, rows["chosen_ids"][0], rows["chosen_labels"][0]) == "8<|im_end|>"
    with pytest.raises(BadRecord, match=r"prefs.jsonl:7: chosen: \d+ tokens exceed seq_len 20"):
        dpo_rows(tok, [long], seq_len=20, overlong="reject")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "2"}, "chosen and rejected are identical"),
        ({"prompt": "What is 1 + 1?", "chosen": "  ", "rejected": "3"}, "chosen is empty"),
        ({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": ""}, "rejected is empty"),
        ({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": [{"role": "assistant", "content": ""}]}, "rejected is empty"),
        ({"prompt": "What is 1 + 1?", "chosen": "2"}, r"missing \['rejected'\]"),
        ({"prompt": "What is 1 + 1?", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"},
         "chosen has no assistant message"),
    ],
)  # fmt: skip
def test_bad_pairs_are_named_by_file_and_line(tok, record: dict[str, Any], message: str) -> None:  # noqa: ANN001
    good = ("prefs.jsonl:1", {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"})
    with pytest.raises(BadRecord, match=f"prefs.jsonl:2: {message}"):
        dpo_rows(tok, [good, ("prefs.jsonl:2", record)], seq_len=64, overlong="truncate")


def test_float_columns_round_trip_through_parquet(tmp_path: Path) -> None:
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    logp = np.array([-1.25, -2.5, -1e-9])
    write_rows(tmp_path / "t.parquet", {"chosen_ids": ids, "ref_chosen_logp": logp})
    assert pq.read_schema(tmp_path / "t.parquet").field("ref_chosen_logp").type == "double"
    stream = RowStream((str(tmp_path / "t.parquet"),), ("chosen_ids", "ref_chosen_logp"), seed=0, shuffle=False)
    rows = stream.rows(0, np.array([2, 0]))
    assert rows["chosen_ids"].dtype == np.int64 and rows["chosen_ids"].tolist() == [ids[2].tolist(), ids[0].tolist()]
    assert rows["ref_chosen_logp"].dtype == np.float64 and rows["ref_chosen_logp"].tolist() == [-1e-9, -1.25]


def test_max_records_reads_only_the_first_pairs(tok, tmp_path: Path) -> None:  # noqa: ANN001
    """``dpo.max_pairs``: the dataset (and so the reference pass) covers the first N records; a bad
    record after them is never read."""
    data = tmp_path / "prefs.jsonl"
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in pairs) + "\n{not json\n")
    scored: list[int] = []

    def reference(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scored.append(len(rows["chosen_ids"]))
        return {"ref_chosen_logp": np.zeros(len(rows["chosen_ids"])), "ref_rejected_logp": np.zeros(len(rows["chosen_ids"]))}

    folder, stats, held_out = write_dataset(tmp_path / "dpo", data, lambda r: dpo_rows(tok, r, 64, "truncate"), 0.25,
                                            add_columns=reference, max_records=4)  # fmt: skip
    assert stats.records + held_out == 4 and sum(scored) == 4
    assert pq.read_table(folder / "train.parquet").num_rows == stats.records
    # A resumed stage keeps the dataset it wrote: no second reference pass, the same figures back.
    again = write_dataset(tmp_path / "dpo", data, lambda r: dpo_rows(tok, r, 64, "truncate"), 0.25,
                          add_columns=reference, max_records=4)  # fmt: skip
    assert again == (folder, stats, held_out) and sum(scored) == 4
    with pytest.raises(BadRecord, match=rf"{data}:7"):
        write_dataset(tmp_path / "all", data, lambda r: dpo_rows(tok, r, 64, "truncate"), 0.25)


# --- config ---------------------------------------------------------------------------------------


def test_dpo_section_is_strict() -> None:
    cfg = parse_config({"run": {"name": "t"}, "dpo": {"data": "p.jsonl"}})
    assert cfg.dpo is not None and cfg.dpo.loss == "sigmoid" and cfg.dpo.beta == 0.1 and cfg.dpo.init_from is None
    with pytest.raises(ConfigError, match=r"dpo\.betta: Extra inputs are not permitted"):
        parse_config({"run": {"name": "t"}, "dpo": {"data": "p.jsonl", "betta": 0.1}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"dpo\.loss"):
        parse_config({"run": {"name": "t"}, "dpo": {"data": "p.jsonl", "loss": "hinge"}})
    with pytest.raises(ConfigError, match=r"dpo\.beta"):
        parse_config({"run": {"name": "t"}, "dpo": {"data": "p.jsonl", "beta": 0.0}})
    with pytest.raises(ConfigError, match="cdpo needs label_smoothing > 0"):
        parse_config({"run": {"name": "t"}, "dpo": {"data": "p.jsonl", "loss": "cdpo"}})
    with pytest.raises(ConfigError, match="label_smoothing applies to loss cdpo only"):
        parse_config({"run": {"name": "t"}, "dpo": {"data": "p.jsonl", "label_smoothing": 0.1}})
    assert parse_config({"run": {"name": "t"}, "dpo": {"data": "p", "loss": "cdpo", "label_smoothing": 0.1}}).dpo


def test_quickstart_dpo_config_adds_only_dpo() -> None:
    """configs/quickstart-dpo.yaml is the quickstart plus DPO: every other section hashes alike, so
    after the quickstart it runs DPO (after the reward model, before PPO) and eval only."""
    from pipelines.cli import STAGES

    configs = Path(__file__).parents[1] / "configs"
    quickstart, with_dpo = load_config(configs / "quickstart.yaml"), load_config(configs / "quickstart-dpo.yaml")
    assert quickstart.dpo is None and with_dpo.dpo is not None and with_dpo.dpo.data == with_dpo.reward_model.data[0]
    for section in STAGES:
        if section != "dpo" and getattr(quickstart, section) is not None:
            assert quickstart.digest(section) == with_dpo.digest(section), section
    order = list(STAGES)
    assert order.index("reward_model") < order.index("dpo") < order.index("ppo")


# --- end to end -----------------------------------------------------------------------------------


def _direct_logps(model: torch.nn.Module, ids: np.ndarray, labels: np.ndarray) -> list[float]:
    """Σ_t log p(ids[t+1] | ids[..t]) over the labelled targets, one sequence at a time."""
    out = []
    for row_ids, row_labels in zip(ids, labels):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.from_numpy(row_ids[None]).long()).logits[0].double(), dim=-1)
        out.append(sum(logp[t, int(row_ids[t + 1])].item() for t in range(len(row_ids) - 1) if row_labels[t + 1] != IGNORE))
    return out


@pytest.mark.slow
def test_dpo_stage_end_to_end(ray_local: None, tiny_tokenizer_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``kiln dpo`` on a tiny Llama, 2 workers under ZeRO-3: the reference's stored log-probs equal a
    direct computation with the starting model; the loss falls, the implicit-reward accuracy and
    margin rise (training and held-out); the export is a causal LM that ``kiln eval`` picks up.

    The pairs are the quickstart's whose rejected answer rambles: a randomly initialised model
    cannot tell a right sum from a wrong one in 20 steps, but it can learn to prefer the answer.
    """
    from transformers import AutoModelForCausalLM

    from pipelines.eval.inputs import stage_models
    from pipelines.quickstart.config import GenerateConfig
    from pipelines.quickstart.generate import generate
    from pipelines.train import dpo

    corpus = tmp_path / "corpus"
    generate(GenerateConfig(out_dir=str(corpus), seed=5, num_documents=100, exact_duplicates=0, near_duplicates=0,
                            junk_documents=0, sft_examples=10, preference_pairs=2000, ppo_prompts=10, eval_prompts=10))  # fmt: skip
    lines = [line for line in (corpus / "preferences.jsonl").read_text().splitlines() if not json.loads(line)["same_format"]]
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    section = {"data": str(tmp_path / "prefs.jsonl"), "init_from": str(tiny_llama_dir), "seq_len": 64,
               "validation_fraction": 0.2, "num_workers": 2, "cpus_per_worker": 1.0, "threads_per_worker": 1,
               "zero_stage": 3, "sequences_per_step": 16, "micro_batch_per_worker": 4, "max_steps": 20,
               "learning_rate": 1.0e-3, "warmup_steps": 3, "beta": 0.1, "log_every_steps": 5,
               "eval_every_steps": 10, "eval_batches": 6, "checkpoint_every_steps": 10, "max_failures": 0}  # fmt: skip
    cfg = parse_config({"run": {"name": "dpo", "root": str(tmp_path / "runs")}, "ray": {"num_cpus": 2}, "dpo": section})
    t0 = time.perf_counter()
    summary = dpo.run(cfg)
    print(f"dpo stage: {time.perf_counter() - t0:.1f} s, {summary}")
    stage_dir = cfg.run.dir / "dpo"

    # The reference's log-probs, computed once and stored: equal to the starting model's own.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    table = pq.read_table(stage_dir / "dataset" / "validation.parquet").slice(0, 12).to_pydict()
    for side in ("chosen", "rejected"):
        ids, labels = (np.array(table[f"{side}_{kind}"]) for kind in ("ids", "labels"))
        assert table[f"ref_{side}_logp"] == pytest.approx(_direct_logps(model, ids, labels), abs=1e-4)
        assert all((row != IGNORE).sum() >= 2 for row in labels)  # a response and its end-of-turn token

    # Learning: the loss falls from log 2, the implicit-reward accuracy and margin rise.
    steps = [m for m in read_metrics(stage_dir) if "loss" in m and "event" not in m]
    assert [m["step"] for m in steps] == [5, 10, 15, 20]
    first, last = steps[0], steps[-1]
    assert first["loss"] < math.log(2) + 0.01 and last["loss"] < first["loss"] - 0.2, steps  # from log 2 at step 0
    assert last["accuracy"] >= 0.9 and last["accuracy"] > first["accuracy"] and last["margin"] > first["margin"] > 0, steps
    assert last["chosen_reward"] > last["rejected_reward"]
    evals = [m for m in read_metrics(stage_dir) if "val_loss" in m]
    assert [m["step"] for m in evals] == [10, 20] and evals[1]["val_margin"] > evals[0]["val_margin"] > 0, evals
    assert summary["val_loss"] < math.log(2) - 0.2 and summary["val_accuracy"] >= 0.9, summary
    # Held out by prompt (every pair of a held-out prompt), as write_dataset splits them.
    from pipelines.train.datasets import prompt_key, split_validation

    train, held = split_validation([(str(n), json.loads(line)) for n, line in enumerate(lines)], 0.2, key=prompt_key)
    assert summary["pairs"] == len(train) and summary["held_out_pairs"] == len(held) and held
    assert summary["steps"] == 20 and summary["truncated"] > 0  # the rambles outgrow 64 tokens

    # The export: a causal LM with the tokenizer, found by kiln eval as the run's `dpo` model.
    exported = AutoModelForCausalLM.from_pretrained(str(stage_dir / "model"))
    assert exported.config.num_hidden_layers == 2 and (stage_dir / "model" / "tokenizer.json").is_file()
    assert [t.name for t in stage_models(cfg.run.dir)] == ["dpo"]
    assert json.loads((stage_dir / "stage.json").read_text())["summary"] == summary
    t0 = time.perf_counter()
    assert dpo.run(cfg) == summary and time.perf_counter() - t0 < 5  # finished: a no-op


def test_dpo_bad_pair_fails_before_training_naming_the_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """An identical pair on line 3: the stage stops naming file:line, having trained and written nothing."""
    from pipelines.train import dpo

    data = tmp_path / "prefs.jsonl"
    good = {"prompt": "What is 1 + 2?", "chosen": "1 + 2 = 3.", "rejected": "1 + 2 = 4."}
    same = {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "2 + 2 = 4."}
    data.write_text("\n".join(json.dumps(r) for r in (good, good, same, good)) + "\n")
    cfg = parse_config({"run": {"name": "bad", "root": str(tmp_path / "runs")},
                        "dpo": {"data": str(data), "init_from": str(tiny_llama_dir), "validation_fraction": 0.0}})  # fmt: skip
    with pytest.raises(BadRecord, match=rf"{data}:3: chosen and rejected are identical"):
        dpo.run(cfg)
    stage_dir = cfg.run.dir / "dpo"
    assert not (stage_dir / "dataset").exists() and not (stage_dir / "ray").exists()
    assert not (stage_dir / "model").exists() and not (stage_dir / "stage.json").exists()


@pytest.mark.parametrize(("loss", "smoothing"), [("sigmoid", 0.0), ("cdpo", 0.2), ("ipo", 0.0)])
def test_worker_dpo_forward_at_the_reference(tok, tiny_llama_dir: Path, loss: str, smoothing: float) -> None:  # noqa: ANN001
    """The worker's DPO micro batch on a real tiny model whose reference log-probs are its own:
    every implicit reward is 0, so the loss is log 2 (sigmoid, cdpo) or (1 / 2β)² (IPO)."""
    from transformers import AutoModelForCausalLM

    from pipelines.train.config import DpoConfig
    from pipelines.train.worker import TrainJob, _forward, _metrics

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    records = [(f"p:{i}", {"prompt": f"What is {i} + 1?", "chosen": f"{i} + 1 = {i + 1}.", "rejected": "No idea."})
               for i in range(3)]  # fmt: skip
    rows, _ = dpo_rows(tok, records, seq_len=48, overlong="truncate")
    batch = {k: torch.from_numpy(v).long() for k, v in rows.items()}
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            batch[f"ref_{side}_logp"] = sequence_logps(model(input_ids=batch[f"{side}_ids"]).logits, batch[f"{side}_labels"]).double()
    cfg = DpoConfig(data="p.jsonl", loss=loss, beta=0.25, label_smoothing=smoothing, num_workers=1, micro_batch_per_worker=3,
                    sequences_per_step=3, warmup_steps=0)  # fmt: skip
    job = TrainJob(stage="dpo", objective="dpo", train=cfg, stage_dir="", tokenizer_dir="", train_files=(), validation_files=())
    with torch.no_grad():
        mean_loss, sums, tokens = _forward(model, job, batch, tok.pad_token_id)
    expected = 4.0 if loss == "ipo" else math.log(2)  # (1 / (2 · 0.25))² = 4
    assert mean_loss.item() == pytest.approx(expected, abs=1e-4) and tokens == 2 * 3 * 48
    figures = _metrics(sums, "dpo", held_out=True)
    assert figures["val_loss"] == pytest.approx(expected, abs=1e-4) and abs(figures["val_margin"]) < 1e-4
    assert set(figures) == {"val_loss", "val_accuracy", "val_chosen_reward", "val_rejected_reward", "val_margin"}

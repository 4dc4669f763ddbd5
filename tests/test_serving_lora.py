"""LoRA adapters served by name: the driver's checks of ``serve.adapters`` and ``--adapter``, and a
real Ray Serve + vLLM (CPU) endpoint serving a tiny Llama with two PEFT adapters written by
``peft`` itself, called with the official ``openai`` client. Each adapter's prompt log-probs equal
``peft``'s own forward of the same adapter; the base model's equal ``transformers``'.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from core.config import ConfigError
from pipelines.cli import adapter_flags
from serving.adapters import Adapter, check_adapters, lora_engine_args, model_cards

MODEL = "tiny"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINE = {"dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.3, "cpu_kv_cache_gib": 1}


def write_adapter(base_dir: Path, out: Path, rank: int, seed: int) -> Path:
    """A LoRA adapter of ``base_dir`` saved by ``peft``, its B matrices random (as if trained: peft
    starts them at zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(str(out))
    return out


# --- the driver's checks ---------------------------------------------------------------------------


def test_adapter_checks_name_the_key_and_the_problem(tiny_llama_dir: Path, tmp_path: Path) -> None:
    good = write_adapter(tiny_llama_dir, tmp_path / "good", rank=4, seed=0)
    assert check_adapters({"math": str(good)}, MODEL) == [Adapter("math", str(good.resolve()), 4)]

    def fails(adapters: dict[str, str], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            check_adapters(adapters, MODEL)

    fails({MODEL: str(good)}, rf"serve.adapters.{MODEL}: the base model is already served as '{MODEL}'")
    fails({"two words": str(good)}, r"serve.adapters.two words: a name is 1-128 letters")
    fails({"gone": str(tmp_path / "nowhere")}, r"serve.adapters.gone: .*nowhere is not a PEFT adapter directory")
    fails({"model": str(tiny_llama_dir)}, r"serve.adapters.model: .* \(no adapter_config.json\)")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    fails({"bare": str(bare)}, r"serve.adapters.bare: .*bare has no adapter weights")
    (bare / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    config = json.loads((good / "adapter_config.json").read_text())
    for change, match in (({"peft_type": "IA3"}, "peft_type is 'IA3'; only LORA adapters are served"),
                          ({"r": 0}, "the LoRA rank 'r' must be a positive integer"),
                          ({"r": 4, "rank_pattern": {"q_proj": 600}}, "LoRA rank 600 is above the largest vLLM accepts")):
        (bare / "adapter_config.json").write_text(json.dumps({**config, **change}))
        fails({"bare": str(bare)}, rf"serve.adapters.bare: .*{match}")
    (bare / "adapter_config.json").write_text("{not json")
    fails({"bare": str(bare)}, r"serve.adapters.bare: .*adapter_config.json is not valid JSON")


def test_a_bad_adapter_stops_build_app_before_serve_starts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from serving.app import build_app

    with pytest.raises(ValueError, match=r"serve.adapters.x: .* is not a PEFT adapter directory"):
        build_app({"model": str(tiny_llama_dir), "adapters": {"x": str(tmp_path)}})


def test_adapter_flags_add_to_the_config() -> None:
    assert adapter_flags(["b=dir/b", "c=x=y"], {"a": "dir/a"}) == {"a": "dir/a", "b": "dir/b", "c": "x=y"}
    for item, match in (("b", "is not name=dir"), ("=dir", "is not name=dir"), ("a=other", "'a' is already served")):
        with pytest.raises(ConfigError, match=rf"--adapter: '{item}'.*{match}"):
            adapter_flags([item], {"a": "dir/a"})


def test_one_engine_holds_every_adapter_and_models_lists_them() -> None:
    adapters = [Adapter("a", "/x", 4), Adapter("b", "/y", 12)]
    assert lora_engine_args([]) == {}
    assert lora_engine_args(adapters) == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2}
    cards = model_cards(MODEL, 7, 256, adapters)
    assert [c["id"] for c in cards] == [MODEL, "a", "b"] and "parent" not in cards[0]
    # No directory paths: they are the server's business.
    assert all(c["parent"] == MODEL and c["max_model_len"] == 256 and a.path not in json.dumps(c)
               for a, c in zip(adapters, cards[1:]))


# --- a real endpoint ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(ray_local: None, tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from ray import serve

    from serving.app import build_app

    root = tmp_path_factory.mktemp("serve-lora")
    base = save_tiny_llama(tiny_tokenizer_dir, root / "tiny-llama")
    adapters = {"sum": write_adapter(base, root / "sum", rank=8, seed=1),
                "other": write_adapter(base, root / "other", rank=4, seed=2)}  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slow_ok = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options={"runtime_env": {"env_vars": slow_ok}})
    app = build_app({"model": str(base), "model_name": MODEL, "num_cpus": 0.5, "engine": ENGINE,
                     "api_key_env": "KILN_TEST_NO_SUCH_VAR", "adapters": {k: str(v) for k, v in adapters.items()}})
    try:
        serve.run(app, name="lora", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "base": base, "adapters": adapters}
    finally:
        serve.shutdown()


def _reference_logprobs(base: Path, adapter: Path | None, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 from transformers (with ``peft``'s adapter when given)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return [logits[t - 1, ids[t]].item() for t in range(1, len(ids))]


@pytest.mark.slow
def test_adapters_are_served_by_name_with_the_openai_client(lora_server: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{lora_server['url']}/v1", api_key="unused", max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, "sum", "other"]
    assert [getattr(m, "parent", None) for m in models] == [None, MODEL, MODEL]

    # Each model's prompt log-probs (echo) equal transformers' / peft's forward of the same weights.
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(lora_server["base"])).encode("What is 12 + 7? 19. The quick brown fox jumps")
    served = {}
    for name, adapter in ((MODEL, None), ("sum", lora_server["adapters"]["sum"]), ("other", lora_server["adapters"]["other"])):
        c = client.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
        assert c.model == name
        served[name] = c.choices[0].logprobs.token_logprobs[1 : len(ids)]
        expected = _reference_logprobs(lora_server["base"], adapter, ids)
        assert max(abs(a - b) for a, b in zip(served[name], expected)) < 1e-3, name
    # ... and the adapters do change the model.
    assert max(abs(a - b) for a, b in zip(served["sum"], served[MODEL])) > 0.05
    assert max(abs(a - b) for a, b in zip(served["sum"], served["other"])) > 0.05

    # Chat, streamed, by the adapter's name: every chunk says which model answered.
    chunks = list(client.chat.completions.create(model="sum", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert chunks and all(ch.model == "sum" for ch in chunks)
    whole = client.chat.completions.create(model="sum", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                           max_tokens=8, temperature=0)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content

    with pytest.raises(openai.NotFoundError, match="The model 'nope' does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)

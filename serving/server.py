"""``kiln serve``: start Ray and Serve, run the app, and block until Ctrl-C."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from pipelines.config import ConfigError, KilnConfig, RayConfig, load_config
from serving.config import ServeConfig

# Stages whose output is a servable (generative) model, latest first.
_MODEL_STAGES = ("ppo", "sft", "pretrain")


def final_model_dir(cfg: KilnConfig) -> Path:
    """The model of the last stage of the run that wrote one (``<run>/<stage>/model``).

    Raises:
        ConfigError: no stage of the run has written a model yet.
    """
    for stage in _MODEL_STAGES:
        candidate = cfg.run.dir / stage / "model"
        if (candidate / "config.json").is_file():
            return candidate
    looked = ", ".join(str(cfg.run.dir / s / "model") for s in _MODEL_STAGES)
    raise ConfigError(f"serve.model is not set and the run has no final model yet (looked in {looked})")


def resolve_target(target: Path) -> tuple[RayConfig, ServeConfig]:
    """Ray and serve settings for a model directory or a kiln config file."""
    if target.is_dir():
        return RayConfig(), ServeConfig(model=str(target))
    cfg = load_config(target)
    serve_cfg = cfg.serve or ServeConfig()
    if serve_cfg.model is None:
        serve_cfg = serve_cfg.model_copy(update={"model": str(final_model_dir(cfg))})
    return cfg.ray, serve_cfg


def ask(cfg: ServeConfig, prompt: str, timeout_s: float = 60.0) -> str:
    """Send one greedy chat request to the running endpoint and return the answer's text."""
    from serving.auth import resolve_api_key

    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    body = {"model": cfg.model_name or Path(cfg.model or "").resolve().name, "max_tokens": 32, "temperature": 0.0,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if key := resolve_api_key(cfg.api_key, cfg.api_key_env):
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"http://{host}:{cfg.port}/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def serve_forever(target: Path, host: str | None = None, port: int | None = None, first_prompt: str | None = None) -> None:
    """Serve a model directory (or a config's ``serve:`` model) until interrupted.

    Args:
        target: a Hugging Face model directory, or a kiln YAML config.
        host: overrides ``serve.host`` (explicitly, from the command line).
        port: overrides ``serve.port``.
        first_prompt: once the endpoint is up, ask it this over HTTP and print the answer.
    """
    from ray import serve

    from cluster.runtime import init_ray
    from serving.app import build_app

    ray_cfg, cfg = resolve_target(target)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if overrides:
        # Re-validate: an override is held to the same rules as the config file.
        cfg = ServeConfig.model_validate({**cfg.model_dump(), **overrides})
    app = build_app(cfg)  # validates the model directory before anything starts
    init_ray(ray_cfg)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    print(f"kiln serve: starting {cfg.model} (the first start takes a minute) ...", flush=True)
    serve.run(app, name="kiln", route_prefix="/")
    name = cfg.model_name or Path(cfg.model or "").resolve().name
    print(f"kiln serve: model '{name}' at http://{cfg.host}:{cfg.port}/v1 (OpenAI API); Ctrl-C stops", flush=True)
    if first_prompt is not None:
        print(f"kiln serve: asked {first_prompt!r}, the model answered {ask(cfg, first_prompt)!r}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("kiln serve: shutting down", flush=True)
    finally:
        serve.shutdown()

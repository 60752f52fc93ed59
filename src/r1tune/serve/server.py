"""`r1tune serve RUN.yaml`: load what the config names (a run's output, or LLaMA-Factory style
model_name_or_path + adapter_name_or_path), plus any serve_adapters, and serve it with uvicorn.

Binds 127.0.0.1 unless --host says otherwise; an API key, when R1TUNE_API_KEY is set, is required
as `Authorization: Bearer KEY` on every endpoint except /health.
"""

from __future__ import annotations

from r1tune.errors import UserError


def serve(cfg, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    try:
        import uvicorn

        from r1tune.serve.app import create_app
    except ImportError as exc:
        raise UserError(f"r1tune serve needs the server packages ({exc.name} is missing); "
                        "install them with pip install 'r1tune[serve]'") from None
    from r1tune.serve.handler import BatchOptions, ServeLimits
    from r1tune.serve.models import load_served

    served = load_served(cfg)
    limits = ServeLimits(cfg.serve_max_body_bytes, cfg.serve_max_prompt_tokens, cfg.serve_max_tokens)
    options = BatchOptions(cfg.serve_max_batch_size, cfg.serve_batch_wait_ms / 1000, cfg.serve_max_queue)
    app = create_app(served, api_key=api_key, limits=limits, options=options)
    names = ", ".join(served.entries)
    print(f"serving {names} on http://{host}:{port}/v1 (OpenAI-compatible; batches of up to "
          f"{options.max_batch})" + ("; API key required" if api_key else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning")

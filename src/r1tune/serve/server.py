"""`r1tune serve RUN.yaml`: load the run's output (any adapter or a full model) and serve it with uvicorn.

Binds 127.0.0.1 unless --host says otherwise; an API key, when R1TUNE_API_KEY is set, is required
as `Authorization: Bearer KEY` on every endpoint except /health.
"""

from __future__ import annotations

from pathlib import Path

from r1tune.errors import UserError


def serve(cfg, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    try:
        import uvicorn

        from r1tune.serve.app import create_app
    except ImportError as exc:
        raise UserError(f"r1tune serve needs the server packages ({exc.name} is missing); "
                        "install them with pip install 'r1tune[serve]'") from None
    from r1tune.serve.chat import load_for_chat

    folder = Path(cfg.output_dir)
    if not (folder / "r1tune_config.yaml").is_file():
        raise UserError(f"output_dir '{folder}' holds no trained model; run 'r1tune train' with this config first")
    model, tokenizer = load_for_chat(str(folder))
    app = create_app(model, tokenizer, model_name=folder.name, api_key=api_key)
    print(f"serving {folder.name} on http://{host}:{port}/v1 (OpenAI-compatible)"
          + ("; API key required" if api_key else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning")

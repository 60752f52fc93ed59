"""r1tune serve under load: dynamic batching vs one request at a time, same model and requests.

    python bench/serve_load.py                          # tiny DeepSeek-V3 (hidden 256, 4 layers), 1/8/32 clients
    python bench/serve_load.py --arch qwen2 --requests 96 --markdown docs/img/serve_load.md --plot docs/img/serve_load.png

For each mode the server runs in its own process (`--serve`, the same create_app as `r1tune serve`),
so client and server do not share a Python interpreter. "batched" is the default engine
(serve_max_batch_size 32: requests join the running batch between decoding steps); "one at a time"
is the same server with serve_max_batch_size 1, i.e. one request generates while the others wait,
as r1tune serve did before batching. Every client sends chat requests back to back (greedy,
`--max-tokens` new tokens each, prompts from the quickstart data, different per request), so both
modes generate the same tokens. Reported per concurrency level: requests/s, generated tokens/s,
p50 and p99 latency (request sent to full response received), failed requests, and the speed-up
of batched over one at a time. Before the timed requests each server answers a few warm-up requests.
A last row per level, "engine, no HTTP", runs the same requests through the batching engine in this
process (one thread per client, no server): the gap to "batched" is what HTTP, JSON and the server's
threads cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"one at a time": 1, "batched": 32}  # 32: serve_max_batch_size's default
ENGINE = "engine, no HTTP"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(model_dir: str, port: int, max_batch: int) -> None:
    """--serve: the server process."""
    import torch
    import uvicorn

    from r1tune.models.loading import load_model, load_tokenizer
    from r1tune.serve.app import create_app
    from r1tune.serve.handler import BatchOptions
    from r1tune.serve.models import single

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    app = create_app(single(model, tokenizer, "bench"), options=BatchOptions(max_batch=max_batch, max_queue=1024))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "examples" / "data" / "parity.jsonl").read_text().splitlines()]
    users = [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]
    return [users[i % len(users)] for i in range(n)]


async def drive(url: str, clients: int, prompts: list[str], max_tokens: int) -> dict:
    """`clients` workers send the prompts back to back; latencies and token counts."""
    import httpx

    todo, latencies, tokens, failed = list(prompts), [], 0, 0

    async def worker(client):
        nonlocal tokens, failed
        while todo:
            body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": todo.pop()}]}
            start = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                failed += 1
            else:
                tokens += r.json()["usage"]["completion_tokens"]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return summary(latencies, len(prompts), tokens, wall, failed)


def drive_engine(model_dir: str, clients: int, prompts: list[str], max_tokens: int) -> dict:
    """The batched engine without HTTP: `clients` threads submit the prompts back to back."""
    import threading

    from r1tune.models.loading import load_model, load_tokenizer
    from r1tune.models.decode import eos_ids_of
    from r1tune.serve.engine import Engine
    from r1tune.models.sampling import Params
    from r1tune.serve.ticket import Generated, Ticket

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    engine, eos = Engine(model, tokenizer.pad_token_id, max_batch=MODES["batched"]), eos_ids_of(model, tokenizer)
    todo, latencies, tokens = list(prompts), [], [0]

    def worker():
        while todo:
            text = todo.pop()
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            start = time.perf_counter()
            *_, done = engine.submit(Ticket(ids, Params(max_tokens), None, eos)).read(tokenizer, [])
            latencies.append(time.perf_counter() - start)
            tokens[0] += done.completion_tokens if isinstance(done, Generated) else 0
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    engine.close()
    return summary(latencies, len(prompts), tokens[0], wall, failed=0)


def summary(latencies: list[float], requests: int, tokens: int, wall: float, failed: int) -> dict:
    latencies = sorted(latencies)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"requests": requests, "wall_s": wall, "req_per_s": requests / wall, "tok_per_s": tokens / wall,
            "p50_s": pick(0.5), "p99_s": pick(0.99), "failed": failed, "tokens": tokens}


def start_server(model_dir: str, max_batch: int):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", model_dir, "--port", str(port),
                             "--max-batch", str(max_batch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.25)
        if proc.poll() is not None:
            raise SystemExit("server failed:\n" + proc.stdout.read())
    raise SystemExit("server did not start")


def count(requests: int, clients: int) -> int:
    """Requests at one concurrency level: a quarter for one client (same kind, less waiting)."""
    return max(requests // 4, clients) if clients == 1 else requests


def measure(model_dir: str, levels: list[int], requests: int, max_tokens: int) -> dict:
    results = {}
    for mode, max_batch in MODES.items():
        proc, url = start_server(model_dir, max_batch)
        try:
            asyncio.run(drive(url, 2, questions(4), max_tokens))  # warm-up
            for clients in levels:
                results[(mode, clients)] = asyncio.run(drive(url, clients, questions(count(requests, clients)), max_tokens))
                r = results[(mode, clients)]
                print(f"{mode:>13} {clients:>3} clients: {r['req_per_s']:.2f} req/s, {r['tok_per_s']:.0f} tok/s, "
                      f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, failed {r['failed']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for clients in levels:
        results[(ENGINE, clients)] = r = drive_engine(model_dir, clients, questions(count(requests, clients)), max_tokens)
        print(f"{ENGINE:>13} {clients:>3} clients: {r['tok_per_s']:.0f} tok/s, p50 {r['p50_s']:.2f} s", flush=True)
    return results


def table(results: dict, levels: list[int]) -> list[str]:
    lines = ["| clients | mode | requests | req/s | tokens/s | p50 latency | p99 latency | failed | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for clients in levels:
        base = results[("one at a time", clients)]["tok_per_s"]
        for mode in (*MODES, ENGINE):
            r = results[(mode, clients)]
            speed = f"{r['tok_per_s'] / base:.2f}x" if mode != "one at a time" else ""
            lines.append(f"| {clients} | {mode} | {r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:,.0f} | "
                         f"{r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {r['failed']} | {speed} |")
    return lines


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from r1tune.fileio import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        left.plot(levels, [results[(mode, c)]["tok_per_s"] for c in levels], marker="o", label=mode)
        right.plot(levels, [results[(mode, c)]["p99_s"] for c in levels], marker="o", label=mode)
    left.set(xlabel="concurrent clients", ylabel="generated tokens/s", title="throughput", xscale="log")
    right.set(xlabel="concurrent clients", ylabel="seconds", title="p99 latency", xscale="log", yscale="log")
    for ax in (left, right):
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["deepseek_v3", "qwen2"], default="deepseek_v3")
    parser.add_argument("--model", help="a model folder (default: a tiny model built for the run)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=96, help="requests per level (a quarter for 1 client)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--plot", help="write a PNG of throughput and p99 latency here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve, args.port, args.max_batch)
        return 0
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from r1tune.models.tiny import build_tiny

            model_dir = str(build_tiny(Path(tmp) / "model", args.arch))
        results = measure(model_dir, levels, args.requests, args.max_tokens)
    lines = table(results, levels)
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.plot:
        plot(results, levels, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())

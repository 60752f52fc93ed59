"""Several LoRA adapters over one base in one server, chosen by the request's `model` field."""

from __future__ import annotations

import threading

import openai
import pytest
import torch

from r1tune.errors import UserError
from r1tune.serve.app import create_app
from r1tune.serve.models import load_served
from r1tune.train.stages.sft import run_sft
from tests.conftest import make_cfg
from tests.test_serve import serve

PROMPT = "Is 4827 even or odd?"


@pytest.fixture(scope="module")
def runs(tiny_ds, tmp_path_factory):
    from tests.conftest import PARITY

    root = tmp_path_factory.mktemp("adapters")
    data = root / "data.jsonl"
    data.write_text("\n".join(PARITY.read_text(encoding="utf-8").splitlines()[:32]) + "\n", encoding="utf-8")
    outs = {}
    for name, lr in (("a", 3e-3), ("b", 1e-2)):
        outs[name] = root / name
        run_sft(make_cfg(tiny_ds, data, outs[name], max_steps=4, learning_rate=lr, bf16=False))
    return tiny_ds, data, outs


def expected_text(model, tokenizer, max_new_tokens=10) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_each_name_answers_as_its_own_model(runs):
    from transformers import AutoModelForCausalLM

    from r1tune.models.run_loading import load_run

    base, data, outs = runs
    want = {name: expected_text(*load_run(str(out))) for name, out in outs.items()}
    _, tokenizer = load_run(str(outs["a"]))
    want["base"] = expected_text(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tokenizer)
    assert len(set(want.values())) == 3, "the adapters must change the output for this test to mean anything"

    cfg = make_cfg(base, data, outs["a"], serve_adapters={"b": str(outs["b"])}, serve_base_name="base")
    served = load_served(cfg)
    assert list(served.entries) == ["a", "b", "base"]
    server, thread, url = serve(create_app(served))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["a", "b", "base"]
        got, errors = {}, []

        def ask(name):
            try:  # every name at once: the engine must switch adapters between batches
                got[name] = client.completions.create(model=name, prompt=PROMPT, max_tokens=10).choices[0].text
            except Exception as exc:  # surfaced below
                errors.append(exc)
        threads = [threading.Thread(target=ask, args=(n,)) for n in ["a", "b", "base", "b", "a"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and got == want
        with pytest.raises(openai.NotFoundError, match="'a', 'b', 'base'"):
            client.completions.create(model="c", prompt=PROMPT, max_tokens=2)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_adapter_config_errors(runs, tmp_path, tiny_qwen):
    base, data, outs = runs
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    cases = [({"serve_adapters": {"x": str(not_adapter)}}, "holds no LoRA adapter"),
             ({"serve_adapters": {"a": str(outs["b"])}}, "used twice"),
             ({"serve_base_name": "b", "serve_adapters": {"b": str(outs["b"])}}, "used twice")]
    for keys, message in cases:
        with pytest.raises(UserError, match=message):
            load_served(make_cfg(base, data, outs["a"], **keys))
    other = tmp_path / "other"  # an adapter recorded over another model that exists
    other.mkdir()
    (other / "adapter_config.json").write_text(f'{{"base_model_name_or_path": "{tiny_qwen}", "peft_type": "LORA"}}')
    with pytest.raises(UserError, match="was trained over"):
        load_served(make_cfg(base, data, outs["a"], serve_adapters={"q": str(other)}))


def test_virtual_token_adapters_decode_as_their_forward(tiny_qwen, runs, tmp_path):
    """Prompt tuning: the engine feeds the virtual tokens itself; each greedy token is the argmax of the
    PEFT model's own full forward over the prompt and the tokens before it."""
    from r1tune.models.run_loading import load_run
    from r1tune.serve.engine import Engine
    from r1tune.models.sampling import Params
    from r1tune.serve.ticket import Ticket
    from tests.test_serve_engine import collect, prompt_ids

    out = tmp_path / "prompt"
    run_sft(make_cfg(tiny_qwen, runs[1], out, max_steps=2, finetuning_type="prompt_tuning", bf16=False))
    model, tokenizer = load_run(str(out))
    ids = prompt_ids(tokenizer, PROMPT)
    engine = Engine(model, tokenizer.pad_token_id, wait_s=0)
    try:
        tokens, _ = collect(engine.submit(Ticket(ids, Params(8), None, set())))
    finally:
        engine.close()
    full = torch.tensor([ids + tokens])
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits
    start = logits.shape[1] - full.shape[1] + len(ids) - 1  # after the virtual tokens and the prompt
    assert logits[0, start:-1].argmax(-1).tolist() == tokens

"""rpc_train/generation and `python -m rpc_train.generate`: seeded sampling, the KV cache against
full recompute, the window past the context, BYTES tensors."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers.gpt_runs import gpt_run
from helpers.launching import REPO
from rpc_train.generate import generate_text
from rpc_train.generation.decoding import generate
from rpc_train.generation.sampling import Sampling, next_token, step_input
from rpc_train.serve.source import build_served, served_model
from rpc_train.serve.tensors import BadRequest, Tensor, TensorSpec, output_tensor, pack_bytes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return gpt_run(tmp_path_factory.mktemp("gpt"))


def model_of(run):
    return build_served(served_model(str(run), None))


def test_a_gpt_run_is_served_as_a_generator(run):
    served = served_model(str(run), None)
    assert served.generative and served.name == "gpt" and served.shape == [32]


@pytest.mark.parametrize("sampling", [Sampling(60, 1.0, 0, 3), Sampling(60, 0.7, 5, 4), Sampling(60, 0.0)])
def test_the_kv_cache_gives_full_recomputes_text_past_the_context(run, sampling):
    """60 bytes after a 4-byte prompt: 28 within the context of 32, the rest on a sliding window."""
    model = model_of(run)
    cached = list(generate(model, b"def ", sampling, cached=True))
    assert cached == list(generate(model, b"def ", sampling, cached=False))
    assert len(cached) == 60


def test_same_seed_same_text_and_the_models_own_generate(run):
    model = model_of(run)
    a = list(generate(model, b"def ", Sampling(20, 1.0, 0, 7)))
    assert a == list(generate(model, b"def ", Sampling(20, 1.0, 0, 7)))
    assert a != list(generate(model, b"def ", Sampling(20, 1.0, 0, 8)))
    reference = model.generate(torch.tensor([list(b"def ")]), 20, generator=torch.Generator().manual_seed(7))
    assert reference[0, 4:].tolist() == a


def test_top_k_draws_among_the_likeliest_only():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    draws = {next_token(logits, Sampling(top_k=2, temperature=5.0), torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {1, 2}
    assert next_token(logits, Sampling(temperature=0), torch.Generator()) == 1


def test_step_input_feeds_what_the_cache_lacks_then_slides():
    assert step_input([1, 2, 3], 0, 4) == ([1, 2, 3], 0)
    assert step_input([1, 2, 3, 4], 3, 4) == ([4], 3)
    assert step_input([1, 2, 3, 4, 5], 4, 4) == ([2, 3, 4, 5], 0)
    assert step_input([1, 2, 3, 4, 5, 6], 4, 4) == ([3, 4, 5, 6], 0)


def test_the_cli_prints_the_prompt_and_its_continuation(run):
    text = generate_text([f"serve.run={run}", "generate.prompt=def ", "generate.max_tokens=12", "generate.seed=1"])
    assert text.startswith(b"def ") and len(text) == 16
    assert text == generate_text([f"serve.run={run}", "generate.prompt=def ", "generate.max_tokens=12",
                                  "generate.seed=1", "generate.kv_cache=false"])
    # The spelling, `prompt=`, is the same option.
    assert text == generate_text([f"serve.run={run}", "prompt=def ", "generate.max_tokens=12", "generate.seed=1"])


@pytest.mark.slow
def test_the_cli_as_a_process_prints_the_same_text(run):
    text = generate_text([f"serve.run={run}", "generate.prompt=def ", "generate.max_tokens=12", "generate.seed=1"])
    done = subprocess.run([sys.executable, "-m", "rpc_train.generate", f"serve.run={run}", "generate.prompt=def ",
                           "generate.max_tokens=12", "generate.seed=1"], cwd=REPO, capture_output=True, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == text + b"\n"


def test_bytes_tensors_as_triton_encodes_them():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    prompt = np.array([[b"def \xff"]], dtype=object)
    raw = serialize_byte_tensor(prompt).item()
    assert raw == pack_bytes([b"def \xff"])
    assert Tensor("prompt", "BYTES", [1, 1], raw=raw).array()[0, 0] == b"def \xff"
    assert Tensor("prompt", "BYTES", [1], values=["d\u00e9f"]).array()[0] == "d\u00e9f".encode()
    out = output_tensor(TensorSpec("text", "BYTES", [1]), np.array([[b"ab"]], dtype=object))
    assert deserialize_bytes_tensor(out.raw).tolist() == [b"ab"]
    with pytest.raises(BadRequest, match="an element of 9 bytes"):
        Tensor("prompt", "BYTES", [1], raw=pack_bytes([b"x" * 9])[:8]).array()

"""models/gpt.py: shapes, causality, the cached decode path, generation, and how it splits."""

import pytest
import torch

from models.gpt import GPT, Block, KVCache
from rpc_train.pipeline.partition import plan_stages

pytestmark = pytest.mark.timeout(60)


def small(**kwargs) -> GPT:
    torch.manual_seed(0)
    return GPT(**{"context": 16, "dim": 32, "heads": 4, "layers": 3, **kwargs}).eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_layers():
    model = small()
    assert model(tokens(2, 16)).shape == (2, 16, 256)
    assert model(tokens(2, 5)).shape == (2, 5, 256)  # shorter than the context
    names = [type(layer).__name__ for layer in model]
    assert names == ["Embedding", "Block", "Block", "Block", "Norm", "Head"]
    # Untied: the head's weight is a parameter of its own.
    assert model[-1].weight.data_ptr() != model[0].tokens.weight.data_ptr()


def test_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="context is 16"):
        small()(tokens(1, 17))


def test_a_change_at_t_leaves_the_outputs_before_t_alone():
    model = small()
    x = tokens(2, 16)
    for t in (0, 7, 15):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        before, after = model(x), model(changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=0)
        assert not torch.allclose(after[:, t:], before[:, t:])


@pytest.mark.parametrize("steps", [[16], [1] * 16, [5, 1, 1, 4, 5]])
def test_cached_decode_gives_the_full_forwards_logits(steps):
    """One position at a time, a prompt then single positions, or chunks: the same logits."""
    model = small()
    x = tokens(3, 16)
    full = model(x)
    cache, start, pieces = KVCache(), 0, []
    with torch.no_grad():
        for t in steps:
            piece = x[:, start:start + t]
            for layer in model:  # layer by layer, as a pipeline stage would
                piece = layer.decode(piece, cache, start)
            pieces.append(piece)
            start += t
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    assert sorted(cache.layers) == [0, 1, 2]
    assert cache.layers[0][0].shape == (3, 4, 16, 8)  # [batch, heads, t, head_dim]


def test_decode_needs_the_positions_before_start():
    model = small()
    with pytest.raises(ValueError, match="0 positions cached, but decoding from 4"):
        model.decode(tokens(1, 1), KVCache(), 4)


def test_generate_is_seeded_and_greedy_is_the_argmax():
    model = small()
    prompt = tokens(1, 4)
    a = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 24) and torch.equal(a, b) and torch.equal(a[:, :4], prompt)
    greedy = model.generate(prompt, 1, temperature=0)
    assert greedy[0, -1] == model(prompt)[0, -1].argmax()


def blocks_on_first_stage(layers, balance) -> int:
    counts = plan_stages(layers, 2, balance, tokens(8, 64))
    return sum(isinstance(layer, Block) for layer in layers[:counts[0]])


def test_both_balances_split_the_blocks_evenly():
    torch.manual_seed(0)
    layers = list(GPT(context=64, dim=64, heads=4, layers=4))
    assert blocks_on_first_stage(layers, "params") == 2
    # Timings on a shared machine can be off by several times for a moment: one of three tries
    # must split evenly (a split by time on a quiet machine always does).
    assert 2 in [blocks_on_first_stage(layers, "time") for _ in range(3)]

"""A GPT run to generate from and serve. Until the training side (data=text) is merged this is a
seeded, untrained GPT written as a run; a trained run's directory can take its place unchanged."""

from pathlib import Path

from rpc_train.generation.runs import write_untrained_run

# Small: every test decodes on two shared cores.
SMALL = {"context": 32, "dim": 32, "heads": 4, "layers": 2}


def gpt_run(path: Path, seed: int = 0, **model) -> Path:
    return write_untrained_run(str(path), seed, {**SMALL, **model})

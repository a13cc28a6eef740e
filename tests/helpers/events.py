"""Read a run's TensorBoard event files back with TensorBoard's own reader."""

from pathlib import Path
from typing import Dict, List


def _accumulator(run_dir: Path, **size_guidance):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance=size_guidance or None)
    acc.Reload()
    return acc


def read_scalars(run_dir: Path) -> Dict[str, List[tuple]]:
    """Every scalar in the run's event files, as tag -> [(step, value), ...]."""
    acc = _accumulator(run_dir, scalars=0, tensors=0)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def event_tags(run_dir: Path) -> Dict[str, list]:
    return _accumulator(run_dir).Tags()


def hparams_of(run_dir: Path) -> Dict[str, object]:
    """The HParams dashboard's settings of the run (its session start info), by name."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = _accumulator(run_dir).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in start.session_start_info.hparams.items()}


def read_texts(run_dir: Path) -> Dict[str, List[tuple]]:
    """Every text summary (`add_text`) in the run's event files, as tag -> [(step, text), ...];
    the tag as given to add_text, without TensorBoard's `/text_summary`."""
    acc = _accumulator(run_dir, tensors=0)
    suffix = "/text_summary"
    return {tag[:-len(suffix)]: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if tag.endswith(suffix)}

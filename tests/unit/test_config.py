"""Every config group composes and instantiates; typos and wrong types fail at compose time."""


import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from rpc_train.config.compose import compose
from helpers.launching import REPO
from rpc_train.training.builders import build_optimizer
from rpc_train.config.errors import ConfigError
from rpc_train.config.validate import validate

pytestmark = pytest.mark.timeout(120)


def options(group: str):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


# The DLRM reads click data and the GPT bytes: below.
IMAGE_MODELS = [m for m in options("model") if m not in ("dlrm", "gpt")]


@pytest.mark.parametrize("model", IMAGE_MODELS)
@pytest.mark.parametrize("data", ["digits", "cifar10"])
def test_every_model_builds_for_its_data_and_runs(model, data):
    cfg = compose([f"model={model}", f"data={data}"])
    net = instantiate(cfg.model)
    assert isinstance(net, torch.nn.Sequential) and len(net) >= 3
    out = net.eval()(torch.randn(2, *cfg.data.shape))
    assert out.shape == (2, cfg.data.num_classes)


def test_the_gpt_builds_for_text_and_runs():
    cfg = compose(["model=gpt", "data=text", "model.context=16", "model.layers=2"])
    net = instantiate(cfg.model)
    assert isinstance(net, torch.nn.Sequential) and len(net) == 1 + 2 + 2  # embedding, blocks, norm, head
    out = net.eval()(torch.randint(0, 256, (2, *cfg.data.shape)))
    assert out.shape == (2, 16, cfg.data.num_classes)


@pytest.mark.parametrize("data", ["synthetic_clicks", "criteo"])
def test_the_dlrm_builds_for_each_click_dataset_and_runs(data):
    cfg = compose(["experiment=dlrm_synthetic", f"data={data}"])
    net = instantiate(cfg.model)
    rows = list(cfg.data.table_rows)
    sparse = torch.stack([torch.tensor([0, r - 1]) for r in rows], dim=1)
    assert len(net.embeddings) == len(rows) and net.eval()(torch.randn(2, *cfg.data.shape), sparse).shape == (2,)


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_every_optimizer_and_scheduler_binds_to_parameters(optim, scheduler):
    cfg = compose([f"optim={optim}", f"scheduler={scheduler}"])
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer, sched = build_optimizer(params, cfg.optim, cfg.scheduler)
    params[0].grad = torch.ones(3)
    optimizer.step()
    assert params[0].detach().lt(1).all()
    assert (sched is None) == (scheduler == "none")


@pytest.mark.parametrize("group", ["data", "mode", "experiment", "loader"])
def test_every_option_composes_and_validates(group):
    hybrid_only = {("data", "criteo"), ("data", "synthetic_clicks"), ("mode", "hybrid")}
    needs = {("mode", "predict"): ["data=imagefolder", "predict.out=predictions"], ("data", "text"): ["model=gpt"]}
    for option in options(group):
        preset = ["experiment=dlrm_synthetic"] if (group, option) in hybrid_only else needs.get((group, option), [])
        cfg = compose([*preset, f"{group}={option}"])
        validate(cfg, world_size=3)


@pytest.mark.parametrize("override", ["pipeline.micro_batch=4", "trainer.epochs=two",
                                      "runtime.rpc_timeout_s=soon", "nonsense=1"])
def test_typos_and_wrong_types_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose([override])


@pytest.mark.parametrize("overrides, world_size, needle", [
    (["pipeline.micro_batches=0"], 3, "pipeline.micro_batches=0"),
    (["pipeline.stages=3"], 3, "pipeline.stages=3"),
    (["pipeline.micro_batches=12", "trainer.batch_size=8"], 3, "trainer.batch_size=8"),
    ([], 1, "NPROC"),
    (["pipeline.balance=fast"], 3, "pipeline.balance=fast"),
    (["pipeline.balance=[1,2,3]"], 3, "2 positive layer counts"),
    (["device=tpu"], 3, "device=tpu"),
    (["runtime.rpc_timeout_s=0"], 3, "runtime.rpc_timeout_s=0"),
    (["pipeline.micro_batches=16"], 3, "runtime.num_worker_threads > 16"),
    (["trainer.loss=mse"], 3, "trainer.loss=mse: expected one of cross_entropy"),
    (["pipeline.profile_step=0"], 3, "pipeline.profile_step=0"),
    (["pipeline.profile_step=40", "trainer.max_steps=30"], 3, "trainer.max_steps=30; profile a step from 1 to 30"),
])
def test_validate_names_the_bad_value(overrides, world_size, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides), world_size)
    assert needle in str(err.value) and "\n" not in str(err.value)

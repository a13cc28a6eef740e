"""mode=hybrid's settings checked before any process starts (config/validate.py), one line each."""

import pytest

from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.config.validate import validate


@pytest.mark.parametrize("nproc, args, says", [
    ("4", ["hybrid.servers=3"], "hybrid.servers=3 leaves no trainer in a world of 4"),
    ("4", ["hybrid.sharding=diagonal"], "hybrid.sharding=diagonal: expected one of table, row"),
    ("4", ["hybrid.embedding_optim=adam"], "hybrid.embedding_optim=adam: expected one of sgd, rowwise_adagrad"),
    ("4", ["data=digits"], "data=digits with mode=hybrid: the click datasets"),
    ("5", ["hybrid.servers=2", "hybrid.sharding=row", "data.table_rows=[5,1]"],
     "hybrid.sharding=row: table 1 has 1 rows, fewer than the 2 servers"),
    ("5", ["hybrid.servers=2", "data.table_rows=[5]"], "hybrid.sharding=table with 2 servers and 1 tables"),
    ("4", ["hybrid.clip_grad_norm=1.0"], "clipping applies to asynchronous updates only"),
    ("4", ["data=criteo", "data.table_rows=[10,10]"], "data.table_rows has 2 entries; Criteo has 26"),
    ("4", ["model=mlp"], "mode=hybrid shards a DLRM-style model's tables (model.table_rows); use model=dlrm"),
])
def test_a_bad_hybrid_setting_names_the_value_and_what_would_be_valid(nproc, args, says):
    with pytest.raises(ConfigError) as err:
        validate(compose(["experiment=dlrm_synthetic", *args]), world_size=int(nproc))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_preset_and_its_variants_validate():
    for args, world in ([], 4), (["hybrid.servers=2", "hybrid.sharding=row"], 5), (["hybrid.sync=false",
                                                                                   "hybrid.clip_grad_norm=1.0"], 4):
        validate(compose(["experiment=dlrm_synthetic", *args]), world_size=world)

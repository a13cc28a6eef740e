"""Click data: Criteo's TSV format read from tiny files written here, and the synthetic clicks."""

import math

import pytest
import torch

from helpers.datasets import criteo_line
from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.data.clicks import check_indices, load_clicks, make_synthetic_clicks, read_criteo

ROWS = [1000 + t for t in range(26)]  # distinct sizes, so a value's row differs by table


def test_criteo_lines_parse_with_log_integers_hashed_categoricals_and_empty_fields(tmp_path):
    path = tmp_path / "train.txt"
    ints = ["5", "", "-1"] + ["0"] * 10
    cats = ["", "ffffffff"] + [f"{t:08x}" for t in range(2, 26)]
    path.write_text(criteo_line() + criteo_line("0", ints, cats))
    data = read_criteo(str(path), ROWS)
    assert data.labels.tolist() == [1.0, 0.0]
    assert data.dense[0].tolist() == pytest.approx([math.log1p(i) for i in range(13)])
    # log(1 + max(x, 0)): an empty field and a negative one both count as 0.
    assert data.dense[1, :3].tolist() == pytest.approx([math.log1p(5), 0.0, 0.0])
    assert data.sparse[0, 3].item() == (0x68fd1e64 + 3) % ROWS[3]
    assert data.sparse[1, :2].tolist() == [0, 0xFFFFFFFF % ROWS[1]]
    assert data.dense.dtype == torch.float32 and data.sparse.dtype == torch.int64


def test_blank_lines_hold_no_sample_and_line_numbers_still_count_them(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(criteo_line() + "\n" + criteo_line("0") + "\n\n" + criteo_line("2"))
    with pytest.raises(ConfigError, match=f"{path}:6: label '2'"):
        read_criteo(str(path), ROWS)
    path.write_text(criteo_line() + "\n" + criteo_line("0") + "\n")
    assert read_criteo(str(path), ROWS).labels.tolist() == [1.0, 0.0]


def test_a_limit_reads_only_the_first_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(criteo_line() * 3 + "not a criteo line\n")
    assert len(read_criteo(str(path), ROWS, limit=3).labels) == 3


@pytest.mark.parametrize("line, says", [
    (criteo_line().replace("\t", "", 1), "39 tab-separated fields, a Criteo line has 40"),
    (criteo_line(label="2"), "label '2' must be 0 or 1"),
    (criteo_line(ints=["x"] + ["0"] * 12), "integer feature 'x' is not an integer"),
    (criteo_line(cats=["zz"] + ["0"] * 25), "categorical feature 'zz' is not hexadecimal"),
])
def test_a_malformed_line_names_the_file_and_line_number(tmp_path, line, says):
    path = tmp_path / "day_0"
    path.write_text(criteo_line() + line)
    with pytest.raises(ConfigError) as err:
        read_criteo(str(path), ROWS)
    assert str(err.value).startswith(f"{path}:2: ") and says in str(err.value)


def test_criteo_through_the_config_splits_into_train_and_validation(tmp_path):
    (tmp_path / "train.txt").write_text(criteo_line() * 8 + criteo_line("0") * 2)
    cfg = compose(["experiment=dlrm_synthetic", "data=criteo", f"data.root={tmp_path}"])
    train, val = load_clicks(cfg.data, cfg.seed)
    assert (len(train), len(val)) == (9, 1)
    dense, sparse, label = train[0]
    assert dense.shape == (13,) and sparse.shape == (26,) and label.item() in (0.0, 1.0)


def test_a_missing_criteo_file_is_one_line_naming_it(tmp_path):
    cfg = compose(["experiment=dlrm_synthetic", "data=criteo", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=f"no file {tmp_path}/train.txt"):
        load_clicks(cfg.data, cfg.seed)


def test_an_index_outside_its_table_names_the_feature_and_value():
    sparse = torch.tensor([[0, 3], [1, 7]])
    check_indices(sparse, [2, 8], ["C1", "C2"])
    with pytest.raises(ConfigError, match=r"feature C2 has index 7, outside its table of 5 rows \(valid: 0..4\)"):
        check_indices(sparse, [2, 5], ["C1", "C2"])


def test_synthetic_clicks_are_seeded_and_inside_their_tables():
    a, b = (make_synthetic_clicks(500, 13, [50, 5], seed=3) for _ in range(2))
    assert torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, make_synthetic_clicks(500, 13, [50, 5], seed=4).labels)
    assert int(a.sparse[:, 0].max()) < 50 and int(a.sparse[:, 1].max()) < 5
    assert 0.1 < a.labels.mean().item() < 0.6

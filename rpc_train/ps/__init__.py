"""mode=parameter_server: data-parallel training against parameters held by server ranks.

Rank 0 drives (`driver.py`), ranks 1..ps.servers each hold a shard of the model's tensors and
its optimizer (`server.py`, sharded by `sharding.py`), and the remaining ranks train on
disjoint shards of the data (`worker.py`), reporting their progress to the driver
(`progress.py`). Runtime, models, data, logging and launcher are the pipeline mode's own.
"""

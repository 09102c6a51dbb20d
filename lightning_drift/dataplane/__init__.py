"""The sharded data plane: a round's weights cut into shards that members aggregate, while the
coordinator keeps the books (who contributed what, which result each shard holds) in a
signed manifest. Pure parts only: the plan of shards and their pieces (``plan.py``), who
aggregates each shard (``owners.py``), one shard's round, bit-equal to the star's
(``reduce.py``), and the signed manifest (``manifest.py``)."""

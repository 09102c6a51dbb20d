"""The sharded data plane: a round's change cut into shards that members aggregate, while
the coordinator keeps the books (who contributed what, whose result stands) in a signed
manifest. The pure parts: the plan of shards and their pieces (``plan.py``), who aggregates
each shard (``owners.py``), one shard's round, bit-equal to the star's (``reduce.py``), the
books (``books.py``) and the manifest (``manifest.py``); the I/O: moving pieces between
members (``pieces.py``) and a member's part in a round (``member.py``). docs/dataplane.md
says how they fit and what a session uses today."""

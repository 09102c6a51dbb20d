"""The node side of a drift session: what runs in the training process.

- ``strategy``: ``DriftStrategy``, the Lightning hooks (the only module here that imports
  Lightning);
- ``barriers``: when to meet (pure step arithmetic);
- ``weights``: state dict ⇄ upload payload, in-place load, local copies of rounds;
- ``shards``: the sampler over the node's shard of an epoch;
- ``runtime``: ``NodeRuntime``, the background loop thread and reconnects;
- ``client``: ``CoordinatorClient``, one async connection to the coordinator.

Nothing is imported here, so that ``import lightning_drift.node.client`` (the coordinator's
tools, ``drift status``) does not pay for Lightning.
"""

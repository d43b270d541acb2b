"""Everything about distributing work, installed on the plain model from outside.

``topology`` (the mesh, every group question), ``parallelize`` (``parallelize_keye``: a layout
installed on a model), ``local_rows`` (the batch each rank's model sees), ``engine`` (one step,
any objective, every layout), ``tensor_parallel`` / ``context_parallel`` / ``pipeline`` /
``vision`` / ``data_parallel`` / ``zero2`` / ``fsdp`` (the layouts), ``sharded_checkpoint``,
``balancer`` and ``balanced_rows`` (cost-balanced steps), ``loading`` (topology-aware reading).
"""

"""The host tier (``offload: host``), split by the process each half runs in, like vLLM's OffloadingConnector.

* scheduler side (EngineCore): ``scheduler.py`` (the host-slot authority, ``ENGINE``) and ``kv_spec.py`` (the KV
  spec / manager pair that frees a sparse request's middle blocks after spilling them);
* worker side: ``host_pool.py`` (host copies, spills applied before the forward), ``hotset.py`` (device blocks
  caching host blocks) and ``host_reads.py`` (how a sparse step reads what is on the host);
* ``messages.py``: what the scheduler side tells the worker side through the KV connector's metadata.
"""

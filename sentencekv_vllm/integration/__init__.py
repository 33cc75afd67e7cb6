"""vLLM glue: one module per extension point; private vLLM internals are touched only in ``compat``."""

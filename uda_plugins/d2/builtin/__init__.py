"""The builtin engine: the subset of Detectron2's API that uda_plugins uses, with Detectron2's names,
signatures and semantics, for machines where Detectron2 is not installed. fvcore supplies the config node,
registries, checkpointer, schedulers, history buffers and timers; this package writes the rest.

Import it through :mod:`uda_plugins.d2`, never directly.
"""

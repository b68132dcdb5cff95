"""Training on megatron-core (DESIGN.md §6): the 25-argument launcher's configuration
(``config``, standard library only), the loop (``loop.train``), checkpoints
(``checkpointing``), micro-batches (``batches``), logging (``train_log``); the model chunks,
optimizer and forward step in ``model_setup`` / ``forward_step``.

Nothing heavy is imported here: ``config`` must stay importable in milliseconds.
"""

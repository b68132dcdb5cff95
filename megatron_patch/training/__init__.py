"""Training on megatron-core (docs/launcher.md): the launcher's configuration (``config``
sections, ``arguments`` for the 25 positional arguments, ``launch_plan`` for torchrun; all
standard library only), the entry (``pretrain``), setup (``setup``, ``data_setup``,
``model_setup``), the loop (``loop.train``), checkpoints (``checkpointing``), micro-batches
(``batches``), the forward step (``forward_step``) and logging (``train_log``).

Nothing heavy is imported here: the launcher's plan must stay importable without torch.
"""

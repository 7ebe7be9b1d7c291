"""The trainer: ``loop`` (the ``Trainer``), ``config`` (the run as JSON validated into dataclasses),
``engine`` (DeepSpeed set-up, master weights), ``prefetch``, ``optim`` (AdamW groups, the LR
schedule, the batch plan), ``checkpoints`` (run directories, publish, resume reads), ``runlog``
(progress bar, JSONL, TensorBoard)."""

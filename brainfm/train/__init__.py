"""Training: a ``Trainer`` (accelerate set-up, the optimisation step, checkpoints, guards, logs, previews, export)
that runs any ``Task`` (``brainfm.train.tasks``: the VAE and LDM stages here, the heads in ``brainfm.finetune``);
``brainfm.train.pretrain.pretrain`` runs the two pretraining stages."""

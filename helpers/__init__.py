"""The course's shared code: one straight pipeline, each module importing only the ones before it.

    config       settings (every environment variable), atomic writes, file locks, outputs/metrics.json
    download     verified, cached downloads (the SMS Spam Collection, GPT-2's weights)       notebook 02
    data         parse, balance, label, split; datasets, padding, loaders                    notebooks 02-03
    models       the registry (load_model, build_model) over one interface (models.base):
                 models.gpt2 (notebook 04), models.smollm2 (notebook 08)
    fastpath     frozen-block cache and length-sorted batches                                 notebook 05
    train        loss, accuracy, the training loop                                           notebook 05
    evaluate     predictions, confusion matrix, precision/recall/F1, plots, baseline, classify notebook 06
    nf4          4-bit NF4 weights                                                           notebook 07
    lora         LoRA and QLoRA layers                                                       notebook 07
    checkpoints  save/load classifiers and adapters                                          notebooks 05-07
    memory       measuring a training run's peak memory in a subprocess (plumbing)           notebook 07

Import the module you need, e.g. ``from helpers import data`` or ``from helpers.models import load_model``;
``import helpers`` itself loads nothing.
"""

"""Pseudo-healthy reconstruction and deviation maps, one job per module.

Below the pipeline (``brainfm.pipeline`` uses them): ``reconstruct`` (partial noising and few-step denoising),
``deviation`` (residual, post-processing, mask, subject score of one scan), ``normative`` (healthy-cohort
statistics and threshold), ``head`` (a fine-tuned head at inference). Above it (the commands): ``inputs`` (scans,
manifests, shard folders), ``calibrate``, ``detect`` (+ ``figures``), ``evaluate``.
"""

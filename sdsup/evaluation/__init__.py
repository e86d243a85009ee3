"""Evaluation of generated images and layouts.

  fid.py         Frechet distance, streaming feature statistics, feature extractors (Inception or any function)
  clip_score.py  CLIP score with the Flax CLIP towers (needs a local CLIP model)
  images.py      image mIoU by the evaluation segmenter, segmenter-feature FID, per variant
  layout.py      text -> layout: mIoU against ground truth and baselines, relation accuracy
  report.py      WORKDIR/metrics.json and report.md
  suite.py       the evaluation of a workdir (`python -m sdsup.evaluate`, stage `evaluate`)

Evaluation reads trained models through `sdsup.workdir` and generates through
`sdsup.pipelines`; it never imports the training stages.
"""

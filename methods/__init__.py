"""Self-supervised and contrastive methods in pure PyTorch (no Ray, no MLflow).

Components follow the taxonomy of Le-Khac et al. 2020 (arXiv 2010.05113), one room each:

- ``data/``: datasets as uint8 tensors, image files on disk, augmented views;
- ``encoders/``: backbones, projection and prediction heads, BatchNorm variants, momentum copies;
- ``losses/``: contrastive, predictive, clustering-code and distillation objectives;
- ``clustering/``: the E-step of prototype methods (k-means, gathered or in Lloyd rounds);
- ``evaluation/``: kNN, linear probes, clustering and label-free scores, plots;
- ``zoo/``: every method, a small composition of the rooms above.

``base`` holds the ``Method`` interface, ``registry`` the names configs use, ``training`` the
loop a single process (or any torch.distributed program) runs.
"""

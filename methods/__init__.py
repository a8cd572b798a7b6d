"""Self-supervised and contrastive methods in pure PyTorch (no Ray, no MLflow).

Components follow the taxonomy of Le-Khac et al. 2020 (arXiv 2010.05113): views, encoders,
heads, losses; a method in ``methods.zoo`` is a small composition of them.
"""

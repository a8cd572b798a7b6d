"""One module per method; importing this package registers them all."""

from methods.zoo import moco, pcl, selfcon, simclr, supcon

__all__ = ["moco", "pcl", "selfcon", "simclr", "supcon"]

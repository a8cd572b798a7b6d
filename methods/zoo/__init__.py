"""One module per method; importing this package registers them all."""

from methods.zoo import byol, moco, moco_v3, pcl, selfcon, simclr, simsiam, supcon

__all__ = ["byol", "moco", "moco_v3", "pcl", "selfcon", "simclr", "simsiam", "supcon"]

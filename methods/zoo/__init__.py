"""One module per method; importing this package registers them all."""

from methods.zoo import moco, pcl, simclr

__all__ = ["moco", "pcl", "simclr"]

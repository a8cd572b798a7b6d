"""One module per method; importing this package registers them all."""

from methods.zoo import (
    byol,
    cmc,
    cpc,
    dino,
    instdisc,
    moco,
    moco_v3,
    pcl,
    selfcon,
    simclr,
    simsiam,
    supcon,
    supervised,
    swav,
)

__all__ = ["byol", "cmc", "cpc", "dino", "instdisc", "moco", "moco_v3", "pcl", "selfcon", "simclr",
           "simsiam", "supcon", "supervised", "swav"]

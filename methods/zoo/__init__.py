"""Every method and regulariser protoray ships, one module each.

To add a method: write ``methods/zoo/<name>.py`` with a ``Method`` subclass whose class attribute
``name`` is its config name, and list the class in ``METHODS`` below. A regulariser (a wrapper
that adds a term to any two-view method) goes in ``REGULARIZERS``.
"""

from methods.zoo.byol import BYOL
from methods.zoo.cmc import CMC
from methods.zoo.cpc import CPC
from methods.zoo.dino import DINO
from methods.zoo.icl_msr import ICLMSR
from methods.zoo.instdisc import InstDisc
from methods.zoo.moco import MoCo
from methods.zoo.moco_v3 import MoCoV3
from methods.zoo.pcl import PCL
from methods.zoo.selfcon import SelfCon
from methods.zoo.simclr import SimCLR
from methods.zoo.simsiam import SimSiam
from methods.zoo.supcon import SupCon
from methods.zoo.supervised import Supervised
from methods.zoo.swav import SwAV

METHODS = (BYOL, CMC, CPC, DINO, InstDisc, MoCo, MoCoV3, PCL, SelfCon, SimCLR, SimSiam, SupCon,
           Supervised, SwAV)
REGULARIZERS = (ICLMSR,)

__all__ = ["METHODS", "REGULARIZERS"]

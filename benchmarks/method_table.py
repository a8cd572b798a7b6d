"""The README's table of every method: paper, config, and the Fashion-MNIST kNN / linear / AMI
read from the JSON lines that ``fashion_mnist.py`` runs ended with (never typed by hand).

    python benchmarks/method_table.py benchmarks/results/fashion_mnist_*_3ep.log

Logs are read in order and a later one wins for a row it also measured. Rows no log measured
at that epoch budget print as "not run". The last line is JSON: the rows found and the budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# benchmark row -> (method as shown, paper, config)
METHODS: dict[str, tuple[str, str, str]] = {
    "instdisc": ("InstDisc", "Wu et al. 2018, arXiv 1805.01978", "instdisc_fashion_mnist.yaml"),
    "cpc": ("CPC", "van den Oord et al. 2018, arXiv 1807.03748", "cpc_fashion_mnist.yaml"),
    "cmc": ("CMC", "Tian et al. 2019, arXiv 1906.05849", "cmc_fashion_mnist.yaml"),
    "cmc_bank": ("CMC, memory bank", "Tian et al. 2019", "cmc_fashion_mnist.yaml + memory_bank: true"),
    "moco_v1": ("MoCo v1", "He et al. 2020, arXiv 1911.05722", "moco_v1_fashion_mnist.yaml"),
    "moco": ("MoCo v2", "Chen et al. 2020, arXiv 2003.04297", "moco_fashion_mnist.yaml"),
    "simclr": ("SimCLR", "Chen et al. 2020, arXiv 2002.05709", "simclr_fashion_mnist.yaml"),
    "pcl": ("PCL", "Li et al. 2021, arXiv 2005.04966", "pcl_fashion_mnist.yaml"),
    "moco_v3": ("MoCo v3", "Chen, Xie & He 2021, arXiv 2104.02057", "moco_v3_fashion_mnist.yaml"),
    "byol": ("BYOL", "Grill et al. 2020, arXiv 2006.07733", "byol_fashion_mnist.yaml"),
    "simsiam": ("SimSiam", "Chen & He 2021, arXiv 2011.10566", "simsiam_fashion_mnist.yaml"),
    "swav": ("SwAV", "Caron et al. 2020, arXiv 2006.09882", "swav_fashion_mnist.yaml"),
    "dino": ("DINO", "Caron et al. 2021, arXiv 2104.14294", "dino_fashion_mnist.yaml"),
    "supcon": ("SupCon (labels)", "Khosla et al. 2020, arXiv 2004.11362", "supcon_fashion_mnist.yaml"),
    "selfcon_s": ("SelfCon-S (labels)", "Bae et al. 2021, arXiv 2106.15499", "selfcon_s_fashion_mnist.yaml"),
    "selfcon_m": ("SelfCon-M (labels)", "Bae et al. 2021", "selfcon_m_fashion_mnist.yaml"),
    "icl_msr_fo": ("ICL-MSR on SimCLR, first order", "Qiang et al. 2022 (unofficial)",
                   "icl_msr_simclr_fashion_mnist.yaml"),
    "supervised": ("cross-entropy (labels, reference)", "-", "supervised_fashion_mnist.yaml"),
    "raw_pixels": ("raw pixels", "-", "-"),
}


def headline(log: Path) -> dict:
    """The last JSON line of a benchmark log."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"{log} has no JSON headline line: the run did not finish")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path)
    args = p.parse_args()
    found: dict[str, dict] = {}
    epochs = set()
    for log in args.logs:
        head = headline(log)
        epochs.add(head["epochs"])
        for row in METHODS:
            if f"{row}_knn" in head:
                found[row] = {k: head.get(f"{row}_{k}") for k in ("knn", "linear", "ami", "epoch_s")}
    if len(epochs) > 1:
        raise SystemExit(f"the logs ran different epoch budgets {sorted(epochs)}; pass one budget")
    print("| method | paper | config | kNN | linear | AMI | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for row, (shown, paper, config) in METHODS.items():
        r = found.get(row)
        cfg = config if config == "-" else f"`configs/{config}`"
        if r is None:
            print(f"| {shown} | {paper} | {cfg} | not run | | | |")
            continue
        sec = "-" if r["epoch_s"] is None else f"{r['epoch_s']:.0f}"
        print(f"| {shown} | {paper} | {cfg} | {r['knn']:.4f} | {r['linear']:.4f} | {r['ami']:.4f} | {sec} |")
    print(json.dumps({"rows": sorted(found), "epochs": epochs.pop()}))


if __name__ == "__main__":
    main()

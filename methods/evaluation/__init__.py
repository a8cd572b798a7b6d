"""How good a representation is: weighted kNN, linear probes, clustering scores (AMI/NMI/ARI),
the online probe trained during pre-training, and plots."""

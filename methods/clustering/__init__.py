"""The E-step of prototype methods: k-means gathered in one process (``kmeans``), Lloyd's steps
that shard across workers (``lloyd``), and what an E-step produces (``prototypes``)."""

"""Data and views: datasets as uint8 tensors (``datasets``), image files on disk (``image_files``)
and the augmentations that turn one image into views (``views``)."""

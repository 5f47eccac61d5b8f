"""I/O: datasets read per rank by rows (``datasets``), checkpoints that hold the whole training state
(``checkpoints``), run directories and progress (``runlog``), and one run per directory
(``dirlock``).
"""

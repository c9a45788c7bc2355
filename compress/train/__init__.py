"""The one trainer every training pass uses (compress/train/trainer.py), data-parallel training on one host
(distributed.py) and running a pass's training in N processes (launch.py)."""

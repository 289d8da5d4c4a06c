"""Training configs: `python train.py --config=configs/NAME.py` (each file has `get_config()`)."""

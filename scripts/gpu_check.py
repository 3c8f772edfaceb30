"""train.main() under torchrun, then this rank's peak GPU memory: the per-rank half of gpu_check.sh."""
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import train  # noqa: E402

if __name__ == "__main__":
    try:
        train.main(sys.argv[1:])
    finally:
        if torch.cuda.is_available():
            print(f"gpu_check rank {os.environ.get('RANK', 0)}: peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB "
                  f"allocated, {torch.cuda.max_memory_reserved() / 2 ** 30:.2f} GiB reserved of "
                  f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2 ** 30:.1f} GiB",
                  flush=True)

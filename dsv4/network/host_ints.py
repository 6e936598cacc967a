"""Integers the host knows (row positions, offsets) as a device tensor, without a host sync.

`torch.tensor(values, device="cuda")` copies with non_blocking=False, which ends in a
cudaStreamSynchronize: the host waits for every queued kernel, once per call, which in a
launch-bound decode step stalls the queue each time. From pageable memory a non-blocking
copy returns once the values are staged (CUDA's rule for pageable host-to-device copies), so the
source may go away at once, and the copy is ordered on the stream before the kernels that read it.
"""
from __future__ import annotations

import torch


def device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """values -> int64 tensor [len(values)] on `device`."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

"""How many CPU threads TVM kernels use: as many as torch does, unless TVM_NUM_THREADS/OMP_NUM_THREADS say.

TVM's runtime assumes every x86 core runs two hardware threads and starts half of `hardware_concurrency`
workers. On a machine whose cores have one thread each (this 2-core AMD EPYC) every TVM kernel ran on a
single core while torch and onnxruntime used both. TVM reads the count once, when its thread pool starts
(the first parallel kernel), so this must run before a TVM kernel does.
"""

from __future__ import annotations

import os

import torch


def use_all_cores() -> int:
    """Give TVM torch's intra-op thread count (torch's default: one per physical core); return TVM's count."""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())
    return torch.get_num_threads()

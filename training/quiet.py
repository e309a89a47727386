"""Keep the console readable: silence third-party chatter that says nothing to a user.

Stage: the first thing ``twotower-train`` / ``twotower-demo`` do. What is silenced (set
``TWOTOWER_VERBOSE=1`` to see it all again):

- megatron-core's INFO logging (full DDP/optimizer config dumps, per-parameter listings);
  its warnings and errors still show;
- the import-time notices that Transformer Engine / Apex are absent (expected on CPU; the
  pure-PyTorch fallbacks are what we test), a deprecated ``cuda_graph_scope`` default inside
  megatron's own TransformerConfig, a non-leaf ``.grad`` probe in megatron's optimizer, and
  torch's deprecation of the collective / ShardedTensor / checkpoint names megatron's
  dist_checkpointing calls.

The filters also go into ``PYTHONWARNINGS`` so worker processes (data loader, checkpoint
writers) inherit them.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

#: (message prefix, category) of the silenced warnings.
KNOWN = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("full scope is deprecated", UserWarning),
    ("The .grad attribute of a Tensor that is not a leaf Tensor", UserWarning),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated", FutureWarning),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),
    ("`torch.jit.script_method` is deprecated", DeprecationWarning),
    ("`load_state_dict` is deprecated and will be removed", FutureWarning),
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)


def quiet_third_party() -> None:
    if os.environ.get("TWOTOWER_VERBOSE"):
        return
    for prefix, category in KNOWN:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)
    env = [f"ignore:{prefix}:{category.__name__}" for prefix, category in KNOWN if ":" not in prefix]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), *env]))
    logging.getLogger("megatron").setLevel(logging.WARNING)


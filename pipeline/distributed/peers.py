"""Telling a lost peer apart from other failures, so that gan-train can say what happened and exit for a restart.

A peer that died makes gloo fail at once ("Connection closed by peer"); one that hangs makes every
collective wait until the process group's timeout (`strategy.timeout_s`) and then fail ("Timed out
waiting ..."). NCCL reports both as DistBackendError (its watchdog enforces the timeout). gloo's errors
are plain RuntimeErrors, recognisable only by their text.
"""
from __future__ import annotations

import torch.distributed as dist

LOST_PEER_EXIT_CODE = 4


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank died, hung or became unreachable."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)  # gloo's transport errors: "Timed out waiting", "Connection closed/reset by peer", ...
    return isinstance(error, RuntimeError) and ("gloo/transport" in text or "Gloo connectFullMesh failed" in text)


def lost_peer_message(error: BaseException, timeout_s: float) -> str:
    first_line = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    return (f"a collective failed because another process died or hung ({first_line}). A hung peer fails the "
            f"run after strategy.timeout_s={timeout_s:g} s. Under `torchrun --max-restarts K` every worker is "
            "restarted and resume=auto continues from the last checkpoint; otherwise rerun with resume=auto")

"""Which kernel ran: the kernel log of a block of calls, as a list of lines.

With ``ATTENTION_EXT_LOG_KERNEL=1`` in the environment every call of the ops
writes one line to the process's standard error (from C++, file descriptor 2)
naming the kernel that ran: the device, the direction and the kernel (on the
CPU the product path and the tile sizes; on CUDA the sm80 or the Hopper (sm90a)
kernel, its head-dim bucket and dtype). :func:`kernel_log` turns the log on
around a block and hands the lines back instead of printing them::

    with attention_ext.debug.kernel_log() as lines:
        attention_ext.attention(q, k, v, is_causal=True).sum().backward()
    print(lines)  # ['cpu forward: flash kernel, ...', 'cpu backward: ...']

It redirects file descriptor 2 for the duration of the block, so anything else
written to standard error meanwhile is dropped, and it is not thread-safe.
"""
import contextlib
import os
import sys
import tempfile
from typing import Iterator, List

_PREFIX = "attention_ext: "


@contextlib.contextmanager
def kernel_log() -> Iterator[List[str]]:
    """Collects the kernel-log lines (without the ``attention_ext:`` prefix) of the calls made
    inside the block; the list is filled when the block ends."""
    lines: List[str] = []
    old = os.environ.get("ATTENTION_EXT_LOG_KERNEL")
    with tempfile.TemporaryFile(mode="w+") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        os.environ["ATTENTION_EXT_LOG_KERNEL"] = "1"
        try:
            yield lines
        finally:
            if old is None:
                os.environ.pop("ATTENTION_EXT_LOG_KERNEL", None)
            else:
                os.environ["ATTENTION_EXT_LOG_KERNEL"] = old
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(ln.strip()[len(_PREFIX):] for ln in tmp.read().splitlines() if ln.startswith(_PREFIX))

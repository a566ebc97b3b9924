"""Counts the ops that reach the dispatcher, to prove a model really runs attention_ext's kernels."""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[f"{func.namespace}.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def ext(self):
        """Calls of any attention_ext op."""
        return sum(n for k, n in self.counts.items() if k.startswith("attention_ext."))

    @property
    def fwd(self):
        # under inference_mode the composite op reaches the mode undecomposed; the weights op is a forward too
        return (self.counts["attention_ext._attention_forward"] + self.counts["attention_ext.attention"] +
                self.weights)

    @property
    def weights(self):
        """Forwards that also returned the attention weights (need_weights / output_attentions)."""
        return self.counts["attention_ext._attention_forward_weights"]

    @property
    def bwd(self):
        return self.counts["attention_ext._attention_backward"]

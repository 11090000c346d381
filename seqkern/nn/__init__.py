"""Drop-in modules. They own parameters, shapes, packing and state; the math lives in ops."""
from torch import nn as _nn

from seqkern.nn.attention import *  # noqa: F401,F403
from seqkern.nn.conv import *  # noqa: F401,F403
from seqkern.nn.rnn import *  # noqa: F401,F403


def _refuse_script(self):
    # torch.jit.script calls this on every module of the model it compiles, before compiling.
    # TorchScript cannot compile these modules' Python (it failed deep inside with messages
    # such as "Only a single generator is currently supported"), so say so up front.
    raise RuntimeError(
        f"seqkern.nn.{type(self).__name__} does not support torch.jit.script: use torch.compile "
        "or torch.export, or torch.jit.trace (which records the seqkern ops; see the README)")


for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, _nn.Module) and _cls.__module__.startswith("seqkern.nn"):
        _cls.__prepare_scriptable__ = _refuse_script
del _cls

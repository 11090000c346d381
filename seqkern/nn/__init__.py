"""Drop-in modules. They own parameters, shapes, packing and state; the math lives in ops."""
from seqkern.nn.attention import *  # noqa: F401,F403
from seqkern.nn.conv import *  # noqa: F401,F403
from seqkern.nn.rnn import *  # noqa: F401,F403

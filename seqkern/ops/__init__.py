"""The public functional API: argument checks, torch.library custom ops and backend dispatch."""
from seqkern.ops import attention, conv, rnn  # noqa: F401
from seqkern.ops.attention import *  # noqa: F401,F403
from seqkern.ops.conv import *  # noqa: F401,F403
from seqkern.ops.rnn import *  # noqa: F401,F403

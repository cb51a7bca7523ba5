"""idlegrid: turn idle GPUs into a verifiable AI compute grid."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 4  # 2: one dispute route family; 3: reports carry the context length;
# 4: penalties, logit_bias and logprobs in tasks, uploads and version-2 commitments

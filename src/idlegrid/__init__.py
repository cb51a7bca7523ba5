"""idlegrid: turn idle GPUs into a verifiable AI compute grid."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 3  # 2: one dispute route family; 3: reports carry the context length

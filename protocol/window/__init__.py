"""Window summaries: the model and merge (:mod:`.model`), the binary codec (:mod:`.codec`)
and the head of a window read in one pass (:mod:`.head`)."""

from protocol.window.codec import (
    WINDOW_CODEC_VERSION,
    WINDOW_MAGIC,
    WindowCodecError,
    decode_window,
    encode_window,
)
from protocol.window.head import decode_window_head
from protocol.window.model import (
    WINDOW_SCHEMA_VERSION,
    ShadowSummary,
    WindowAggregate,
    WindowMergeError,
    WindowSummary,
    merge_scores,
    merge_windows,
)

__all__ = [
    "WINDOW_CODEC_VERSION",
    "WINDOW_MAGIC",
    "WINDOW_SCHEMA_VERSION",
    "ShadowSummary",
    "WindowAggregate",
    "WindowCodecError",
    "WindowMergeError",
    "WindowSummary",
    "decode_window",
    "decode_window_head",
    "encode_window",
    "merge_scores",
    "merge_windows",
]

"""Ingest keeps a window's head: the rows and aggregates it writes are those of the whole window.

The gate (:func:`fleet_server.mqtt.ingest.classify`) checks a window as a
whole but makes it without its features
(:func:`protocol.window.decode_window_head`), and stores the bytes as
received. That is only sound while nothing ingest writes reads a feature:
these tests hold the folds into the hourly rollout aggregates and hybrid
stats of the head to those of the whole decoded window, over windows of every
shape and section.
"""

from __future__ import annotations

import numpy as np
import pytest

from fleet_server.hybrid.aggregates import fold_hybrid
from fleet_server.mqtt.ingest import Accepted, Dropped, classify
from fleet_server.rollouts.aggregates import fold, fold_shadow
from protocol.topics import windows_topic
from protocol.window import WindowCodecError, decode_window, encode_window
from tests.support.generated_windows import random_window

NS = "head"


def test_the_head_ingest_keeps_folds_as_the_whole_window_does() -> None:
    rng = np.random.default_rng(5)
    sections = {"shadow": 0, "hybrid": 0, "features": 0}
    for _ in range(300):
        window = random_window(rng)
        data = encode_window(window)
        verdict = classify(windows_topic(NS, window.device_id), data, 1 << 20, namespace=NS)
        assert isinstance(verdict, Accepted), verdict
        whole = decode_window(data)
        assert verdict.payload == data
        assert verdict.message == whole.model_copy(update={"features": []})
        head = verdict.message
        assert fold(head) == fold(whole)
        assert fold_shadow(head) == fold_shadow(whole)
        assert fold_hybrid(head) == fold_hybrid(whole)
        sections["shadow"] += whole.shadow is not None
        sections["hybrid"] += whole.hybrid is not None
        sections["features"] += bool(whole.features)
    assert min(sections.values()) > 30, sections


def test_a_window_whose_features_are_broken_is_dropped_with_the_decoders_words() -> None:
    rng = np.random.default_rng(6)
    window = random_window(rng)
    while not window.features:
        window = random_window(rng)
    data = bytearray(encode_window(window))
    data[-1] ^= 0xFF  # the compressed body's last byte: corrupt or truncated
    verdict = classify(windows_topic(NS, window.device_id), bytes(data), 1 << 20, namespace=NS)
    assert isinstance(verdict, Dropped) and verdict.reason == "malformed-window"
    with pytest.raises(WindowCodecError) as refused:
        decode_window(bytes(data))
    assert verdict.detail.endswith(str(refused.value)[:200])

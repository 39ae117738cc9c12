"""``from metagrad import *`` offers every shipped algorithm and the models they are shown with."""

from __future__ import annotations

import metagrad


def test_all_exports_the_algorithms_and_models() -> None:
    for name in ("MAML", "ProtoNet", "IMAML", "CAVIA", "ContextNetwork", "ResNet12", "MLP", "Conv4",
                 "Conv4MiniImageNet"):
        assert name in metagrad.__all__, name
    assert all(hasattr(metagrad, name) for name in metagrad.__all__)

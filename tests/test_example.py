"""The training example, short: band + global learns the long-range retrieval, band alone cannot."""
import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples/train_long_range.py"


@pytest.mark.slow   # minutes under load; CI runs it (`pytest -m 'not slow'` for a quick local run)
def test_band_plus_global_learns_what_band_alone_cannot():
    spec = importlib.util.spec_from_file_location("train_long_range", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # n = 128: the key sits in the first 32 tokens, the queries in the last 32; band(8) over two
    # layers reaches 16 tokens back. A fixed seed keeps the test's runtime (~20 s) predictable.
    chance = math.log(example.VALUES)
    runs = {name: example.train(example.PATTERNS[name].format(w=8, g=4, block=16), n=128, steps=250, g=4,
                                quiet=True) for name in ("band + global", "band")}
    learned, local = runs["band + global"], runs["band"]
    assert learned[0] > chance - 0.3 and min(learned[-3:]) < 0.5, learned     # the loss falls
    assert min(local[-5:]) > chance - 0.2, local                             # and stays at chance


LEARN_SPAN = Path(__file__).parents[1] / "examples/learn_span.py"


@pytest.mark.slow
def test_expire_span_learns_its_spans_through_the_backward():
    """The spans reach the model only as a call-time input of a with expression: they move only
    if sparsec's backward gives them gradients, and the loss falls only once they are long enough."""
    spec = importlib.util.spec_from_file_location("learn_span", LEARN_SPAN)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # keys every 16 tokens: span + ramp (8) must reach 15 tokens back, from spans of 4
    curves = example.train(n=128, steps=100, period=16, quiet=True)
    first, last = curves["spans"][0], curves["spans"][-1]
    assert max(last) > max(first) + 2.5, curves["spans"]
    assert max(last) + example.RAMP >= 15 - 0.5, curves["spans"]
    assert curves["loss"][0] > math.log(example.VALUES) - 0.3 and curves["loss"][-1] < 0.3, curves["loss"]

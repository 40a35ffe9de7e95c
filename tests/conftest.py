"""Shared strategies: random .sa pattern sources, sizes and tilings for the property tests."""
import os

from hypothesis import HealthCheck, settings, strategies as st

import sparsec  # noqa: F401  first: without CUDA it imports triton for the interpreter (runtime/loader.py)

settings.register_profile("ci", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", deadline=None, max_examples=60,   # test_fuzz.py's long profile; the rest as ci
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# on a GPU, tests run the default tiles: tuning every shape they draw would take hours (the
# tuner's own tests say autotune=True where they mean it)
os.environ.setdefault("SPARSEC_AUTOTUNE", "0")
# kernel properties run the Triton interpreter: fewer examples, unless a thorough run asks for more
KERNEL_EXAMPLES = 25 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else 300

small = st.integers(0, 9)
positive = st.integers(1, 7)

LEAVES = [
    st.just("full"), st.just("causal"), st.just("empty"), st.just("logsparse"),
    st.builds("band({})".format, small),
    st.builds("band({}, {})".format, small, st.integers(-3, 9)),
    st.builds("dilated({}, {})".format, small, positive),
    st.builds("stride({})".format, positive),
    st.builds("chunk({})".format, positive),
    st.builds("global({})".format, small),
    st.builds("global([{}, {}])".format, small, st.integers(0, 40)),
    st.builds("last({})".format, small),
    st.builds("sink({})".format, small),
    st.builds("random({}, seed={})".format, small, small),
]
# where(...) in the shapes conditions.plan reads analytically (rows, keys, key matches, and/or/not)
# and the pairwise fallback; their tiles are sound, and exact for rows or keys alone
EXACT_WHERE = [
    st.builds("where(h == 1 and j >= {})".format, small),
    st.builds("where(i % {} < {} or i == {})".format, positive, small, small),
    st.builds("where(not (j % {} == {}))".format, positive, small),
]
WHERE = EXACT_WHERE + [
    st.builds("where(i % {} == j % 3 or i < j - {})".format, positive, small),
    st.builds("where(i // {} == j // {} and not (i % 2 == h % 2))".format, positive, positive),
    st.builds("where(i < {} and j < {} or i == n - 1 and j == {})".format, small, small, small),
    st.builds("where(j // {} != (i + {}) // 3)".format, positive, small),
    st.builds("where(i % {} == j % {} and i - j < {})".format, positive, positive, small),
]
EXACT_LEAVES = LEAVES + EXACT_WHERE
LEAVES = LEAVES + WHERE


def _compose(children):
    return st.one_of(
        st.builds("({} + {})".format, children, children),
        st.builds("({} & {})".format, children, children),
        st.builds("({} - {})".format, children, children),
        st.builds("heads({}, {})".format, children, children),
        st.builds("blocks({}, {})".format, st.integers(1, 5), children),
    )


patterns = st.recursive(st.one_of(LEAVES), _compose, max_leaves=6)


@st.composite
def shapes(draw):
    """(n_q, n_k, q_offset or None, heads): odd sizes, n_q != n_k, offsets, several heads."""
    n_q, n_k = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    offset = draw(st.one_of(st.none(), st.integers(-4, 40)))
    return n_q, n_k, offset, draw(st.integers(1, 3))


tiles = st.tuples(st.sampled_from([1, 2, 3, 8, 16]), st.sampled_from([1, 4, 5, 16]))

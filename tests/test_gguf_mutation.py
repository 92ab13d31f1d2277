"""Random byte mutations of a GGUF file's header, metadata and tensor infos: each mutated file must load a model with
the original logits, or one the file validly describes (a changed rms eps / rope base), or raise GGUFError (a
ValueError naming what is wrong), within seconds and a bounded amount of memory. Before the header checks a single
flipped count made load_gguf (or gguf-py's reader under it) run for minutes and allocate gigabytes."""

import contextlib
import resource
import signal
import time

import numpy as np
import pytest
import torch

import qkernels
from qkernels.formats.gguf import GGUFError

from .gguf_corruption_fixtures import field_value_ranges, header_end, logits, write_tiny_gguf

pytest.importorskip("gguf")
pytest.importorskip("transformers")

SECONDS = 10  # per load and forward; ~0.2 s on an idle machine, the rest is room for a loaded CI machine
MEMORY_MB = 300  # growth of the process's peak RSS over all mutations
# fields whose value is free within "finite and positive": a flip there can make another valid model
FREE = {"llama.attention.layer_norm_rms_epsilon": "rms_norm_eps", "llama.rope.freq_base": "rope_theta"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf_mutation") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@contextlib.contextmanager
def time_limit(seconds):
    def fire(signum, frame):
        raise TimeoutError(f"load_gguf ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rope_theta(cfg):
    rope = getattr(cfg, "rope_parameters", None) or {}
    return rope.get("rope_theta", getattr(cfg, "rope_theta", None))


def test_random_header_mutations_load_the_same_model_or_raise(tiny, tmp_path):
    import gguf

    path, ref = tiny
    data = path.read_bytes()
    end = header_end(path)
    free = {key: rng for key, rng in field_value_ranges(path).items() if key in FREE}
    assert len(free) == 2
    rng = np.random.default_rng(20261203)
    outcomes = {"raised": 0, "same": 0, "other valid value": 0}
    rss0 = peak_rss_mb()
    for i in range(40):
        raw = bytearray(data)
        at = int(rng.integers(0, end))
        raw[at] ^= int(rng.integers(1, 256))
        p = tmp_path / f"m{i}.gguf"
        p.write_bytes(bytes(raw))
        t0 = time.perf_counter()
        with time_limit(SECONDS):
            try:
                model = qkernels.load_gguf(p)
            except GGUFError:
                outcomes["raised"] += 1
                model = None
            else:
                got = logits(model)
        assert time.perf_counter() - t0 < SECONDS
        if model is None:
            continue
        if torch.equal(got, ref):
            outcomes["same"] += 1
            continue
        # another model: only where the flipped byte lies in a free value, and the model must be what the file says
        key = next((k for k, (a, b) in free.items() if a <= at < b), None)
        assert key is not None, f"mutation {i} (byte {at}) loads a different model without an error"
        want = float(gguf.GGUFReader(p).fields[key].contents())
        have = model.config.rms_norm_eps if FREE[key] == "rms_norm_eps" else rope_theta(model.config)
        assert have == pytest.approx(want, rel=1e-6), (key, have, want)
        outcomes["other valid value"] += 1
        del model
    assert peak_rss_mb() - rss0 < MEMORY_MB
    # the mutations reach the checks (a suite where every flip hit ignored bytes would prove nothing)
    assert outcomes["raised"] >= 10, outcomes

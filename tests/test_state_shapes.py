"""The analytic state_dict shapes (read without torch when a file's header is checked) against a model built on
the meta device, over the shapes a config can take."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_cli.model.config import MLP_KINDS, NORMS, POS_ENCODINGS, ModelConfig
from gen_cli.model.info import state_shapes
from gen_cli.model.transformer import Transformer


@st.composite
def configs(draw: st.DrawFn) -> ModelConfig:
    n_kv_head = draw(st.integers(1, 3))
    n_head = n_kv_head * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 6))
    flags = {
        name: draw(st.booleans()) for name in ("qkv_bias", "attn_out_bias", "mlp_bias", "qk_norm", "tie_embeddings")
    }
    return ModelConfig(
        vocab_size=draw(st.integers(8, 40)), n_layer=draw(st.integers(1, 3)), n_head=n_head, n_kv_head=n_kv_head,
        d_model=2 * draw(st.integers(2, 12)), d_ff=draw(st.integers(4, 40)), context_length=draw(st.integers(4, 32)),
        pos_encoding=draw(st.sampled_from(POS_ENCODINGS)), norm=draw(st.sampled_from(NORMS)),
        mlp=draw(st.sampled_from(MLP_KINDS)), head_dim=head_dim, **flags,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(configs())
def test_state_shapes_match_a_built_model(config: ModelConfig) -> None:
    with torch.device("meta"):
        built = Transformer(config).state_dict()
    assert list(state_shapes(config).items()) == [(k, tuple(v.shape)) for k, v in built.items()]

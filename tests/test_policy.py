"""Default policy across architectures' naming, and user rules."""

import pytest

from deltahub.errors import InvalidCodecParamsError
from deltahub.policy import Policy, Rule, in_transformer_block_matrix, parse_params

BLOCK_MATRICES = [
    ("model.layers.0.self_attn.q_proj.weight", 2),  # Llama / Mistral / Qwen
    ("model.layers.11.mlp.down_proj.weight", 2),
    ("transformer.h.3.attn.c_attn.weight", 2),  # GPT-2 Conv1D
    ("transformer.h.3.mlp.c_fc.weight", 2),
    ("gpt_neox.layers.2.attention.query_key_value.weight", 2),  # GPT-NeoX / Pythia
    ("encoder.layer.5.attention.self.query.weight", 2),  # BERT
    ("model.layers.0.mlp.experts.gate_up_proj", 3),  # fused MoE experts (transformers 5)
    ("model.layers.0.mlp.shared_expert.up_proj.weight", 2),  # Qwen2-MoE shared expert
    ("model.decoder.layers.1.fc1.weight", 2),  # OPT
]
KEPT_EXACT = [
    ("model.embed_tokens.weight", 2),
    ("lm_head.weight", 2),
    ("transformer.wte.weight", 2),
    ("transformer.wpe.weight", 2),
    ("gpt_neox.embed_out.weight", 2),
    ("model.layers.0.input_layernorm.weight", 1),
    ("transformer.h.0.ln_1.weight", 1),
    ("model.layers.0.self_attn.q_proj.bias", 1),
    ("model.norm.weight", 1),
    ("encoder.layer.0.attention.output.LayerNorm.weight", 1),
]


@pytest.mark.parametrize("name,ndim", BLOCK_MATRICES)
def test_block_matrices_are_coded(name: str, ndim: int) -> None:
    assert in_transformer_block_matrix(name, ndim)
    assert Policy().choose(name, ndim) == ("bitdelta", {})


@pytest.mark.parametrize("name,ndim", KEPT_EXACT)
def test_embeddings_heads_norms_biases_stay_raw(name: str, ndim: int) -> None:
    assert not in_transformer_block_matrix(name, ndim)
    assert Policy().choose(name, ndim)[0] == "raw"


def test_rule_order_include_exclude() -> None:
    p = Policy(codec="bitdelta", params={"granularity": "row"},
               rules=[Rule.parse("re:\\.mlp\\.=raw:zstd_level=5"), Rule.parse("lm_head.weight=bitdelta")],
               exclude=["*.k_proj.*"])
    assert p.choose("model.layers.0.mlp.up_proj.weight", 2) == ("raw", {"zstd_level": 5})
    assert p.choose("lm_head.weight", 2) == ("bitdelta", {})
    assert p.choose("model.layers.0.self_attn.k_proj.weight", 2)[0] == "raw"
    assert p.choose("model.layers.0.self_attn.q_proj.weight", 2) == ("bitdelta", {"granularity": "row"})
    only = Policy(include=["*.q_proj.weight"])
    assert only.choose("model.layers.0.self_attn.q_proj.weight", 2)[0] == "bitdelta"
    assert only.choose("model.layers.0.self_attn.v_proj.weight", 2)[0] == "raw"


def test_parse_params_and_bad_rules() -> None:
    assert parse_params("granularity=group,group_size=64,x=0.5,flag=true,unset=null") == {
        "granularity": "group", "group_size": 64, "x": 0.5, "flag": True, "unset": None}
    # codec values that look like keywords stay strings (deltadq entropy=none, group_size=auto)
    assert parse_params("entropy=none,group_size=auto,preset=16x,quantizer=uniform") == {
        "entropy": "none", "group_size": "auto", "preset": "16x", "quantizer": "uniform"}
    with pytest.raises(InvalidCodecParamsError, match="PATTERN=CODEC"):
        Rule.parse("no-codec-here")
    with pytest.raises(InvalidCodecParamsError, match="key=value"):
        parse_params("justakey")
    with pytest.raises(InvalidCodecParamsError, match="regular expression"):
        Rule("re:(", "raw").matches("x")

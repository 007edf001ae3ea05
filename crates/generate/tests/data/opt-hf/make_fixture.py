"""Writes the tiny random OPT fixture of crates/generate/tests/opt.rs and its reference logits,
computed by Hugging Face transformers' OPTForCausalLM.

    python3 -m venv /tmp/optref && /tmp/optref/bin/pip install torch transformers safetensors
    /tmp/optref/bin/python make_fixture.py   # in this directory

Outputs: tiny-opt.safetensors (the checkpoint, Hugging Face tensor names, f32), config.json
(its OPTConfig) and reference.json (prompt ids, greedy continuation, logits of every position
in float32 and float64).
"""

import json

import torch
from safetensors.torch import save_file
from transformers import OPTConfig, OPTForCausalLM

torch.manual_seed(1234)

config = OPTConfig(
    vocab_size=70,
    hidden_size=48,
    num_hidden_layers=2,
    ffn_dim=120,
    num_attention_heads=4,
    max_position_embeddings=40,
    do_layer_norm_before=True,
    word_embed_proj_dim=48,
    enable_bias=True,
    layer_norm_elementwise_affine=True,
    activation_function="relu",
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    layerdrop=0.0,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
    tie_word_embeddings=True,
)
model = OPTForCausalLM(config).eval()

# Random weights of a useful scale (the default init, std 0.02, gives flat logits).
with torch.no_grad():
    for name, p in model.named_parameters():
        u = torch.rand(p.shape) * 2 - 1
        if "layer_norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * u)
        elif name.endswith("bias"):
            p.copy_(0.1 * u)
        elif "embed" in name:
            p.copy_(u)
        else:
            p.copy_(u * 1.7 / p.shape[1] ** 0.5)

state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
save_file(state, "tiny-opt.safetensors", metadata={"format": "pt"})
config.to_json_file("config.json")

prompt = [2, 45, 7, 61, 13, 30, 8, 52, 19, 66, 4, 27]
n_new = 8


def logits_of(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]


ids = list(prompt)
for _ in range(n_new):
    ids.append(int(torch.argmax(logits_of(model, ids)[-1])))
l32 = logits_of(model, ids)
l64 = logits_of(model.double(), ids)

with open("reference.json", "w") as f:
    json.dump(
        {
            "generator": f"make_fixture.py: transformers {__import__('transformers').__version__} "
            f"OPTForCausalLM, torch {torch.__version__}, CPU; greedy (arg-max of float32 logits) "
            f"by full forwards; logits of every position of ids, float32 and float64",
            "n_prompt": len(prompt),
            "ids": ids,
            "logits_f32": l32.tolist(),
            "logits_f64": l64.tolist(),
        },
        f,
    )
print("ids", ids)
print("max |f32 - f64|", (l32.double() - l64).abs().max().item())

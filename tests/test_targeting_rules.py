"""The targeting rules (issue 12), each on real transformers architectures built tiny from their configs and on
plain torch modules, asserting the exact set of selected module names.

1. roles are judged against the width of the sub-model a layer belongs to (LLaVA, CLIP, a hand-built pair);
2. `layers=` indexes the block: the outermost layers.N / layer.N / h.N / block.N / blocks.N (T5, nn.TransformerEncoder);
3. a layer whose forward its parent bypasses (nn.MultiheadAttention.out_proj) is never a target;
4. a plain name matches a whole trailing part of the path, as PEFT's list does; exclusions add to the defaults;
5. what cannot be adapted (convolutions, fused MoE experts, bare parameters) is listed and refused by kind;
6. task heads (classifier, score, qa_outputs, ...) are not default targets.
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForQuestionAnswering, CLIPConfig, CLIPModel, CLIPTextConfig,
                          CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          LlavaConfig, LlavaForConditionalGeneration, MixtralConfig, MixtralForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM, RobertaConfig, RobertaForSequenceClassification,
                          T5Config, T5ForConditionalGeneration)

import lora_lite as ll
import tiny
from lora_lite.anatomy import block_index, widths
from lora_lite.exclusions import heads, unadaptable

warnings.filterwarnings("ignore", message=".*token_id must be `None`.*")  # CLIP's default bos/eos, tiny vocab


def selected(model, **kw) -> set[str]:
    """The module names `kw` selects (attached, then detached again)."""
    with ll.attached(model, ll.LoRAConfig(r=2, **kw)) as handle:
        return {t.name for t in handle.targets}


def build(make, config):
    torch.manual_seed(0)
    return make(config).eval()


def llava():
    """CLIP vision tower 32 wide, Llama language model 64 wide; the LLaVA config itself has no width."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=32)
    text = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return build(LlavaForConditionalGeneration, LlavaConfig(vision_config=vision, text_config=text,
                                                            image_token_index=95))


def clip():
    """CLIP text tower 32 wide, vision tower 48 wide, both projected to 24."""
    text = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    return build(CLIPModel, CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))


def t5():
    return build(T5ForConditionalGeneration, T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                      num_heads=4, decoder_start_token_id=0))


def llama():
    return build(LlamaForCausalLM, LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=16, tie_word_embeddings=False))


def mixtral():
    return build(MixtralForCausalLM, MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=8, num_local_experts=4, num_experts_per_tok=2))


def qwen3_moe():
    return build(Qwen3MoeForCausalLM, Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     moe_intermediate_size=16, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                     num_experts=4, num_experts_per_tok=2))


def names(prefix: str, leaves, blocks=range(2)) -> set[str]:
    return {prefix.format(i=i) + "." + leaf for i in blocks for leaf in leaves}


CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
LLAMA_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
T5_ENCODER = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
              "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo")
T5_DECODER = T5_ENCODER[:4] + ("layer.1.EncDecAttention.q", "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v",
                               "layer.1.EncDecAttention.o", "layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wo")


# --- 1. width per sub-model ------------------------------------------------------------------------

def test_llava_each_tower_against_its_own_width():
    model = llava()
    assert widths(model) == {"": 64, "model.vision_tower": 32, "model.language_model": 64}
    want = (names("model.vision_tower.encoder.layers.{i}", CLIP_LAYER)
            | names("model.language_model.layers.{i}", LLAMA_LAYER)
            | {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"})
    with ll.attached(model, ll.LoRAConfig(r=2)) as handle:
        got = {t.name: (t.role, t.width, t.scope) for t in handle.targets}
    assert set(got) == want and len(want) == 28
    lm = "model.language_model.layers.0."
    assert got[lm + "self_attn.q_proj"] == ("reader", 64, "model.language_model")  # 64x64: was "inner" vs 32
    assert got[lm + "mlp.down_proj"] == ("writer", 64, "model.language_model")
    assert got["model.vision_tower.encoder.layers.0.mlp.fc1"] == ("reader", 32, "model.vision_tower")
    # the projector lies outside both towers: judged against the model's input embedding (the LM's, 64)
    assert got["model.multi_modal_projector.linear_1"] == ("writer", 64, "")


def test_clip_two_towers_of_other_widths():
    model = clip()
    assert widths(model) == {"": 24, "text_model": 32, "vision_model": 48}
    with ll.attached(model, ll.LoRAConfig(r=2)) as handle:
        got = {t.name: (t.role, t.width) for t in handle.targets}
    want = names("text_model.encoder.layers.{i}", CLIP_LAYER, [0]) | names(
        "vision_model.encoder.layers.{i}", CLIP_LAYER, [0]) | {"text_projection", "visual_projection"}
    assert set(got) == want
    assert got["vision_model.encoder.layers.0.mlp.fc1"] == ("reader", 48)
    assert got["text_model.encoder.layers.0.mlp.fc2"] == ("writer", 32)
    assert got["visual_projection"] == ("writer", 24)  # no config width: the common width of its part


class Tower(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=d)
        self.layers = nn.ModuleList(tiny.Block(d, 2 * d) for _ in range(2))


class TwoTowers(nn.Module):
    """Plain torch: two sub-models 8 and 12 wide, each with its own config; a bridge from a into b, which is
    12 wide like the whole model (so b is no sub-model of its own)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=12)
        self.a, self.b, self.bridge = Tower(8), Tower(12), nn.Linear(8, 12)


def test_hand_built_towers_with_their_own_configs():
    model = TwoTowers()
    assert widths(model) == {"": 12, "a": 8}
    leaves = [n for n, _ in tiny.Block(4, 8).named_children()]
    assert selected(model) == names("a.layers.{i}", leaves) | names("b.layers.{i}", leaves) | {"bridge"}


def test_hand_built_towers_inner_is_per_tower():
    model = TwoTowers()
    # square at the other tower's width: one global width would call one of them a square reader/writer
    model.a.layers[0].mix, model.b.layers[0].mix = nn.Linear(12, 12), nn.Linear(8, 8)
    assert selected(model, target_roles=("inner",)) == {"a.layers.0.mix", "b.layers.0.mix"}


# --- 2. layers= is the block index -----------------------------------------------------------------

def test_t5_layers_selects_block_0_of_encoder_and_decoder():
    got = selected(t5(), layers=(0,))
    assert got == names("encoder.block.{i}", T5_ENCODER, [0]) | names("decoder.block.{i}", T5_DECODER, [0])
    assert len(got) == 16 and "encoder.block.1.layer.0.SelfAttention.q" not in got


def test_torch_transformer_encoder_layers():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=3,
                                  enable_nested_tensor=False)
    assert selected(model, layers=(1,)) == {"layers.1.linear1", "layers.1.linear2"}


class Nested(nn.Module):
    """blocks.N.layers.M: the block is N, whatever M."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(8, 16), "fc2": nn.Linear(16, 8)})
                                                   for _ in range(3))}) for _ in range(2))


def test_nested_block_naming_takes_the_outermost_index():
    want = {f"blocks.1.layers.{j}.{leaf}" for j in range(3) for leaf in ("fc1", "fc2")}
    assert selected(Nested(), layers=(1,)) == want
    with pytest.raises(ValueError, match=r"layers \[2\] do not exist.*present: \[0, 1\]"):
        ll.attach(Nested(), ll.LoRAConfig(layers=(2,)))
    assert [block_index(n) for n in ("h.3.layer.0.mlp", "encoder.block.0.layer.1.wi", "x.blocks.5",
                                     "hh.4.fc", "lm_head", "layers.7")] == [3, 0, 5, None, None, 7]


# --- 3. layers whose forward the parent bypasses ---------------------------------------------------

def test_multihead_attention_out_proj_is_never_a_target():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    snap = tiny.snapshot(mha)
    with pytest.raises(ValueError, match="no linear-like module to adapt") as err:
        ll.attach(mha, ll.LoRAConfig())
    assert "out_proj (bypassed by nn.MultiheadAttention)" in str(err.value)
    assert "in_proj_weight (bare parameter (48, 16) of MultiheadAttention)" in str(err.value)
    with pytest.raises(ValueError, match="'out_proj' matches only what lora-lite cannot adapt.*never calls its "
                                         "forward"):
        ll.attach(mha, ll.LoRAConfig(target_names=("out_proj",)))
    tiny.assert_restored(mha, snap)


def test_transformer_encoder_layer_adapts_only_live_layers():
    """The bug: out_proj was adapted, its hook never ran, and merge then changed the outputs."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    base = model(x)
    handle = ll.attach(model, ll.LoRAConfig(r=2))
    assert {t.name for t in handle.targets} == {"linear1", "linear2"}
    tiny.perturb(model)
    hooked = model(x)
    assert not torch.allclose(hooked, base, atol=1e-4)  # every adapted layer takes part
    ll.merge(model)
    assert torch.allclose(model(x), hooked, atol=1e-5)
    with pytest.raises(ValueError, match="'self_attn.out_proj' matches only what lora-lite cannot adapt"):
        ll.attach(model, ll.LoRAConfig(target_names=("self_attn.out_proj",)))


def test_transformer_decoder_layer_lists_both_attentions():
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True)
    assert selected(model) == {"linear1", "linear2"}
    assert [u.name for u in unadaptable(model)] == ["self_attn.in_proj_weight", "self_attn.out_proj",
                                                    "multihead_attn.in_proj_weight", "multihead_attn.out_proj"]


class Functional(nn.Module):
    """Uses proj's weight directly (a functional call) and fc's through a fused addmm: neither forward runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.proj, self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, ids):
        x = nn.functional.linear(self.embed(ids), self.proj.weight, self.proj.bias)
        h = torch.addmm(self.fc.bias, x.reshape(-1, 8), self.fc.weight.t()).reshape(*x.shape[:-1], 16)
        return self.out(h)


def watch_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_first_forward_warns_about_layers_whose_hook_did_not_run(tmp_path):
    model = Functional()
    ids = torch.tensor([[1, 2, 3]])
    with ll.attached(model, ll.LoRAConfig(r=2, target_roles=())) as handle:
        assert {t.name for t in handle.targets} == {"proj", "fc", "out"}
        with pytest.warns(UserWarning, match=r"the adapters on proj, fc \(2 layers\) did not run in the first "
                                             r"forward of Functional.*exclude_names"):
            model(ids)
        assert watch_hooks(model) == 0  # checked once: later forwards pay nothing
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(ids)
        ll.save(model, tmp_path / "a.safetensors")
    snap = tiny.snapshot(model)
    ll.load(model, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match="adapters on proj, fc"):  # a loaded adapter is watched too
        model(ids)
    ll.detach(model)
    tiny.assert_restored(model, snap)


def test_a_layer_whose_caller_did_not_run_is_not_reported():
    """A text-only forward of LLaVA skips the vision tower: nothing bypassed its layers."""
    model = llava()
    ids = torch.tensor([[1, 2, 3, 4]])
    ll.attach(model, ll.LoRAConfig(r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)
    assert watch_hooks(model) == 0
    ll.detach(model)
    snap = tiny.snapshot(model)
    ll.attach(model, ll.LoRAConfig(r=2))
    assert watch_hooks(model) > 0
    ll.detach(model)  # before any forward: the watch goes too
    tiny.assert_restored(model, snap)


# --- 4. PEFT name semantics; exclusions add to the defaults -----------------------------------------

def peft_names(model, target_modules) -> set[str]:
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=2, target_modules=target_modules))
    return {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if type(m).__name__ == "Linear"
            and hasattr(m, "lora_A")}


@pytest.mark.parametrize("make,target_modules", [
    (t5, ["q", "k", "v", "o"]), (t5, ["wi", "DenseReluDense.wo"]), (t5, ["EncDecAttention.q"]),
    (llama, ["q_proj", "v_proj"]), (llama, ["self_attn.o_proj", "mlp.down_proj"]), (llama, ["lm_head"]),
])
def test_plain_names_select_what_peft_selects(make, target_modules):
    ours = selected(make(), target_names=tuple(target_modules), target_roles=())
    assert ours == peft_names(make(), target_modules)


def test_t5_qkvo_is_the_attention_only():
    got = selected(t5(), target_names=("q", "k", "v", "o"))
    assert len(got) == 24 and not any("DenseReluDense" in n for n in got)


def test_a_plain_name_matches_whole_path_parts_only():
    model = llama()
    for pattern in ("o", "attn.q_proj", "q_pro"):  # "o" was in every path; "attn" is not "self_attn"
        with pytest.raises(ValueError, match=f"'{pattern}' matches no linear-like module"):
            ll.attach(model, ll.LoRAConfig(target_names=(pattern,)))
    assert selected(model, target_names=(r"attn\.q_pro",)) == names("model.layers.{i}", ["self_attn.q_proj"])
    # a container stands for the layers inside it
    assert selected(model, target_names=("layers.1.mlp",)) == names("model.layers.{i}", LLAMA_LAYER[4:], [1])


def test_user_exclusions_add_to_the_defaults():
    model = llama()
    attention = names("model.layers.{i}", [leaf for leaf in LLAMA_LAYER if leaf.startswith("self_attn")])
    assert selected(model, exclude_names=("mlp",)) == attention  # the untied lm_head stays out
    assert selected(model, target_names=("lm_head",)) == {"lm_head"}  # named: selected, exclude_names untouched
    assert len(selected(t5(), exclude_names=("k",))) == 32 - 6  # only the k's, not "block"


def test_configs_saved_by_the_old_format_load(tmp_path):
    old = {"variant": "lora", "r": 2, "alpha": 4.0, "dtype": "float32", "dropout": 0.0,
           "target_roles": ["reader", "writer"], "target_names": [], "exclude_names": ["lm_head", "embed_tokens"],
           "layers": None, "use_rslora": False}
    cfg = ll.from_dict(old)
    assert cfg.exclude_names == ("lm_head", "embed_tokens")
    model = llama()
    want = selected(model)
    with ll.attached(model, cfg) as handle:
        assert {t.name for t in handle.targets} == want
        ll.save(model, tmp_path / "a.safetensors")
    assert {t.name for t in ll.load(model, tmp_path / "a.safetensors").targets} == want


# --- 5. what cannot be adapted is said -------------------------------------------------------------

@pytest.mark.parametrize("make,gate_up,down", [(mixtral, (4, 128, 32), (4, 32, 64)),
                                               (qwen3_moe, (4, 32, 32), (4, 32, 16))])
def test_fused_moe_experts_are_listed_and_refused(make, gate_up, down):
    model = make()
    assert selected(model) == names("model.layers.{i}", [leaf for leaf in LLAMA_LAYER if "self_attn" in leaf])
    kinds = {u.name: u.kind for u in unadaptable(model)}
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] == f"fused MoE experts {gate_up}"
    assert kinds["model.layers.1.mlp.experts.down_proj"] == f"fused MoE experts {down}"
    assert kinds["model.layers.0.mlp.gate.weight"].startswith("bare parameter (4, 32)")  # the router
    assert len(kinds) == 6
    snap = tiny.snapshot(model)
    for pattern in ("experts", "gate_up_proj", r"mlp\.experts"):
        with pytest.raises(ValueError, match="fused MoE expert parameters are not supported"):
            ll.attach(model, ll.LoRAConfig(target_names=(pattern,)))
    with pytest.raises(ValueError, match="'mlp.gate' matches only what lora-lite cannot adapt: a bare parameter"):
        ll.attach(model, ll.LoRAConfig(target_names=("mlp.gate",)))
    tiny.assert_restored(model, snap)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.fc1, self.classifier = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.classifier(torch.relu(self.fc1(x.flatten(1))))


def test_cnn_convolutions_are_listed_and_refused():
    model = CNN()
    assert selected(model) == {"fc1"}  # the classifier is a head
    assert [(u.name, u.kind) for u in unadaptable(model)] == [("conv1", "Conv2d"), ("conv2", "Conv2d")]
    with pytest.raises(ValueError, match="'conv1' matches only what lora-lite cannot adapt: convolutions are not "
                                         "supported"):
        ll.attach(model, ll.LoRAConfig(target_names=("conv1", "fc1")))


def test_models_with_nothing_linear_say_what_they_hold():
    torch.manual_seed(0)
    audio = nn.Sequential(nn.Conv1d(4, 8, 3), nn.GELU(), nn.Conv1d(8, 8, 3))
    with pytest.raises(ValueError, match=r"Sequential has no linear-like module to adapt\nNot adaptable:\n  0 "
                                         r"\(Conv1d\)\n  2 \(Conv1d\)"):
        ll.attach(audio, ll.LoRAConfig())
    lstm = nn.LSTM(8, 16)
    assert [u.name for u in unadaptable(lstm)] == ["weight_ih_l0", "weight_hh_l0"]


def test_vit_patch_embedding_is_listed():
    assert [(u.name, u.kind) for u in unadaptable(tiny.vit())] == [("vit.embeddings.patch_embeddings.projection",
                                                               "Conv2d")]


# --- 6. task heads are not default targets ---------------------------------------------------------

@pytest.mark.parametrize("variant", ["lora", "pissa", "gralora"])
def test_vit_classifier_is_left_out(variant):
    """With the 5-label head adapted, PiSSA (r > 5) and GraLoRA (k does not divide 5) refused to attach."""
    model = tiny.vit()
    cfg = tiny.cfg_for(variant, r=8, **({"k": 4} if variant == "gralora" else {}))
    with ll.attached(model, cfg) as handle:
        assert {t.name for t in handle.targets} == names("vit.layers.{i}", (
            "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"))
    assert heads(model) == {"classifier": "task head (outside the base model vit)"}
    assert selected(model, target_names=("classifier",)) == {"classifier"}


def test_sequence_classification_and_qa_heads():
    cls = build(LlamaForSequenceClassification, LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_labels=3, pad_token_id=0))
    assert selected(cls) == names("model.layers.{i}", LLAMA_LAYER, [0])  # not `score`
    bert = build(BertForQuestionAnswering, BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=64))
    assert "qa_outputs" in heads(bert) and not any("qa_outputs" in n for n in selected(bert))


def test_a_head_with_its_own_layers_is_left_out_whole():
    """RoBERTa's classifier is dense (a 32x32 writer by name) + out_proj: both outside the base model."""
    model = build(RobertaForSequenceClassification, RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, num_labels=3))
    assert set(heads(model)) == {"classifier.dense", "classifier.out_proj"}
    assert not any(n.startswith("classifier") for n in selected(model))
    assert selected(model, target_names=("classifier.dense",)) == {"classifier.dense"}
    assert selected(model, target_names=("classifier",)) == {"classifier.dense", "classifier.out_proj"}


# --- ll.summary says what it judged and what it left ------------------------------------------------

def test_summary_shows_widths_heads_and_what_cannot_be_adapted():
    model = mixtral()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=("q_proj",)))
    lines = ll.summary(model).splitlines()
    assert "roles judged against width 32 (the model)" in lines
    assert "target_names 'q_proj' matched 2: model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj" in lines
    assert "heads left out (name them in target_names to adapt): lm_head (output embeddings)" in lines
    assert "  model.layers.*.mlp.experts.gate_up_proj (fused MoE experts (4, 128, 32)) x2" in lines
    model = llava()
    ll.attach(model, ll.LoRAConfig(r=2))
    lines = ll.summary(model).splitlines()
    assert "roles judged against width 64 (the model), 32 (model.vision_tower), 64 (model.language_model)" in lines
    assert "  model.vision_tower.embeddings.patch_embedding (Conv2d)" in lines

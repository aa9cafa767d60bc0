"""Any timm or torchvision classifier: the registry, block discovery, generic scopes, and healing in exact
and fast mode (random weights, small inputs) with masked weights exactly zero and one graph per block."""
import copy

import pytest
import torch
from torch import nn

from starfish_fast import HealConfig, heal
from starfish_fast.models import GenericAdapter, adapter_for, model_spec, prunable_weights
from starfish_fast.models.scopes import generic_predicate
from starfish_fast.prune import magnitude_masks, structured_masks

# name -> (kwargs of create_model / get_model, input size): small enough for a 2-core CPU
MODELS = {
    "resnet18": (dict(num_classes=10), 32),
    "convnext_atto": (dict(num_classes=10), 32),
    "efficientnet_b0": (dict(num_classes=10), 32),
    "swin_tiny_patch4_window7_224": (dict(num_classes=10, img_size=32, window_size=2, embed_dim=32,
                                          depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2)), 32),
    "regnetx_002": (dict(num_classes=10), 32),
    "eva02_tiny_patch14_224": (dict(num_classes=10, img_size=28, depth=3), 28),
    "torchvision/resnet18": (dict(num_classes=10), 32),
    "torchvision/mobilenet_v3_small": (dict(num_classes=10), 32),
}


def build(name):
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = model_spec(name).build(**kwargs).eval()
    return model, torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))


def config(**overrides):
    return HealConfig(**{**dict(batch_size=4, lr=3e-4, lr_schedule="constant", progress=False, precision="fp32",
                                log_every=1), **overrides})


@pytest.mark.parametrize("name", list(MODELS))
def test_heals_in_exact_and_fast_mode(name):
    dense, images = build(name)
    adapter = adapter_for(dense)
    assert isinstance(adapter, GenericAdapter) and len(adapter.block_names(dense)) >= 3
    masks = magnitude_masks(dense, 0.5)
    runs = {}
    for mode, epochs in (("exact", 1), ("fast", 2)):
        model = copy.deepcopy(dense)
        torch.manual_seed(3)                                   # stochastic depth draws the same in both
        runs[mode] = heal(model, dense, masks, images, config(mode=mode, epochs=epochs))
        state = model.state_dict()
        assert all((state[key][~mask] == 0).all() for key, mask in masks.items()), mode
        assert type(model.get_submodule(adapter.block_names(dense)[0])) is type(dense.get_submodule(
            adapter.block_names(dense)[0]))                    # the capture classes are gone afterwards
        assert list(state) == list(dense.state_dict())
    exact, fast = runs["exact"].history[0]["loss"], runs["fast"].history
    assert fast[0]["loss"] == pytest.approx(exact, rel=1e-4)
    assert fast[1]["loss"] < fast[0]["loss"]


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "swin_tiny_patch4_window7_224", "torchvision/resnet18"])
def test_one_compiled_graph_per_distinct_block(name, compiled_graphs):
    graphs = compiled_graphs
    dense, images = build(name)
    if name == "convnext_atto":      # 64 px: at 32 its last stage is 1x1, whose two input layouts compile twice
        images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    adapter = adapter_for(dense)
    distinct = {}
    def remember(module, args, name):
        # a block's graph depends on its class, input shapes, parameter shapes and plain settings (Swin's
        # shift_size alternates); the first block's input needs no gradient (the stem is frozen)
        settings = tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (int, float, str, tuple))
                                and not k.startswith("_")))
        distinct[name] = (type(module), tuple(a.shape for a in args), tuple(p.shape for p in module.parameters()),
                          settings, name == adapter.block_names(dense)[0])

    hooks = [dense.get_submodule(b).register_forward_pre_hook(lambda module, args, b=b: remember(module, args, b))
             for b in adapter.block_names(dense)]
    dense(images[:4])
    for hook in hooks:
        hook.remove()
    result = heal(copy.deepcopy(dense), dense, magnitude_masks(dense, 0.5), images, config(epochs=1, compile="on"))
    assert set(result.ran["compile"].values()) == {"compiled"}
    assert len(graphs) == len(set(distinct.values()))          # no graph break, no recompile


def test_generic_scopes_leave_out_the_head_and_keep_the_stem_for_all():
    dense, _ = build("resnet18")
    blocks = adapter_for(dense).block_names(dense)
    linear = prunable_weights(dense, generic_predicate(dense, blocks, "linear"))
    conv = prunable_weights(dense, generic_predicate(dense, blocks, "conv"))
    everything = prunable_weights(dense, generic_predicate(dense, blocks, "all"))
    assert linear == {} and "fc.weight" not in everything                      # the classifier head: never
    assert "conv1.weight" in everything and "conv1.weight" not in conv          # the stem: only in all
    assert adapter_for(dense).default_scope == "conv"
    vit, _ = build("eva02_tiny_patch14_224")
    scopes = {s: set(prunable_weights(vit, generic_predicate(vit, adapter_for(vit).block_names(vit), s)))
              for s in ("linear", "attn", "mlp")}
    assert scopes["attn"] and scopes["mlp"] and scopes["attn"] | scopes["mlp"] == scopes["linear"]
    assert not scopes["attn"] & scopes["mlp"] and adapter_for(vit).default_scope == "linear"


def test_blocks_come_from_the_models_structure():
    names = {name: adapter_for(build(name)[0]).block_names(build(name)[0]) for name in
             ("resnet18", "convnext_atto", "swin_tiny_patch4_window7_224", "torchvision/mobilenet_v3_small")}
    assert names["resnet18"] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]          # group_matcher
    assert names["convnext_atto"][0] == "stages.0.blocks.0" and not any("downsample" in n for n in names[
        "convnext_atto"])
    assert names["swin_tiny_patch4_window7_224"] == ["layers.0.blocks.0", "layers.1.blocks.0", "layers.2.blocks.0",
                                                     "layers.2.blocks.1", "layers.3.blocks.0"]
    assert names["torchvision/mobilenet_v3_small"] == [f"features.{i}" for i in range(1, 12)]    # repeated units
    assert adapter_for(build("swin_tiny_patch4_window7_224")[0]).cosine_per == "token"                 # NHWC: per position


def test_structured_mlp_masks_and_compaction_on_a_generic_transformer():
    dense, images = build("swin_tiny_patch4_window7_224")
    masks = structured_masks(dense, 0.5, scope="linear", kind="mlp")
    exact = copy.deepcopy(dense)
    torch.manual_seed(3)
    reference = heal(exact, dense, masks, images, config(epochs=1, compact="off"))
    compacted = copy.deepcopy(dense)
    torch.manual_seed(3)
    result = heal(compacted, dense, masks, images, config(epochs=1, compact="on"))
    assert result.ran["compacted"] and result.step_losses == pytest.approx(reference.step_losses, rel=1e-5)
    for key, value in exact.state_dict().items():
        torch.testing.assert_close(compacted.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_registry_names_prefixes_transforms_and_errors():
    assert model_spec("deit_tiny_patch16_224").source == "reference"
    assert model_spec("fashion_vit").source == "bundled"
    assert model_spec("resnet18").source == "timm" and model_spec("torchvision/resnet18").source == "torchvision"
    assert model_spec("mobilenet_v3_small").source == "torchvision"
    with pytest.raises(ValueError, match=r"unknown model name 'resnet-18'; close matches: .*resnet18"):
        model_spec("resnet-18")
    with pytest.raises(ValueError, match="fixed architecture"):
        model_spec("fashion_vit").build(num_classes=3)
    one_channel = model_spec("resnet18").build(num_classes=10, in_chans=1)
    transform = model_spec("resnet18").transform(one_channel)
    from PIL import Image
    image = transform(Image.new("RGB", (40, 50), (120, 30, 200)))
    assert image.shape == (1, 224, 224)                        # timm's data config: 224 crop, gray for in_chans=1
    assert model_spec("torchvision/resnet18").transform(None)(Image.new("RGB", (300, 260))).shape == (3, 224, 224)


def test_a_new_source_is_one_registry_entry():
    """A source registered in the table is asked in order, builds, loads and transforms through ModelSpec."""
    from starfish_fast.models import sources

    class TinySource(sources.ModelSource):
        name = "tiny"
        builder_kwargs = ("out",)                                   # its builder's, not nn.Linear's

        def claim(self, name):
            return name.removeprefix("tiny/") if name.startswith("tiny/") else None

        def build(self, arch, **kwargs):
            return nn.Linear(int(arch), kwargs.get("out", 2))

        def pretrained(self, spec, pretrained_file=None, **kwargs):
            model = self.build(spec.arch, **kwargs)
            nn.init.ones_(model.weight)                             # its "trained" weights
            return model

        def transform(self, arch, model):
            return torch.as_tensor

    sources.register_source(TinySource)
    try:
        spec = model_spec("tiny/5")
        assert (spec.source, spec.arch) == ("tiny", "5") and spec.model_source.name == "tiny"
        assert spec.build(out=3).weight.shape == (3, 5) and spec.skeleton(out=3).weight.is_meta
        assert spec.build_pretrained().weight.eq(1).all() and spec.transform(None) is torch.as_tensor
        assert model_spec("resnet18").source == "timm"            # the others still answer in their turn
        with pytest.raises(ValueError, match="unknown model name 'tiny5'"):
            model_spec("tiny5")
    finally:
        sources.SOURCES.pop()


def test_library_errors_name_the_argument_and_the_command_line_its_flag():
    from starfish_fast.cli_wording import with_flags
    from starfish_fast.models.registry import weights_argument

    with pytest.raises(ValueError) as error:
        weights_argument("resnet18", dense_path="d.pt", random_init=True)
    assert str(error.value).startswith("`dense_path` and `random_init`: give one of `dense_path`")
    assert with_flags(str(error.value)) == ("--dense-path and --random-init: give one of --dense-path, --pretrained, "
                                            "--pretrained-file and --random-init")
    with pytest.raises(ValueError) as error:
        model_spec("resnet18").skeleton(num_clases=3)
    assert with_flags(str(error.value)).startswith("--model-kwargs num_clases=3: resnet18 (ResNet) takes no argument")
    assert with_flags("`pretrained=True`: give `dense_path=FILE` or `random_init=True`; `x` `block_names`") == \
        "--pretrained: give --dense-path FILE or --random-init; `x` --blocks"
    assert weights_argument("fashion_vit") == "bundled" and weights_argument("resnet18", pretrained=True) == "pretrained"


def test_custom_block_names_for_a_generic_model():
    dense, images = build("resnet18")
    blocks = ["layer1", "layer2", "layer3", "layer4"]
    result = heal(copy.deepcopy(dense), dense, magnitude_masks(dense, 0.5), images, config(epochs=1),
                  block_names=blocks)
    assert result.plan.blocks == tuple(blocks) and result.plan.family == "generic"
    with pytest.raises(ValueError, match="block names not found"):
        heal(copy.deepcopy(dense), dense, magnitude_masks(dense, 0.5), images, config(epochs=1),
             block_names=["layer9"])


def test_a_model_without_blocks_is_a_clear_error():
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match="found no blocks in Sequential: pass `block_names`"):
        adapter_for(tiny)

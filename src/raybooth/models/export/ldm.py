"""The original checkpoint layout (CompVis' ldm for SD 1.x/2.x, Stability's sgm for SDXL), one
table per kind of part: the name each diffusers weight takes in the one file that ComfyUI,
AUTOMATIC1111 and Forge load. diffusers holds this direction only in its scripts, not in the
package; the tables below are the ones of scripts/convert_diffusers_to_original_stable_diffusion.py
and scripts/convert_diffusers_to_original_sdxl.py (github.com/huggingface/diffusers): `UNET_FIXED`,
`UNET_RESNET` (their unet_conversion_map and unet_conversion_map_resnet), the block prefixes of
`unet_table` (their unet_conversion_map_layer), `VAE_FIXED`, `VAE_RESNET`, `VAE_ATTENTION` and the
prefixes of `vae_table` (vae_conversion_map, vae_conversion_map_attn), `OPEN_CLIP_FIXED` and
`OPEN_CLIP_LAYER` (textenc_conversion_lst). The scripts count SD 1.5's and SDXL's blocks by hand;
here the block prefixes are laid out from the model's config, so one table serves every size of
the architecture, the tiny test models included. A weight no table places is an error, never dropped."""

from __future__ import annotations

from dataclasses import dataclass

from raybooth.errors import RayboothError

# (diffusers, original). An entry ending in "." renames a prefix, else one whole name.
UNET_FIXED = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
              ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
              # SDXL's pooled text embedding and time ids (sgm's label_emb)
              ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
               ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]
VAE_FIXED = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
# The VAE's mid-block attention: q, k, v and proj_out are 1x1 convolutions in the original.
VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out."),
                 ("query.", "q."), ("key.", "k."), ("value.", "v."), ("proj_attn.", "proj_out.")]  # older folders
VAE_CONVOLUTIONS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")
# OpenCLIP (SD 2.x's text encoder, SDXL's second): names of transformers' CLIPTextModel, "text_model." removed.
OPEN_CLIP_FIXED = [("embeddings.token_embedding.weight", "token_embedding.weight"),
                   ("embeddings.position_embedding.weight", "positional_embedding"),
                   ("final_layer_norm.", "ln_final."),
                   ("text_projection.weight", "text_projection")]  # transposed: OpenCLIP multiplies x @ P
OPEN_CLIP_LAYER = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                   ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")]
QKV = ("q_proj", "k_proj", "v_proj")  # one in_proj weight in OpenCLIP, in this order

Table = dict[str, tuple[str, list[tuple[str, str]]]]  # diffusers name or prefix -> (original, inner renames)


def _add(table: Table, pairs, inner=()) -> None:
    for diffusers, original in pairs:
        table[diffusers] = (original, list(inner))


def blocks_per_level(config: dict) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise RayboothError(f"a UNet with {list(layers)} layers per block has no original checkpoint layout")
        layers = layers[0]
    return layers


def unet_table(config: dict, keys) -> Table:
    """The UNet's prefixes: down block i's layer j is input block 1 + i*(n+1) + j (n layers a level,
    the level's downsampler after them), up block i's layer j output block i*(n+1) + j, whose
    upsampler follows its attention (slot 2) or its resnet alone (slot 1)."""
    n = blocks_per_level(config)
    table: Table = {}
    _add(table, UNET_FIXED)
    for i in range(len(config["down_block_types"])):
        for j in range(n):
            _add(table, [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (n + 1) + j}.0.")], UNET_RESNET)
            _add(table, [(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (n + 1) + j}.1.")])
        _add(table, [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (n + 1)}.0.op.")])
    _add(table, [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.resnets.1.", "middle_block.2.")], UNET_RESNET)
    _add(table, [("mid_block.attentions.0.", "middle_block.1.")])
    for i in range(len(config["up_block_types"])):
        for j in range(n + 1):
            _add(table, [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (n + 1) + j}.0.")], UNET_RESNET)
            _add(table, [(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (n + 1) + j}.1.")])
        slot = 2 if any(key.startswith(f"up_blocks.{i}.attentions.") for key in keys) else 1
        _add(table, [(f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (n + 1) + n}.{slot}.")])
    return table


def vae_table(config: dict) -> Table:
    """The VAE's prefixes: the decoder's up blocks count down in the original (up.{levels-1-i})."""
    levels, n = len(config["up_block_types"]), config["layers_per_block"]
    table: Table = {}
    _add(table, VAE_FIXED)
    for side in ("encoder", "decoder"):
        for name in ("conv_in.", "conv_out."):
            _add(table, [(f"{side}.{name}", f"{side}.{name}")])
        _add(table, [(f"{side}.mid_block.resnets.{k}.", f"{side}.mid.block_{k + 1}.") for k in (0, 1)], VAE_RESNET)
        _add(table, [(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")], VAE_ATTENTION)
    for i in range(levels):
        _add(table, [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(n)],
             VAE_RESNET)
        _add(table, [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")])
        up = levels - 1 - i
        _add(table, [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.") for j in range(n + 1)],
             VAE_RESNET)
        _add(table, [(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.")])
    _add(table, [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")])
    return table


def open_clip_table(config: dict) -> Table:
    table: Table = {}
    _add(table, OPEN_CLIP_FIXED)
    _add(table, [(f"encoder.layers.{i}.", f"transformer.resblocks.{i}.") for i in range(config["num_hidden_layers"])],
         OPEN_CLIP_LAYER)
    return table


def place(key: str, table: Table, part: str) -> str:
    """`key`'s original name: its longest entry in `table` (the whole name, else a prefix ending
    at a dot), then the first inner rename that fits the rest."""
    pieces = key.split(".")
    for cut in range(len(pieces), 0, -1):
        head = ".".join(pieces[:cut]) + ("" if cut == len(pieces) else ".")
        if head in table:
            original, inner = table[head]
            rest = key[len(head):]
            for old, new in inner:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            return original + rest
    raise RayboothError(f"the {part}'s weight {key} has no place in the original checkpoint layout; this model "
                        "cannot be exported as one file")


def without_text_model(weights: dict) -> dict:
    """A CLIP text encoder's weights without the "text_model." of older transformers (and of
    CLIPTextModelWithProjection), and without the position ids buffer some older files carry."""
    return {key.removeprefix("text_model."): value for key, value in weights.items()
            if not key.endswith("position_ids")}


def unet_to_original(weights: dict, config: dict) -> dict:
    table = unet_table(config, weights)
    return {place(key, table, "UNet"): value for key, value in weights.items()}


def vae_to_original(weights: dict, config: dict) -> dict:
    table = vae_table(config)
    converted = {place(key, table, "VAE"): value for key, value in weights.items()}
    return {key: value.reshape(*value.shape, 1, 1) if ".mid.attn_1." in key and key.endswith(VAE_CONVOLUTIONS)
            and value.ndim == 2 else value for key, value in converted.items()}


def clip_to_original(weights: dict, config: dict) -> dict:
    """OpenAI's CLIP is kept in transformers' names in the original checkpoints, under "text_model."."""
    return {f"text_model.{key}": value for key, value in without_text_model(weights).items()}


def open_clip_to_original(weights: dict, config: dict) -> dict:
    """OpenCLIP's names; each layer's q, k and v projections joined into one in_proj."""
    import torch

    weights, table, converted = without_text_model(weights), open_clip_table(config), {}
    joined: dict[str, list] = {}  # in_proj name -> its q, k and v
    for key, value in weights.items():
        layer, _, rest = key.rpartition(".self_attn.")
        projection, _, kind = rest.partition(".")
        if layer and projection in QKV:
            slot = joined.setdefault(f"{place(layer + '.', table, 'text encoder')}attn.in_proj_{kind}", [None] * 3)
            slot[QKV.index(projection)] = value
            continue
        name = place(key, table, "text encoder")
        converted[name] = value.T.contiguous() if name.endswith("text_projection") else value
    for name, parts in joined.items():
        if any(part is None for part in parts):
            raise RayboothError(f"the text encoder lacks one of the q, k, v projections of {name}")
        converted[name] = torch.cat(parts)
    return converted


CONVERTERS = {"unet": unet_to_original, "vae": vae_to_original, "clip": clip_to_original,
              "open_clip": open_clip_to_original}


@dataclass(frozen=True)
class Layout:
    """One family's single file: which diffusers component goes where, converted by which table."""
    name: str  # as messages name it
    pipeline_class: str  # the model_index.json `_class_name` of its diffusers folders
    parts: tuple[tuple[str, str, str], ...]  # (component folder, key prefix in the file, CONVERTERS key)

    def prefix(self, component: str) -> str:
        return next(prefix for name, prefix, _ in self.parts if name == component)

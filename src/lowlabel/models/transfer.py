"""Transfer a pretrained encoder into a segmentation network, level by level (or, with
``transfer.scope: all``, a whole trained network of the same shape: a run or a model bundle).

MONAI's ``UNet`` nests each level inside the previous one, so the same encoder level has
different state-dict keys in networks of different depth (``model.1.submodule.0.*`` is level 1
in any depth, but the bottom level of a 3-level net is ``model.1.submodule.1.submodule.*``,
which in a 6-level net is a decoder-side container). Loading by key name therefore transfers the
wrong thing or nothing. Here :func:`encoder_blocks` names the encoder block of every level of a
built network, level ``k`` of the source is loaded into level ``k`` of the target for the
levels both have, and tensors inside a level are matched by name and shape, then by leaf name
and shape in order (so blocks with different ``num_res_units`` share what they can). Everything
loaded, skipped or mismatched is written to ``transfer.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowlabel import checkpoint
from lowlabel.atomic import write_json
from lowlabel.bundle import INFO, WEIGHTS, origin
from lowlabel.config import RunConfig, apply_overrides, from_dict, to_dict, validate
from lowlabel.errors import LowlabelError
from lowlabel.models.pretrain import build_pretrain_model
from lowlabel.models.unet import build_model
from lowlabel.run_folder import BEST, RESULT, TRANSFER, kept_checkpoints

log = logging.getLogger(__name__)


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder block of each resolution level, top (full resolution) first.

    For MONAI ``UNet``: level ``k < L-1`` is the down block ``model.(1.submodule.)*k 0`` and the
    last level is the bottom block. For ``DynUNet``: the input block, the down-sampling blocks
    and the bottleneck.

    Raises:
        LowlabelError: the network is neither.
    """
    from monai.networks.layers import SkipConnection
    from monai.networks.nets import DynUNet, UNet

    if isinstance(model, UNet):
        blocks = []
        node = model.model
        while isinstance(node, nn.Sequential) and isinstance(node[1], SkipConnection):
            blocks.append(node[0])
            node = node[1].submodule
        blocks.append(node)
        return blocks
    if isinstance(model, DynUNet):
        return [model.input_block, *model.downsamples, model.bottleneck]
    raise LowlabelError(f"transfer supports MONAI UNet and DynUNet, not {type(model).__name__}")


def block_names(model: nn.Module) -> list[str]:
    """Qualified module names of :func:`encoder_blocks`, e.g. ``['model.0',
    'model.1.submodule.0', 'model.1.submodule.1.submodule']`` for a 3-level UNet."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in encoder_blocks(model)]


def resolve_source(init_from: str | Path) -> Path:
    """A model bundle folder -> its weights; a pretraining run folder -> its final checkpoint; a
    training run folder -> its best weights; a file -> itself.

    Raises:
        LowlabelError: nothing usable at that path, or an ensemble bundle.
    """
    path = Path(init_from)
    if path.is_dir():
        info = path / INFO
        if info.is_file():
            check_single(path, _json(info))
            return path / WEIGHTS
        result = path / RESULT
        if result.exists():
            ckpts = _json(result).get("checkpoints")
            if ckpts:
                return Path(ckpts[str(max(int(s) for s in ckpts))])
        if (path / BEST).exists():
            return path / BEST
        found = kept_checkpoints(path)
        if found:
            return found[-1]
        raise LowlabelError(
            f"{path}: no model here (no bundle.json, best.safetensors or "
            "checkpoint-*.safetensors); pass a model bundle, a training or pretraining run "
            "folder, or a .safetensors checkpoint"
        )
    if not path.exists():
        raise LowlabelError(f"config key 'transfer.init_from': {path} does not exist")
    return path


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise LowlabelError(f"{path}: not valid JSON; the folder is damaged") from None
    return data if isinstance(data, dict) else {}


def check_single(path: Path, info: dict) -> None:
    """Refuse an ensemble bundle as a transfer source, naming the runs it was made from.

    Raises:
        LowlabelError: ``info`` (a ``bundle.json``) describes an ensemble.
    """
    members = info.get("ensemble", 1)
    if members != 1:
        runs = [m.get("run_dir") for m in info.get("members") or [] if isinstance(m, dict)]
        first = f" (e.g. export {runs[0]} alone)" if runs and runs[0] else ""
        raise LowlabelError(
            f"{path}: an ensemble of {members} models cannot initialise one network; export a "
            f"single run of it{first} and start from that bundle"
        )


SOURCE_DATA_KEYS = ("data.spatial_dims", "data.spacing", "data.patch_size")
"""Besides every ``model.*`` key, the settings a ``transfer.scope: all`` run takes from its source:
what the network was trained to see (a network trained at 2 mm is adapted at 2 mm)."""


def source_keys() -> list[str]:
    """Every key :func:`inherit` may take from the source: all ``model.*`` keys, then
    :data:`SOURCE_DATA_KEYS`."""
    return [f"model.{k}" for k in to_dict(RunConfig().model)] + list(SOURCE_DATA_KEYS)


def source_config(init_from: str | Path) -> tuple[RunConfig, Path, dict]:
    """The config a source (bundle, run or pretraining folder, checkpoint) was trained with, read
    from its checkpoint's metadata without loading the tensors.

    Returns:
        ``(config, checkpoint path, metadata)``.

    Raises:
        LowlabelError: nothing usable at ``init_from``, an ensemble, or no lowlabel config in the
            checkpoint.
    """
    path = resolve_source(init_from)
    meta = checkpoint.read_meta(path)
    if not isinstance(meta.get("config"), dict):
        raise LowlabelError(
            f"{path}: checkpoint has no lowlabel config in its metadata; "
            "use a checkpoint written by lowlabel pretrain or train"
        )
    try:
        return from_dict(meta["config"], check=False), path, meta
    except LowlabelError as err:
        raise LowlabelError(f"{path}: {err}") from None


def inherit(cfg: RunConfig, given: set[str] | frozenset[str]) -> tuple[RunConfig, list[str]]:
    """``cfg`` with the settings that define the source's network taken from the source.

    The one place a run's config is completed from its ``transfer.init_from``: ``lowlabel
    train`` and every study cell call it before the run folder is named (the folder follows
    from the config it returns). Only with ``transfer.scope: all`` and a mode other than
    ``scratch``: every ``model.*`` key and :data:`SOURCE_DATA_KEYS` come from the source's own
    config, except those in ``given`` (set in a config file, ``--set`` or a study layer): an
    explicit value wins, and if the network then differs from the source's, the error of
    :func:`load_all` names the difference (here, before anything is loaded or written). Other
    scopes and modes return ``cfg`` as it is.

    Args:
        cfg: the run config, possibly not yet validated (built with ``check=False``).
        given: the dotted keys the user set (:func:`lowlabel.config.given_keys`).

    Returns:
        ``(config, keys)``: the validated config, and the keys whose value came from the
        source, where it differs from ``cfg``'s own (in the order of :func:`source_keys`; empty
        when nothing is inherited or the source agrees with ``cfg``).

    Raises:
        LowlabelError: an unusable source, or a config that is invalid once completed.
    """
    t = cfg.transfer
    if t.scope != "all" or t.mode == "scratch" or not t.init_from:
        validate(cfg)
        return cfg, []
    source, path, meta = source_config(t.init_from)
    ours, theirs = to_dict(cfg), to_dict(source)
    values = {}
    for key in source_keys():
        section, name = key.split(".")
        if key not in given and theirs[section][name] != ours[section][name]:
            values[key] = theirs[section][name]
    taken = list(values)
    done = apply_overrides(cfg, values, check=False)
    validate(done)
    problem = model_difference(done, source)
    if problem:  # refused now, before a folder is named or anything is said
        raise network_error(path, problem, str(meta.get("kind", "")).startswith("pretrain"))
    if taken:
        log.info("%s", inherited_line(done, taken))
    return done, taken


def inherited_line(cfg: RunConfig, keys: list[str]) -> str:
    """One line naming the ``keys`` :func:`inherit` took from the source, with their values as
    ``--set`` would write them."""
    data = to_dict(cfg)
    shown = []
    for key in keys:
        section, name = key.split(".")
        value = data[section][name]
        shown.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return f"from the source {cfg.transfer.init_from}: {', '.join(shown)}"


def source_model(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> nn.Module:
    """Rebuild the network a checkpoint came from (config from its metadata), with its weights."""
    if "config" not in meta:
        raise LowlabelError(
            f"{path}: checkpoint has no lowlabel config in its metadata; "
            "use a checkpoint written by lowlabel pretrain or train"
        )
    if any(k.startswith("model.members.") for k in tensors):
        members = {k.split(".")[2] for k in tensors if k.startswith("model.members.")}
        check_single(path, {"ensemble": len(members)})
    cfg = from_dict(meta["config"])
    if str(meta.get("kind", "")).startswith("pretrain"):
        model = build_pretrain_model(cfg)
    else:
        model = build_model(cfg.model, cfg.data.spatial_dims)
    try:
        model.load_state_dict(checkpoint.split(tensors, "model"))
    except RuntimeError as err:
        raise LowlabelError(
            f"{path}: weights do not fit the network in its own config ({str(err).splitlines()[0]})"
        ) from None
    model.spatial_dims = cfg.data.spatial_dims  # type: ignore[attr-defined]
    model.source_config = cfg  # type: ignore[attr-defined]
    return model


def match_level(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> tuple[list[tuple[str, str]], list[dict]]:
    """Pair source and target tensors of one level.

    First the same relative name and shape; then, in order, the same leaf name (``weight``,
    ``bias``, ``running_mean``...) and shape, which pairs e.g. ``conv.weight`` of a plain
    convolution block with ``conv.unit0.conv.weight`` of a residual one.

    Returns:
        ``(pairs, mismatches)``: ``(source_key, target_key)`` pairs, and same-name tensors whose
        shapes differ.
    """
    pairs, mismatches = [], []
    used: set[str] = set()
    left = []
    for key, value in target.items():
        if key in source and source[key].shape == value.shape:
            pairs.append((key, key))
            used.add(key)
        else:
            if key in source:
                mismatches.append(
                    {
                        "key": key,
                        "source_shape": list(source[key].shape),
                        "target_shape": list(value.shape),
                    }
                )
                used.add(key)  # a same-name tensor of another shape is not reused elsewhere
            left.append(key)
    for key in left:
        leaf = key.rsplit(".", 1)[-1]
        for skey, svalue in source.items():
            if (
                skey not in used
                and skey.rsplit(".", 1)[-1] == leaf
                and svalue.shape == target[key].shape
            ):
                pairs.append((skey, key))
                used.add(skey)
                break
    return pairs, mismatches


@dataclass
class Transfer:
    """Loaded encoder plus the training-mode rules of ``cfg.transfer.mode``.

    ``encoder`` holds the target blocks that received weights; those are what ``frozen`` and
    ``gradual`` hold fixed.
    """

    mode: str
    encoder: list[nn.Module]
    params: list[nn.Parameter]
    encoder_lr_scale: float = 1.0
    unfreeze_after: int = 0
    report: dict = field(default_factory=dict)
    lr_scale: float = 1.0

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for block in self.encoder for p in block.parameters()]

    def param_groups(self, lr: float) -> list[dict]:
        """AdamW parameter groups, ``lr`` scaled by ``lr_scale``: the frozen encoder is left out
        entirely; finetune gives the encoder ``encoder_lr_scale`` times that; gradual keeps the
        encoder in its own group from the start (its parameters have no gradient, so AdamW
        leaves them untouched until unfrozen), which keeps the optimizer's layout fixed and a
        resumed run loadable."""
        lr *= self.lr_scale
        enc = {id(p) for p in self.encoder_parameters()}
        rest = [p for p in self.params if id(p) not in enc]
        if self.mode == "frozen":
            return [{"params": rest, "lr": lr}]
        return [
            {"params": rest, "lr": lr},
            {"params": self.encoder_parameters(), "lr": lr * self.encoder_lr_scale},
        ]

    def frozen_at(self, step: int) -> bool:
        return self.mode == "frozen" or (self.mode == "gradual" and step < self.unfreeze_after)

    def train_mode(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before each step instead of ``model.train()``: a frozen encoder stays in eval
        mode so its normalisation statistics do not move."""
        model.train()
        frozen = self.frozen_at(step)
        for block in self.encoder:
            for p in block.parameters():
                p.requires_grad_(not frozen)
            if frozen:
                block.eval()


def load_encoder(src: nn.Module, model: nn.Module) -> dict:
    """Load ``src``'s encoder into ``model`` level by level (``transfer.scope: encoder``).

    Returns:
        the report's entries (``levels_mapped``, ``loaded``, ``skipped``, ``shape_mismatches``)
        and ``encoder``, the target blocks that received weights.
    """
    src_blocks, tgt_blocks = encoder_blocks(src), encoder_blocks(model)
    src_names, tgt_names = block_names(src), block_names(model)
    levels, loaded, skipped, mismatched, encoder = [], [], [], [], []
    with torch.no_grad():
        for k in range(min(len(src_blocks), len(tgt_blocks))):
            s_state, t_state = src_blocks[k].state_dict(), tgt_blocks[k].state_dict()
            pairs, bad = match_level(s_state, t_state)
            for skey, tkey in pairs:
                t_state[tkey].copy_(s_state[skey])
                loaded.append(
                    {
                        "level": k,
                        "source": f"{src_names[k]}.{skey}",
                        "target": f"{tgt_names[k]}.{tkey}",
                        "shape": list(t_state[tkey].shape),
                    }
                )
            done = {tkey for _, tkey in pairs}
            skipped += [f"{tgt_names[k]}.{key}" for key in t_state if key not in done]
            mismatched += [dict(b, level=k, key=f"{tgt_names[k]}.{b['key']}") for b in bad]
            if pairs:
                levels.append(
                    {
                        "level": k,
                        "source": src_names[k],
                        "target": tgt_names[k],
                        "tensors": len(pairs),
                        "of": len(t_state),
                    }
                )
                encoder.append(tgt_blocks[k])
    return {
        "levels_mapped": levels,
        "loaded": loaded,
        "skipped": skipped,
        "shape_mismatches": mismatched,
        "encoder": encoder,
    }


def model_difference(cfg: RunConfig, source: RunConfig) -> str | None:
    """The first ``model.*`` key (dropout aside: it has no tensors) on which ``cfg``'s network
    differs from the ``source`` config's, in words; None when they agree."""
    ours, theirs = to_dict(cfg.model), to_dict(source.model)
    keys = [k for k in ours if ours[k] != theirs[k] and k != "dropout"]
    if keys:
        k = keys[0]
        return f"model.{k} is {theirs[k]} in the source, {ours[k]} in this run"
    return None


def network_error(path: Path, problem: str, pretraining: bool) -> LowlabelError:
    """The one-line refusal of a ``transfer.scope: all`` source whose network differs."""
    if pretraining:
        return LowlabelError(
            f"{path}: transfer.scope all needs the source's network, but {problem} (a "
            "pretraining network restores images and has no segmentation head); use "
            "transfer.scope encoder"
        )
    return LowlabelError(
        f"{path}: transfer.scope all needs the source's network, but {problem}; leave "
        "model.* unset to take the source's, or use transfer.scope encoder"
    )


def architecture_mismatch(src: nn.Module, model: nn.Module, cfg: RunConfig) -> str | None:
    """Why ``src``'s tensors cannot all load into ``model``, in words; None when they can."""
    problem = model_difference(cfg, src.source_config)
    if problem:
        return problem
    source, target = src.state_dict(), model.state_dict()
    for key, value in target.items():
        if key not in source:
            return f"tensor {key} is not in the source"
        if source[key].shape != value.shape:
            shapes = f"{list(source[key].shape)} in the source, {list(value.shape)} here"
            return f"tensor {key} is {shapes}"
    extra = sorted(set(source) - set(target))
    return f"the source has tensors this network lacks ({extra[0]}, ...)" if extra else None


def load_all(src: nn.Module, model: nn.Module, cfg: RunConfig, path: Path) -> dict:
    """Load every tensor of ``src`` into ``model`` (``transfer.scope: all``).

    Returns:
        the report's entries, as :func:`load_encoder`; every encoder block counts as loaded.

    Raises:
        LowlabelError: the networks differ, in one line that names the difference.
    """
    problem = architecture_mismatch(src, model, cfg)
    if problem:
        raise network_error(path, problem, getattr(src, "out_channels", None) == 1)
    source = src.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            value.copy_(source[key])
    loaded = [
        {"source": k, "target": k, "shape": list(v.shape)} for k, v in model.state_dict().items()
    ]
    names = block_names(model)
    levels = [
        {
            "level": k,
            "source": n,
            "target": n,
            "tensors": len(b.state_dict()),
            "of": len(b.state_dict()),
        }
        for k, (n, b) in enumerate(zip(names, encoder_blocks(model), strict=True))
    ]
    return {
        "levels_mapped": levels,
        "loaded": loaded,
        "skipped": [],
        "shape_mismatches": [],
        "encoder": encoder_blocks(model),
    }


def prepare(model: nn.Module, cfg: RunConfig, run_dir: str | Path) -> Transfer:
    """Load ``cfg.transfer.init_from`` into ``model`` (its encoder, or with ``transfer.scope:
    all`` every tensor) and set up ``cfg.transfer.mode``.

    Writes ``transfer.json`` in ``run_dir``: source and its ``origin`` (:func:`lowlabel.bundle.
    origin`), scope, learning-rate scales, levels mapped, tensors loaded (source -> target
    key), target tensors of mapped levels left at their initialisation, shape mismatches, source
    levels without a counterpart.

    Raises:
        LowlabelError: no ``init_from``, an unreadable source or an ensemble, different spatial
            dims, no encoder convolution that would load, or with scope ``all`` a different
            network.
    """
    t = cfg.transfer
    if not t.init_from:
        raise LowlabelError(
            f"config key 'transfer.init_from': transfer mode '{t.mode}' needs a "
            "pretrained checkpoint or pretraining run folder"
        )
    path = resolve_source(t.init_from)
    tensors, meta = checkpoint.load(path)
    src = source_model(tensors, meta, path)
    if src.spatial_dims != cfg.data.spatial_dims:
        raise LowlabelError(
            f"{path}: pretrained with data.spatial_dims={src.spatial_dims}, "
            f"this run uses {cfg.data.spatial_dims}; they must agree"
        )
    n_src, n_tgt = len(encoder_blocks(src)), len(encoder_blocks(model))
    if t.scope == "all":
        done = load_all(src, model, cfg, path)
    else:
        done = load_encoder(src, model)
    encoder = done.pop("encoder")
    loaded, mismatched = done["loaded"], done["shape_mismatches"]
    # a PReLU slope or a bias alone fits any network; a transfer is only real with kernels
    if not any(len(e["shape"]) > 1 for e in loaded):
        raise LowlabelError(
            f"{path}: no encoder convolution fits this network ({min(n_src, n_tgt)} levels "
            f"compared, {len(mismatched)} shape mismatches); pretrain with the same "
            "model.channels as the segmentation run"
        )
    report = {
        "source": str(path),
        "source_kind": meta.get("kind"),
        "source_method": meta.get("method"),
        "source_step": meta.get("step"),
        "origin": origin(path, meta),
        "mode": t.mode,
        "scope": t.scope,
        "lr": cfg.train.lr * t.learning_rate_scale,
        "lr_scale": t.learning_rate_scale,
        "encoder_lr_scale": t.encoder_lr_scale,
        "unfreeze_after": t.unfreeze_after,
        "source_levels": n_src,
        "target_levels": n_tgt,
        "n_loaded": len(loaded),
        "of": len(model.state_dict()),
        **done,
        "unmapped_source_levels": list(range(n_tgt, n_src)),
        "unmapped_target_levels": list(range(n_src, n_tgt)),
    }
    write_json(Path(run_dir) / TRANSFER, report)
    log.info("transfer (%s): %d of %d tensors loaded", t.scope, len(loaded), report["of"])
    setup = Transfer(
        t.mode,
        encoder,
        list(model.parameters()),
        t.encoder_lr_scale,
        t.unfreeze_after,
        report,
        t.learning_rate_scale,
    )
    if setup.frozen_at(0):
        for p in setup.encoder_parameters():
            p.requires_grad_(False)
    return setup

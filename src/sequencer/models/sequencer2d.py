"""Sequencer2D (Tatsunami & Taki, "Sequencer: Deep LSTM for Image Classification", NeurIPS 2022).

Layout of the parameters follows timm's port (``stem.proj``, ``stages.<s>.downsample.down``,
``stages.<s>.blocks.<i>``, ``norm``, ``head.fc``); the authors' release layout (``blocks.<stage>.<i>``,
``head``) is translated by :func:`sequencer.models.loading.checkpoint_filter_fn`.

Tensors inside the network are channels-last: (B, H, W, C).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArgumentValueError, SequencerError, checked_positive_int
from .features import prune_to_stages, stage_indices
from .kernels import (RNN_TYPES, autocast_bf16_copies, cpu_bilstm2d, cpu_lstm_applies, exporting, fused_bilstm2d,
                      hooked, linear, mix_axes, onednn_linear_ok, onednn_mlp, resolve_backend, run_rnn,
                      under_cpu_bf16_autocast, uses_fused_lstm)
from .registry import register_model
from .weight_init import init_weights

RELEASE_URL = "https://github.com/okojoalg/sequencer/releases/download/weights/{}.pth"

UNIONS = ("cat", "add", "vertical", "horizontal")


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same ``isinstance``) whose forward uses :func:`linear`."""

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias, activation)


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout over the last dim."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exact_gelu = type(self.act) is nn.GELU and self.act.approximate == "none"
        if (exact_gelu and torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad)
                and not hooked(self.fc1, self.fc2) and not (self.training and (self.drop1.p > 0 or self.drop2.p > 0))):
            out = self._train_on_onednn(x)
            if out is not None:
                return out
        if exact_gelu:
            x = self.fc1(x, activation="gelu")  # fused into the matmul when possible
        else:
            x = self.act(self.fc1(x))
        return self.drop2(self.fc2(self.drop1(x)))

    def _train_on_onednn(self, x: torch.Tensor) -> torch.Tensor | None:
        """The memory-saving :func:`~sequencer.models.kernels.onednn_mlp`, also under CPU bf16 autocast; None where not applicable.

        Under autocast the casts autocast would make (input and weights to bf16, via differentiable ``.to``, so
        the fp32 weights get fp32 gradients) are made here, and the MLP runs in bf16 as autocast would run it.
        """
        params = [self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias]
        no_autocast = contextlib.nullcontext()
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            if not under_cpu_bf16_autocast(x):
                return None
            x, *params = autocast_bf16_copies(x, *params)
            no_autocast = torch.autocast("cpu", enabled=False)
        with no_autocast:
            if not onednn_linear_ok(x, params[0]):
                return None
            return onednn_mlp(x.contiguous(), *params)


class RNN2d(nn.Module):
    """BiLSTM2D token mixer (or its GRU / plain-RNN / one-direction / add / no-fc ablations).

    A recurrent layer runs down every column (``rnn_v``) and another along every row (``rnn_h``); their outputs
    are concatenated (``union="cat"``), added (``"add"``) or only one is used (``"vertical"``/``"horizontal"``),
    then mixed back to ``dim`` channels by ``fc`` (absent when ``with_fc=False``).

    Shapes: (B, H, W, dim) -> (B, H, W, dim).
    """

    def __init__(self, dim: int, hidden_size: int, rnn_type: str = "lstm", num_layers: int = 1,
                 bias: bool = True, bidirectional: bool = True, union: str = "cat", with_fc: bool = True,
                 lstm_backend: str | None = None):
        super().__init__()
        self.lstm_backend = resolve_backend(lstm_backend)
        if union not in UNIONS:
            raise ArgumentValueError(f"union must be one of {UNIONS}, got {union!r}")
        if rnn_type not in RNN_TYPES:
            raise ArgumentValueError(f"rnn_type must be one of {sorted(RNN_TYPES)}, got {rnn_type!r}")
        self.dim = dim
        self.hidden_size = hidden_size
        self.union = union
        self.with_vertical = union != "horizontal"
        self.with_horizontal = union != "vertical"
        out_per_axis = hidden_size * (2 if bidirectional else 1)
        mixed = 2 * out_per_axis if union == "cat" else out_per_axis
        rnn_cls = RNN_TYPES[rnn_type]
        make_rnn = partial(rnn_cls, dim, hidden_size, num_layers, batch_first=True, bias=bias,
                           bidirectional=bidirectional)
        self.rnn_v = make_rnn() if self.with_vertical else None
        self.rnn_h = make_rnn() if self.with_horizontal else None
        if with_fc:
            self.fc = Linear(mixed, dim)
        else:
            if mixed != dim:
                raise ArgumentValueError(f"without fc the mixed RNN output ({mixed} channels) must equal dim ({dim})")
            self.fc = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hooked(self.rnn_v, self.rnn_h):  # each layer is called (run_rnn), so its hooks run
            v_seq, h_seq = self._scan_axes(x)
        elif any(uses_fused_lstm(r, self.lstm_backend, x) for r in (self.rnn_v, self.rnn_h) if r is not None):
            v_seq, h_seq = fused_bilstm2d(self.rnn_v, self.rnn_h, x)
        elif cpu_lstm_applies([r for r in (self.rnn_v, self.rnn_h) if r is not None], self.lstm_backend, x):
            v_seq, h_seq = cpu_bilstm2d(self.rnn_v, self.rnn_h, x)
        else:
            v_seq, h_seq = self._scan_axes(x)
        return self._mix(v_seq, h_seq)

    def _scan_axes(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The recurrences down the columns and along the rows: (B, H, W, C) -> (H, B, W, D) and (W, B, H, D)."""
        B, H, W, C = x.shape
        # The recurrent kernels (oneDNN on CPU, cuDNN on GPU) read sequence-first (T, N, C) memory. Each axis'
        # input is laid out that way with one copy and handed to the batch-first module as a transposed view, so
        # the module's own transpose lands on contiguous memory; outputs stay in that layout until the mixing fc.
        v_seq = h_seq = None  # (H, B, W, D) and (W, B, H, D)
        if self.rnn_v is not None:  # columns are sequences: T=H, N=B*W
            v = run_rnn(self.rnn_v, x.permute(1, 0, 2, 3).reshape(H, B * W, C).transpose(0, 1), self.lstm_backend)
            v_seq = v.transpose(0, 1).reshape(H, B, W, -1)
        if self.rnn_h is not None:  # rows are sequences: T=W, N=B*H
            h = run_rnn(self.rnn_h, x.permute(2, 0, 1, 3).reshape(W, B * H, C).transpose(0, 1), self.lstm_backend)
            h_seq = h.transpose(0, 1).reshape(W, B, H, -1)
        return v_seq, h_seq

    def _mix(self, v_seq: torch.Tensor | None, h_seq: torch.Tensor | None) -> torch.Tensor:
        """Union of the axes' outputs, then ``fc``: (H, B, W, D) and (W, B, H, D) -> (B, H, W, dim)."""
        if (self.union == "cat" and self.fc is not None and v_seq is not None and h_seq is not None
                and not hooked(self.fc) and onednn_linear_ok(v_seq, self.fc.weight)):
            # CPU: no concatenation, each half in its own layout (on a GPU the concatenation is cheap, one GEMM wins)
            return mix_axes(v_seq.contiguous(), h_seq.contiguous(), self.fc.weight, self.fc.bias)
        v = v_seq.permute(1, 0, 2, 3) if v_seq is not None else None
        h = h_seq.permute(1, 2, 0, 3) if h_seq is not None else None
        if v is not None and h is not None:
            x = torch.cat([v, h], dim=-1) if self.union == "cat" else v + h
        else:
            x = v if v is not None else h
        return self.fc(x.contiguous()) if self.fc is not None else x.contiguous()


class DropPath(nn.Module):
    """Stochastic depth in training: the whole branch of a sample is zeroed with probability ``drop_prob`` and the
    kept ones are scaled by ``1 / (1 - drop_prob)``; the identity in eval. The same draws and arithmetic as timm's
    ``DropPath``, owned here so that building a model does not import timm."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        kept = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # one draw per sample
        return x * (kept.div_(keep) if keep > 0.0 else kept)  # rate 1: every sample dropped, no 0/0

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class SequencerBlock(nn.Module):
    """LN -> token mixer -> residual; LN -> MLP -> residual, both with stochastic depth. (B, H, W, C) in and out."""

    def __init__(self, dim: int, token_mixer: nn.Module, mlp_ratio: float = 3.0, drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.rnn_tokens = token_mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp_channels = Mlp(dim, int(mlp_ratio * dim), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.rnn_tokens(self.norm1(x)))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding: (B, C, H, W) -> (B, H/p, W/p, dim)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm_layer: Callable | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One copy into dense (B, H, W, C) here keeps the whole residual stream dense: left as a permuted view of
        # the conv's NCHW output, every LayerNorm, residual add and downsample would copy or stride through it.
        return self.norm(self.proj(x).permute(0, 2, 3, 1).contiguous())


class Downsample2d(nn.Module):
    """Strided conv between stages: (B, H, W, C_in) -> (B, H/p, W/p, C_out)."""

    def __init__(self, dim: int, dim_out: int, patch_size: int):
        super().__init__()
        self.down = nn.Conv2d(dim, dim_out, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down.kernel_size == (1, 1) and not hooked(self.down):
            # A 1x1 conv over (B, H, W, C) is a matmul over C. Run as a conv on the channels-last view, its weight
            # gradient comes back with channels-last strides the (O, I, 1, 1) weight lacks, and DDP then copies it
            # into its bucket every step ("Grad strides do not match bucket view strides"). The (O, I) matrix is
            # read along the weight's own strides (channels-last after model.to(memory_format=...)) for the same reason.
            w = self.down.weight
            return F.linear(x, w.flatten(1) if w.stride(-1) == 1 else w.permute(0, 2, 3, 1).flatten(1), self.down.bias)
        # a dense (B, H, W, C) input is a channels-last NCHW tensor, so the conv writes channels-last and the
        # permute back is dense again (contiguous() is then free)
        return self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


class SequencerStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        # not in a captured program (a TorchScript trace keeps no checkpoints, and torch.jit.trace's check of its
        # graph failed with them)
        if self.grad_checkpointing and torch.is_grad_enabled() and not exporting():
            from torch.utils.checkpoint import checkpoint  # here: on torch 2.6 its import takes sympy (a second)
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pool over (H, W) -> dropout -> linear. (B, H, W, C) -> (B, num_classes)."""

    def __init__(self, dim: int, num_classes: int, global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ArgumentValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise ArgumentValueError(f"num_classes must be a whole number (0: no head), got {num_classes!r}")
        if num_classes < 0:
            # a negative count built no head: the pooled features were scored as if they were class logits
            raise ArgumentValueError(f"num_classes must be >= 0 (0: no head), got {num_classes!r}")
        self.global_pool = global_pool
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


def specialize_image_size(x: torch.Tensor) -> None:
    """Under ``torch.compile``, where a gradient is computed, make the height and width of ``x`` (B, C, H, W) constants
    of the graph (with a guard: one graph per image size, up to dynamo's ``recompile_limit``); the batch size may stay
    symbolic. Elsewhere, nothing.

    Inductor (torch 2.14) cannot lower a training graph in which both sides are symbols: it orders the strides of the
    activations it saves for backward with plain sympy comparisons, which cannot decide ``16*s27*s53 < 16`` for
    positive integer symbols ("cannot determine truth value of Relational"). ``dynamic=True`` made them symbols at the
    first step, the default compile from the second image size on. Inference keeps symbolic sizes (one graph); so do
    ``torch.export`` and TorchScript captures, which never get here specialized.
    """
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and not exporting():
        operator.index(x.shape[-2])  # a SymInt's __index__ specializes it (dynamo guards on its value)
        operator.index(x.shape[-1])


def _is_count(value, least: int) -> bool:
    """Whether ``value`` is a whole number (not a switch) of at least ``least``."""
    try:
        return not isinstance(value, bool) and operator.index(value) >= least
    except TypeError:
        return False


def _check_architecture(stages: dict, **settings) -> None:
    """ArgumentValueError (one line naming the argument) for values no network is built from, before any layer is:
    the per-stage lists (``layers``: block counts, may be 0; ``patch_sizes``, ``embed_dims``, ``hidden_sizes``:
    positive integers; ``mlp_ratios``: positive numbers giving an MLP of at least one channel), ``in_chans`` and
    ``num_rnn_layers`` (positive integers) and the drop rates (in [0, 1]). They ended in tracebacks from deep in the
    build (``patch_sizes=(0, 2, 1)``: ZeroDivisionError in the weight init; ``layers=3``: TypeError) or in the first
    forward (``mlp_ratios=(0, 3, 3)``; ``drop_path_rate=1.5`` at the first training step)."""
    for name, values in stages.items():
        if not isinstance(values, (list, tuple)):
            raise ArgumentValueError(f"{name}={values!r}: give one entry per stage (a list or tuple)")
    if len({len(values) for values in stages.values()}) != 1:
        raise ArgumentValueError("layers, patch_sizes, embed_dims, hidden_sizes and mlp_ratios need one entry per stage")
    for name, least in (("layers", 0), ("patch_sizes", 1), ("embed_dims", 1), ("hidden_sizes", 1)):
        if not all(_is_count(v, least) for v in stages[name]):
            raise ArgumentValueError(f"{name}={tuple(stages[name])!r}: each entry must be an integer >= {least}")
    if not all(isinstance(r, numbers.Real) and not isinstance(r, bool) and _is_count(int(r * d), 1)
               for r, d in zip(stages["mlp_ratios"], stages["embed_dims"])):
        raise ArgumentValueError(f"mlp_ratios={tuple(stages['mlp_ratios'])!r}: each entry must be a positive number "
                                 f"(the MLP's width is ratio x the stage's embed_dim, at least 1)")
    for name, value in settings.items():
        if name.endswith("_rate"):
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1):
                raise ArgumentValueError(f"{name}={value!r}: must be a number in [0, 1]")
        else:
            checked_positive_int(name, value)


class Sequencer2d(nn.Module):
    """Sequencer2D: conv stem, stages of Sequencer blocks with conv downsampling, final LN, GAP, linear head.

    Any input size whose side is divisible by the total patch reduction works with the same weights.
    Input (B, in_chans, H, W); ``forward_features`` gives (B, H', W', C); ``forward`` gives (B, num_classes).
    ``lstm_backend`` ("auto", "triton", "native", "cpu"; default ``$SEQUENCER_LSTM_BACKEND`` or "auto") picks the LSTM
    kernels (:mod:`sequencer.models.kernels.recurrence`); parameters and results are the same for every choice.
    """

    def __init__(
            self,
            num_classes: int = 1000,
            img_size: int = 224,
            in_chans: int = 3,
            global_pool: str = "avg",
            layers: Sequence[int] = (4, 3, 8, 3),
            patch_sizes: Sequence[int] = (7, 2, 1, 1),
            embed_dims: Sequence[int] = (192, 384, 384, 384),
            hidden_sizes: Sequence[int] = (48, 96, 96, 96),
            mlp_ratios: Sequence[float] = (3.0, 3.0, 3.0, 3.0),
            rnn_type: str = "lstm",
            num_rnn_layers: int = 1,
            bidirectional: bool = True,
            union: str = "cat",
            with_fc: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            nlhb: bool = False,
            stem_norm: bool = False,
            lstm_backend: str | None = None,
    ):
        super().__init__()
        _check_architecture(dict(layers=layers, patch_sizes=patch_sizes, embed_dims=embed_dims,
                                 hidden_sizes=hidden_sizes, mlp_ratios=mlp_ratios),
                            in_chans=in_chans, num_rnn_layers=num_rnn_layers, drop_rate=drop_rate,
                            proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.img_size = img_size
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.patch_sizes = tuple(patch_sizes)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.stem = PatchEmbed(patch_sizes[0], in_chans, embed_dims[0], norm_layer if stem_norm else None)

        dpr = [drop_path_rate * i / max(sum(layers) - 1, 1) for i in range(sum(layers))]  # linear over all blocks
        stages, self.feature_info, reduction, block_idx, prev_dim = [], [], 1, 0, embed_dims[0]
        for i, depth in enumerate(layers):
            reduction *= patch_sizes[i]
            blocks = [
                SequencerBlock(
                    embed_dims[i],
                    self._token_mixer(embed_dims[i], hidden_sizes[i], rnn_type=rnn_type, num_layers=num_rnn_layers,
                                      bidirectional=bidirectional, union=union, with_fc=with_fc,
                                      lstm_backend=lstm_backend),
                    mlp_ratio=mlp_ratios[i], drop=proj_drop_rate, drop_path=dpr[block_idx + j], norm_layer=norm_layer)
                for j in range(depth)
            ]
            block_idx += depth
            down = Downsample2d(prev_dim, embed_dims[i], patch_sizes[i]) if i > 0 else nn.Identity()
            stages.append(SequencerStage(down, blocks))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            prev_dim = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(embed_dims[-1])
        self.head = ClassifierHead(embed_dims[-1], num_classes, global_pool, drop_rate)
        self.init_weights(nlhb=nlhb)

    @staticmethod
    def _token_mixer(dim: int, hidden_size: int, **kwargs) -> nn.Module:
        return RNN2d(dim, hidden_size, **kwargs)

    def init_weights(self, nlhb: bool = False) -> None:
        head_bias = -math.log(self.num_classes) if nlhb and self.num_classes > 0 else 0.0
        init_weights(self, head_bias=head_bias)

    @property
    def reduction(self) -> int:
        """Total spatial down-sampling factor; input sides must be multiples of it."""
        return math.prod(self.patch_sizes)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)", None) if coarse else
                                          (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                          (r"^stages\.(\d+)\.downsample", (0,)), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refuse in one line instead of an assertion deep inside nn.LSTM
        raise SequencerError(f"{type(self).__name__} cannot be compiled with torch.jit.script (its LSTM kernels "
                             f"are chosen at run time)", hint="use torch.jit.trace(model, example), torch.export, "
                                                              "or sequencer.tools.export.export_torchscript (traced)")

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a zero-initialised one for ``num_classes`` (0 gives pooled features); the model's
        ``model_kwargs`` and ``pretrained_cfg`` (set by `create_model`) then record the new head, so checkpoints and
        exports rebuild it, and the cfg drops the old head's ``label_names`` (both replaced by new dicts: whoever else
        holds the old ones keeps them unchanged)."""
        pool = self.head.global_pool if global_pool is None else global_pool
        ref = next(self.parameters())
        head = ClassifierHead(self.num_features, num_classes, pool, self.drop_rate).to(ref.device, ref.dtype)
        init_weights(head, "head")  # built first: a refused count changes nothing
        self.num_classes = num_classes
        if isinstance(getattr(self, "model_kwargs", None), dict):
            self.model_kwargs = dict(self.model_kwargs, num_classes=num_classes)
            if global_pool is not None:
                self.model_kwargs["global_pool"] = global_pool
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            # the old head's class names name none of the new one's outputs (validate(model=...) maps by them)
            cfg = {k: v for k, v in self.pretrained_cfg.items() if k not in ("label_names", "label_descriptions")}
            self.pretrained_cfg = self.default_cfg = dict(cfg, num_classes=num_classes)
        self.head = head

    def check_input_size(self, height: int, width: int) -> None:
        r = self.reduction
        if height % r or width % r or height < r or width < r:
            raise ValueError(f"input size {height}x{width} is not a positive multiple of the model's total "
                             f"patch reduction {r}")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/r, W/r, num_features), final LayerNorm applied."""
        specialize_image_size(x)
        x = self._embed(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # as timm calls it: a head of the user's own (``model.head = MyHead()``, fed the (B, H, W, C) map) needs
        # no ``pre_logits`` argument
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Per-stage feature maps, as timm's ``forward_intermediates``.

        ``indices``: stage indices to return (an int n takes the last n stages; None takes all).
        Returns a list of (B, C_s, H_s, W_s) maps ("NCHW") or (B, H_s, W_s, C_s) ("NHWC"), plus the final
        normed features unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'")
        n = len(self.stages)
        take = stage_indices(indices, n, "indices")
        last = max(take) if stop_early or intermediates_only else n - 1
        intermediates = []
        specialize_image_size(x)
        x = self._embed(x)
        for i, stage in enumerate(self.stages[:last + 1]):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == n - 1 else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        # after stop_early the last stage run may be an earlier one, whose width the final norm need not match
        return (self.norm(x) if last == n - 1 else x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """As timm's: keep only what ``forward_intermediates(x, indices)`` needs; returns the stages it takes."""
        return prune_to_stages(self, indices, prune_norm, prune_head)


# ImageNet's per-channel RGB mean and standard deviation (timm's IMAGENET_DEFAULT_MEAN / _STD), written out so that
# building a model does not import timm
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "first_conv": "stem.proj", "classifier": "head.fc", **kwargs,
    }


_S = dict(layers=(4, 3, 8, 3), patch_sizes=(7, 2, 1, 1), embed_dims=(192, 384, 384, 384),
          hidden_sizes=(48, 96, 96, 96), mlp_ratios=(3.0, 3.0, 3.0, 3.0))
_M = dict(_S, layers=(4, 3, 14, 3))
_L = dict(_S, layers=(8, 8, 16, 4))
_H2X = dict(hidden_sizes=(96, 192, 192, 192))

# The authors' release files (github.com/okojoalg/sequencer/releases). No sha256 is recorded for them: they could not
# be fetched where this was written, so a download is only checked for completeness and by loading it
# (weights_only). Add ``sha256=<hex digest>`` to a cfg below to have downloads verified.
_RELEASE = {
    "sequencer2d_s": RELEASE_URL.format("sequencer2d_s"),
    "sequencer2d_m": RELEASE_URL.format("sequencer2d_m"),
    "sequencer2d_l": RELEASE_URL.format("sequencer2d_l"),
}

# name -> (model kwargs, pretrained cfg)
MODEL_CONFIGS: dict[str, tuple[dict, dict]] = {
    # hf_hub_id: timm's copy of the same weights on the Hugging Face Hub, loaded instead of the release with
    # pretrained_cfg_overlay=dict(source="hf-hub") (sequencer.models.hub)
    "sequencer2d_s": (_S, _cfg(_RELEASE["sequencer2d_s"], hf_hub_id="timm/sequencer2d_s.in1k")),
    "sequencer2d_m": (_M, _cfg(_RELEASE["sequencer2d_m"], hf_hub_id="timm/sequencer2d_m.in1k")),
    "sequencer2d_l": (_L, _cfg(_RELEASE["sequencer2d_l"], hf_hub_id="timm/sequencer2d_l.in1k")),
    # 392 px variants: no 392 px weights were released, so they have none (pretrained=True refuses); to start
    # from the 224 px release at 392 px, use e.g. sequencer2d_l with --pretrained --img-size 392 --crop-pct 1.0.
    # (The authors' registry gives these their 224 px model's cfg and weights URL; input size and crop here are
    # those of their README's 392 px fine-tuning command.)
    "sequencer2d_s_392": (dict(_S, img_size=392), _cfg(input_size=(3, 392, 392), crop_pct=1.0)),
    "sequencer2d_m_392": (dict(_M, img_size=392), _cfg(input_size=(3, 392, 392), crop_pct=1.0)),
    "sequencer2d_l_392": (dict(_L, img_size=392), _cfg(input_size=(3, 392, 392), crop_pct=1.0)),
    # ablations of the paper
    "sequencer2d_s_unidirectional": (dict(_S, bidirectional=False), _cfg()),
    "sequencer2d_s_add": (dict(_S, union="add"), _cfg()),
    "sequencer2d_s_h2x": (dict(_S, **_H2X), _cfg()),
    "sequencer2d_s_without_fc": (dict(_S, with_fc=False), _cfg()),
    "sequencer2d_vertical": (dict(_S, **_H2X, union="vertical", with_fc=False), _cfg()),
    "sequencer2d_s_horizontal": (dict(_S, **_H2X, union="horizontal", with_fc=False), _cfg()),
    "gru_sequencer2d_s": (dict(_S, rnn_type="gru"), _cfg()),
    "rnn_sequencer2d_s": (dict(_S, rnn_type="rnn"), _cfg()),
    "sequencer2d_l_d4_3x": (dict(_L, embed_dims=(256, 512, 512, 512), hidden_sizes=(64, 128, 128, 128)), _cfg()),
    # ours: < 1M parameters for 16-64 px inputs. Patch 2 keeps an 8x8 token grid at 16 px; the 2x downsample
    # before stage 2 and one block per stage make it learn much faster at 32 px (measured on the digits).
    "sequencer2d_nano": (dict(layers=(1, 1, 1), patch_sizes=(2, 2, 1), embed_dims=(96, 128, 128),
                              hidden_sizes=(24, 32, 32), mlp_ratios=(3.0, 3.0, 3.0), img_size=32),
                         _cfg(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))),
}

for _name, (_kwargs, _pcfg) in MODEL_CONFIGS.items():
    register_model(_name, Sequencer2d, _kwargs, _pcfg)

"""Vanilla (1D) Sequencer of the paper's appendix: one BiLSTM over all tokens in raster order.

``v_sequencer_s`` is ViT-like (14 px patches, one resolution); ``v_sequencer_s_h`` is hierarchical like
Sequencer2D-S; ``v_sequencer_s_pe`` adds absolute position embeddings, resampled when the token grid differs from
the one at ``img_size`` as loading its weights at that size resamples them (bicubic, antialiased, as timm's ViTs).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ArgumentValueError
from .kernels import cpu_lstm1d, cpu_lstm_applies, hooked, resolve_backend, run_rnn
from .loading import resample_position_embedding
from .registry import register_model
from .sequencer2d import RNN_TYPES, Sequencer2d, _cfg


class RNN1d(nn.Module):
    """A (bi)directional RNN over the H*W tokens in raster order, no output projection.

    Shapes: (B, H, W, dim) -> (B, H, W, hidden_size * num_directions).
    """

    def __init__(self, dim: int, hidden_size: int, rnn_type: str = "lstm", num_layers: int = 1,
                 bias: bool = True, bidirectional: bool = True, lstm_backend: str | None = None):
        super().__init__()
        self.lstm_backend = resolve_backend(lstm_backend)
        self.rnn = RNN_TYPES[rnn_type](dim, hidden_size, num_layers, batch_first=True, bias=bias,
                                       bidirectional=bidirectional)
        out = hidden_size * (2 if bidirectional else 1)
        if out != dim:
            raise ArgumentValueError(f"RNN output ({out} channels) must equal dim ({dim})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        if not hooked(self.rnn) and cpu_lstm_applies([self.rnn], self.lstm_backend, tokens):
            y = cpu_lstm1d(self.rnn, tokens)  # lstm_backend="cpu": CPU inference as BiLSTM2D's (RNN2d.forward)
        else:
            y = run_rnn(self.rnn, tokens, self.lstm_backend)
        return y.reshape(B, H, W, -1)


class VanillaSequencer(Sequencer2d):
    """Sequencer with 1D token mixing; optional absolute position embedding ``absolute_pos_embed`` (1, Gh, Gw, C)."""

    def __init__(self, *args, ape: bool = False, **kwargs):
        for name in ("union", "with_fc"):  # BiLSTM2D's options: one LSTM over the tokens has neither
            if name in kwargs:
                raise ArgumentValueError(f"{name!r} does not apply to VanillaSequencer (it mixes tokens with one 1D LSTM)")
        super().__init__(*args, **kwargs)
        self.ape = ape
        if ape:
            grid = self.img_size // self.patch_sizes[0]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid, grid, self.stem.proj.out_channels))
            self._init_position_embedding()

    def init_weights(self, nlhb: bool = False) -> None:
        """Every parameter, the position embedding too (a model built on the meta device and ``to_empty``'d holds
        uninitialised memory until this runs). The base class calls it before the embedding exists."""
        super().init_weights(nlhb)
        self._init_position_embedding()

    def _init_position_embedding(self) -> None:
        if getattr(self, "absolute_pos_embed", None) is not None:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02, a=-2.0, b=2.0)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # the position embedding is added to the stem's output: it belongs to the stem's layer (timm's layer-wise
        # lr decay would otherwise put it, unmatched, with the head at the full learning rate)
        return dict(super().group_matcher(coarse), stem=r"^(?:stem|absolute_pos_embed)")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory exempts from weight decay beside the 1-D ones (a ViT's pos_embed)."""
        return {"absolute_pos_embed"} if self.ape else set()

    @staticmethod
    def _token_mixer(dim: int, hidden_size: int, rnn_type: str = "lstm", num_layers: int = 1,
                     bidirectional: bool = True, lstm_backend: str | None = None, **_ignored) -> nn.Module:
        return RNN1d(dim, hidden_size, rnn_type=rnn_type, num_layers=num_layers, bidirectional=bidirectional,
                     lstm_backend=lstm_backend)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.ape:  # at another size, resampled as weights loaded at that size resample it (antialiased)
            x = x + resample_position_embedding(self.absolute_pos_embed, x.shape[1:3])
        return x


_V = dict(layers=(4, 3, 8, 3), patch_sizes=(14, 1, 1, 1), embed_dims=(384, 384, 384, 384),
          hidden_sizes=(192, 192, 192, 192), mlp_ratios=(3.0, 3.0, 3.0, 3.0))

register_model("v_sequencer_s", VanillaSequencer, dict(_V), _cfg())
register_model("v_sequencer_s_h", VanillaSequencer,
               dict(_V, patch_sizes=(7, 2, 1, 1), embed_dims=(192, 384, 384, 384), hidden_sizes=(96, 192, 192, 192)),
               _cfg())
register_model("v_sequencer_s_pe", VanillaSequencer, dict(_V, ape=True), _cfg())

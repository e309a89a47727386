"""The Nemotron-H backbone: embedding -> hybrid layers -> final RMSNorm -> LM head.

Stage: one tower (the context tower, or the AR baseline). Input ``input_ids: [b, s]``
int64. Output logits ``[b, s, vocab]`` (gathered over TP) or the per-token
cross-entropy ``[b, s]`` computed vocab-parallel without gathering logits.

Layout conventions follow megatron-core: activations are ``[s, b, h]`` inside the stack
(``[s/tp, b, h]`` under sequence parallelism), the embedding is a
``VocabParallelEmbedding`` and the untied LM head a ``ColumnParallelLinear`` over the
vocabulary. A pipeline stage builds only ``layer_range`` and, unless it is the first /
last stage, neither the embedding nor the head.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from twotower.model.config import BackboneConfig, ParallelConfig
from twotower.model.device import building_on, resolve_device
from twotower.model.layers import HybridLayer
from twotower.model.norm import RMSNorm
from twotower.model.specs import HybridLayerSpecs, get_hybrid_layer_specs
from twotower.model.transformer_config import to_transformer_config


class NemotronHModel(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        backbone: BackboneConfig,
        specs: HybridLayerSpecs,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__(config)
        self.backbone = backbone
        self.pre_process, self.post_process = pre_process, post_process
        start, end = layer_range or (0, backbone.num_layers)
        self.layer_offset = start
        self.defer_id_check = False
        # Out-of-range ids seen with defer_id_check (a device counter; not part of the checkpoint).
        self.register_buffer("bad_id_count", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size=backbone.vocab_size, max_sequence_length=1, position_embedding_type="none",
            )
        self.layers = nn.ModuleList(
            HybridLayer(config, specs, sym, layer_number=start + i + 1, device=device)
            for i, sym in enumerate(backbone.pattern[start:end])
        )
        if post_process:
            self.final_norm = RMSNorm(backbone.hidden_size, eps=backbone.norm_eps,
                                      sequence_parallel=config.sequence_parallel, device=device,
                                      dtype=config.params_dtype)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                backbone.hidden_size, backbone.vocab_size, config=config, init_method=config.init_method,
                bias=False, skip_bias_add=False, gather_output=False,
            )
        self.input_tensor: torch.Tensor | None = None
        # Untied embeddings: megatron's finalize_model_grads reads this under PP.
        self.share_embeddings_and_output_weights = False
        # Decoder-only: megatron's pipeline schedules read this.
        self.model_type = ModelType.encoder_or_decoder

    # -- megatron pipeline schedules hand the previous stage's output here
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids -> ``[s(/tp), b, h]`` (scattered along the sequence under SP)."""
        return self.embedding(input_ids=self.check_ids(input_ids), position_ids=None)

    def check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids must lie in ``[0, vocab_size)``. With ``defer_id_check`` (the trainer on CUDA) the check
        is a device-side count (no host sync in the step: it would stall 1F1B pipelines), read by
        :meth:`take_bad_id_count` at log intervals, and bad ids embed as id 0 meanwhile; otherwise
        it raises at once."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64/int32, got {input_ids.dtype}")
        if not input_ids.numel():
            return input_ids
        if self.defer_id_check:
            bad = (input_ids < 0) | (input_ids >= self.backbone.vocab_size)
            self.bad_id_count += bad.sum()
            return input_ids.masked_fill(bad, 0)
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.backbone.vocab_size:
            raise ValueError(
                f"input_ids out of range: min {int(input_ids.min())}, max {int(input_ids.max())}, "
                f"model.vocab_size={self.backbone.vocab_size}"
            )
        return input_ids

    def take_bad_id_count(self) -> int:
        """Out-of-range ids seen since the last call (one host read), and reset the count."""
        n = int(self.bad_id_count)
        self.bad_id_count.zero_()
        return n

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[s(/tp), b, h]`` -> vocab-parallel logits ``[s, b, vocab/tp]`` (final norm included)."""
        logits, _ = self.output_layer(self.final_norm(hidden))
        return logits

    def run_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden, _ = layer(hidden)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal LM forward.

        Args:
            input_ids: ``[b, s]`` (ignored on non-first pipeline stages).
            labels: ``[b, s]``; when given, return the per-token loss ``[b, s]`` (fp32).
        Returns:
            logits ``[b, s, vocab]`` gathered over TP (last stage), the per-token loss, or the
            hidden states ``[s(/tp), b, h]`` on intermediate pipeline stages.
        """
        hidden = self.embed(input_ids) if self.pre_process else self.input_tensor
        hidden = self.run_layers(hidden)
        if not self.post_process:
            return hidden
        logits = self.head(hidden)
        if labels is not None:
            # megatron's vocab-parallel CE overwrites its input in place; the logits are not reused
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
            return loss.transpose(0, 1).contiguous()  # [b, s]
        return gather_logits(logits)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Dist-checkpoint state with layers keyed by their GLOBAL index (PP-independent)."""
        from twotower.model.sharding import backbone_sharded_state_dict

        return backbone_sharded_state_dict(self, prefix, sharded_offsets, metadata)


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel ``[s, b, v/tp]`` -> full ``[b, s, v]``."""
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full.transpose(0, 1).contiguous()


def build_backbone(
    backbone: BackboneConfig,
    parallel: ParallelConfig | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    layer_range: tuple[int, int] | None = None,
    **config_overrides,
) -> NemotronHModel:
    """Build one backbone tower on the current megatron parallel state (validates first).

    Every parameter and buffer is created on ``device`` (default: this rank's CUDA device, else the
    CPU; ``meta`` builds the structure without memory) in ``params_dtype``."""
    parallel = parallel or ParallelConfig()
    device = resolve_device(device)
    config = to_transformer_config(backbone, parallel, params_dtype=params_dtype, device=device, **config_overrides)
    specs = get_hybrid_layer_specs(backbone, parallel)
    with building_on(device):
        return NemotronHModel(config, backbone, specs, pre_process=pre_process, post_process=post_process,
                              layer_range=layer_range, device=device)

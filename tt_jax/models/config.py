"""The model configuration: one frozen description of a CE/MoEE model's shapes and options.

A `ModelConfig` is built from an ml_collections/dict config (`ModelConfig.from_dict`) or from a
reference JSON config (`tt_jax.interop.model_config_from_reference`). Experts are always kept in
sorted name order: the reference sorts them (`utils/util.py::compute_dims`) and that order fixes
every per-expert index (MoE weight column, ModuleList position, pair order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from tt_jax.errors import UserInputError

TEMPORAL_KINDS = ("avg", "vlad")
CE_UPDATE_ORDERS = ("sequential", "parallel")


class ModelConfigError(UserInputError):
    """A model configuration that cannot describe a valid model."""


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """One video expert.

    Attributes:
      name: the expert's name in the feature release (e.g. "scene.densenet161.0", "audio").
      input_dim: feature dimension of one vector ("avg") or of one token ("vlad").
      temporal: "avg" for a temporally pooled vector per video, "vlad" for a token sequence
        pooled inside the model by its own NetVLAD (audio, speech, ocr).
      vlad_clusters: NetVLAD clusters for a "vlad" expert (no ghost clusters: the reference never
        passes them to video experts).
      max_tokens: the padded sequence length of a "vlad" expert's input.
      flaky: whether the expert may be missing for some videos.
    """

    name: str
    input_dim: int
    temporal: str = "avg"
    vlad_clusters: int = 0
    max_tokens: int = 0
    flaky: bool = False

    def __post_init__(self):
        if self.temporal not in TEMPORAL_KINDS:
            raise ModelConfigError(
                f"expert {self.name!r}: temporal must be one of {TEMPORAL_KINDS}, got {self.temporal!r}"
            )
        if self.input_dim <= 0:
            raise ModelConfigError(f"expert {self.name!r}: input_dim must be positive, got {self.input_dim}")
        if self.temporal == "vlad" and (self.vlad_clusters <= 0 or self.max_tokens <= 0):
            raise ModelConfigError(
                f"expert {self.name!r} is pooled by NetVLAD (temporal='vlad') and needs positive "
                f"vlad_clusters and max_tokens, got {self.vlad_clusters} and {self.max_tokens}"
            )

    @property
    def pooled_dim(self) -> int:
        """Dimension of the expert after temporal pooling (what ReduceDim/GEU receive)."""
        if self.temporal == "vlad":
            return self.input_dim * self.vlad_clusters
        return self.input_dim

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-video input shape."""
        if self.temporal == "vlad":
            return (self.max_tokens, self.input_dim)
        return (self.input_dim,)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A CE / CE+ / MoEE model.

    Attributes:
      experts: video experts, sorted by name.
      text_dim: per-token dimension of the text embedding (w2v 300, openai 768, gpt2-xl 1600).
      text_vlad_clusters, text_ghost_clusters: the text NetVLAD.
      text_max_tokens: padded token count of a query; NetVLAD does not mask, so inputs must be
        padded to exactly this length to reproduce the reference.
      shared_dim: the CE shared embedding dimension (768 in every TeachText config).
      collaborative_gating: True for CE (use_ce="pairwise"), False for MoEE.
      ce_update_order: "sequential" reproduces the reference's in-place update (partners earlier
        in expert order are already gated); "parallel" gates every expert from the ungated
        projections (order-independent; not the reference).
      num_g_layers: layers of the shared pair MLP g (reference: 3).
      use_mish: Mish (True) or ReLU inside g.
      use_bn_reason: BatchNorm inside g and in the reasoning gate.
      include_self: whether the pair (i, i) takes part in expert i's message.
      keep_missing_modalities: the reference option: every expert's similarity weighs 1 instead of
        its mixture weight renormalised over the video's available experts (unused by its configs).
      mimic_ce_dims: MoEE with every expert projected to shared_dim.
    """

    experts: tuple[ExpertConfig, ...]
    text_dim: int
    text_vlad_clusters: int
    text_max_tokens: int
    text_ghost_clusters: int = 0
    shared_dim: int = 768
    collaborative_gating: bool = True
    ce_update_order: str = "sequential"
    num_g_layers: int = 3
    use_mish: bool = True
    use_bn_reason: bool = True
    include_self: bool = True
    keep_missing_modalities: bool = False
    mimic_ce_dims: bool = False

    def __post_init__(self):
        if not self.experts:
            raise ModelConfigError("a model needs at least one video expert")
        names = [expert.name for expert in self.experts]
        if len(set(names)) != len(names):
            raise ModelConfigError(f"expert names must be unique, got {names}")
        object.__setattr__(self, "experts", tuple(sorted(self.experts, key=lambda e: e.name)))
        if self.ce_update_order not in CE_UPDATE_ORDERS:
            raise ModelConfigError(
                f"ce_update_order must be one of {CE_UPDATE_ORDERS}, got {self.ce_update_order!r}"
            )
        if self.text_vlad_clusters <= 0:
            raise ModelConfigError(
                f"text_vlad_clusters must be positive (text is pooled by NetVLAD), got {self.text_vlad_clusters}"
            )
        if self.collaborative_gating and self.num_g_layers < 1:
            raise ModelConfigError(f"num_g_layers must be >= 1, got {self.num_g_layers}")
        if self.collaborative_gating and self.mimic_ce_dims:
            raise ModelConfigError("collaborative_gating and mimic_ce_dims exclude each other (as in the reference)")

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(expert.name for expert in self.experts)

    @property
    def text_pooled_dim(self) -> int:
        return self.text_dim * self.text_vlad_clusters

    def expert(self, name: str) -> ExpertConfig:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise KeyError(f"no expert {name!r}; experts are {self.expert_names}")

    def embedding_dim(self, expert: ExpertConfig) -> int:
        """Dimension of an expert's joint embedding space (shared for CE, own for MoEE)."""
        if self.collaborative_gating or self.mimic_ce_dims:
            return self.shared_dim
        return expert.input_dim

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a plain mapping or ml_collections.ConfigDict (experts as a list of dicts)."""
        values = dict(config.items()) if hasattr(config, "items") else dict(config)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(f"unknown model config keys {unknown}; valid keys are {sorted(known)}")
        experts = []
        for entry in values.get("experts", ()):
            if isinstance(entry, ExpertConfig):
                experts.append(entry)
                continue
            entry = dict(entry.items())
            expert_known = {field.name for field in dataclasses.fields(ExpertConfig)}
            expert_unknown = sorted(set(entry) - expert_known)
            if expert_unknown:
                raise ModelConfigError(
                    f"expert {entry.get('name')!r}: unknown keys {expert_unknown}; valid keys are {sorted(expert_known)}"
                )
            experts.append(ExpertConfig(**entry))
        values["experts"] = tuple(experts)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["experts"] = [dataclasses.asdict(expert) for expert in self.experts]
        return values


def as_model_config(config: Any) -> ModelConfig:
    """Accepts a ModelConfig, a mapping or a ConfigDict."""
    if isinstance(config, ModelConfig):
        return config
    if hasattr(config, "items"):
        return ModelConfig.from_dict(config)
    raise ModelConfigError(f"expected a ModelConfig, dict or ConfigDict, got {type(config).__name__}")


def replace(config: ModelConfig, **changes: Optional[Any]) -> ModelConfig:
    """A copy of `config` with some fields changed (dataclasses.replace, re-validated)."""
    return dataclasses.replace(config, **changes)

"""``SecureHeteroNNModule``: HeteroNN whose collaborators' features the host never sees.

A :class:`~lightning_fed.hetero.HeteroNNModule` with an interactive (projection)
layer in front of the fusion: each party's features are projected by a linear map
before :meth:`fuse`. The host's own projection is a plain ``nn.Linear`` (with bias;
the user's optimizer trains it). Every projection starts He-initialised (variance
``2 / input_dim``). A collaborator's projection ``W + ε_acc`` is split
between the host (``W``) and the collaborator (``ε_acc``) and trained by plain SGD at
``project_layer_lr`` through CKKS-encrypted exchanges (:mod:`.interactive`), so the
host works on ``α (W + ε_acc)`` and never on the features ``α`` themselves.

Both sides set the same ``project_layer_config`` and ``project_layer_lr``::

    config = [("left", 20, 20), ("right", 20, 20)]   # (feature_key, input_dim, output_dim)

    class Host(SecureHeteroNNModule):
        def __init__(self):
            super().__init__("left", config, project_layer_lr=0.01)
            self.feature_model = LeftNet()         # outputs 20 columns
            self.inference_model = Top()           # reads the fused 20 columns

    class Guest(SecureHeteroNNModule):
        def __init__(self):
            super().__init__("right", config, project_layer_lr=0.01)
            self.feature_model = RightNet()        # outputs 20 columns

The shares are buffers (``secure_shares.<feature_key>``), so checkpoints and
recovery carry ``W`` on the host and ``ε_acc`` on the collaborator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_fed.channel import Channel
from lightning_fed.errors import SettingError
from lightning_fed.hetero.link import CollaboratorLink, HeteroError, HostLink
from lightning_fed.hetero.module import HeteroNNModule
from lightning_fed.hetero.secure.ckks import CKKSParams
from lightning_fed.hetero.secure.interactive import initial_share, own_projection
from lightning_fed.hetero.secure.link import SecureCollaboratorLink, SecureHostLink

LayerConfig = dict[str, tuple[int, int]]


def parse_layer_config(config: Iterable[Sequence[Any]]) -> LayerConfig:
    """``project_layer_config`` as ``{feature_key: (input_dim, output_dim)}``, checked."""
    out: LayerConfig = {}
    for entry in config:
        entry = tuple(entry)
        if len(entry) != 3:
            raise SettingError(
                f"project_layer_config entry {entry!r} is not (feature_key, input_dim, output_dim)"
            )
        key, n, m = entry
        if not isinstance(key, str) or not key or "." in key:
            raise SettingError(f"feature key {key!r} must be a non-empty string without '.'")
        for name, value in (("input_dim", n), ("output_dim", m)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(f"{name} of {key!r} must be a positive int, got {value!r}")
        if key in out:
            raise SettingError(f"feature key {key!r} appears twice in project_layer_config")
        out[key] = (n, m)
    return out


class SecureHeteroNNModule(HeteroNNModule):
    """Base class of a secure HeteroNN party's model (see the module docstring).

    Args:
        feature_key: this party's name in :meth:`fuse`'s dictionary.
        project_layer_config: ``(feature_key, input_dim, output_dim)`` of every party's
            projection (the host's own too), the same list on every party.
        project_layer_lr: η, the plain-SGD rate of the collaborators' projections, the
            same on every party (a collaborator needs it to keep its share right).
        is_feature_trainable: False freezes this party's feature model.
        ckks: a collaborator's CKKS parameters (:class:`CKKSParams` or its fields as a
            dict); the host accepts any that are 128-bit secure.
        noise_scale: bound of the uniform noise each party adds to hide its values.
    """

    projection: nn.Linear | None

    def __init__(
        self,
        feature_key: str,
        project_layer_config: Iterable[Sequence[Any]],
        project_layer_lr: float,
        is_feature_trainable: bool = True,
        *,
        ckks: CKKSParams | Mapping[str, Any] | None = None,
        noise_scale: float = 1.0,
    ) -> None:
        super().__init__(feature_key, is_feature_trainable)
        self.project_layer_config = parse_layer_config(project_layer_config)
        if feature_key not in self.project_layer_config:
            raise SettingError(
                f"project_layer_config lists {sorted(self.project_layer_config)}, not this "
                f"party's feature_key {feature_key!r}; hint: list every party's projection"
            )
        lr = float(project_layer_lr)
        if not math.isfinite(lr) or lr <= 0:
            raise SettingError(
                f"project_layer_lr must be a positive number, got {project_layer_lr}"
            )
        self.project_layer_lr = lr
        if isinstance(ckks, Mapping):
            ckks = CKKSParams.from_dict(dict(ckks))
        self.ckks = ckks or CKKSParams()
        scale = float(noise_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise SettingError(f"noise_scale must be a positive number, got {noise_scale}")
        self.noise_scale = scale
        self.projection = None
        self.secure_shares = nn.Module()

    @property
    def own_shape(self) -> tuple[int, int]:
        return self.project_layer_config[self.feature_key]

    @override
    def configure_model(self) -> None:
        """Make the role's layers: the host's projection and its shares ``W`` of the
        collaborators' projections, or a collaborator's share ``ε_acc``.

        Called by Lightning before the optimizers are made; if you override it, call
        ``super().configure_model()``.
        """
        if self.projection is not None or len(list(self.secure_shares.buffers())):
            return
        if self.is_host:
            self.projection = own_projection(*self.own_shape)
            for key, shape in self.project_layer_config.items():
                if key != self.feature_key:
                    self.secure_shares.register_buffer(key, initial_share(*shape))
        else:
            self.secure_shares.register_buffer(self.feature_key, initial_share(*self.own_shape))

    def _shares(self) -> dict[str, torch.Tensor]:
        shares = dict(self.secure_shares.named_buffers())
        if not shares:
            raise HeteroError(
                "the secure layer has no shares: configure_model() did not run; hint: call "
                "super().configure_model() where you override it"
            )
        return shares

    @override
    def make_link(
        self,
        channel: Channel,
        *,
        role: str,
        host: str,
        collaborators: Sequence[str],
        session: str,
        timeout: float,
    ) -> HostLink | CollaboratorLink:
        self._check_role(role)
        shares = self._shares()
        if role == "host":
            return SecureHostLink(
                channel,
                collaborators,
                self.feature_key,
                session,
                timeout,
                shares=shares,
                lr=self.project_layer_lr,
                noise_scale=self.noise_scale,
            )
        return SecureCollaboratorLink(
            channel,
            host,
            self.feature_key,
            session,
            timeout,
            shape=self.own_shape,
            share=shares[self.feature_key],
            lr=self.project_layer_lr,
            ckks=self.ckks,
            noise_scale=self.noise_scale,
        )

    @override
    def _head(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        own = features[self.feature_key]
        n = self.own_shape[0]
        if self.projection is None or own.ndim != 2 or own.shape[1] != n:
            raise HeteroError(
                f"the host's features have shape {tuple(own.shape)}, but its "
                f"project_layer_config entry says input_dim={n}; hint: make the feature "
                "model's output width the projection's input_dim"
            )
        return super()._head({**features, self.feature_key: self.projection(own)})

"""Helpers for channel tests: federations of identities, channels per backend."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
from tests.conftest import Backend


@dataclass
class Federation:
    """Identities of a few nodes and the task that lists them."""

    task: TaskConfig
    identities: dict[str, NodeIdentity]

    @classmethod
    def make(cls, *node_ids: str, task_id: str = "task-1") -> Federation:
        ids = {n: NodeIdentity.generate(n) for n in node_ids}
        return cls(TaskConfig(task_id, {n: i.public_key_text for n, i in ids.items()}), ids)

    def channel(self, backend: Backend, node_id: str, **kwargs: object) -> Channel:
        return Channel(
            backend.url,
            self.task,
            self.identities[node_id],
            storage_options=backend.storage_options,
            **kwargs,  # type: ignore[arg-type]
        ).connect()

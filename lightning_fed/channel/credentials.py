"""Loading one party's task configuration and private key from files, with hints."""

from __future__ import annotations

from pathlib import Path

from lightning_fed.channel.errors import ConfigError
from lightning_fed.channel.keys import NodeIdentity, TaskConfig


def load_credentials(
    task_id: str, node_id: str, task_config: Path, key_file: Path, keys_dir: Path
) -> tuple[TaskConfig, NodeIdentity]:
    """The task configuration at ``task_config`` and this node's key at ``key_file``.

    Raises:
        ConfigError: a file is missing, or the configuration is another task's.
    """
    if not task_config.is_file():
        raise ConfigError(
            f"no task configuration at {str(task_config)!r}; hint: for a simulation run "
            f"`lightning-fed keys federation --task-id {task_id} --nodes ... --dir "
            f"{keys_dir}`, across organisations get task.json from the task initiator"
        )
    task = TaskConfig.load(task_config)
    if task.task_id != task_id:
        raise ConfigError(
            f"{str(task_config)!r} configures task {task.task_id!r}, but this party was given "
            f"task_id={task_id!r}; hint: use that task's configuration file"
        )
    if not key_file.is_file():
        raise ConfigError(
            f"no private key for node {node_id!r} at {str(key_file)!r}; hint: "
            f"`lightning-fed keys new {node_id} --dir {keys_dir}` and share the .pub"
        )
    return task, NodeIdentity.load(key_file, node_id)
